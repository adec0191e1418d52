"""The required libraries install and work offline, as the built-in plugins will use them."""

from __future__ import annotations

import numpy as np


def test_densecrf_binding_imports_under_the_pydensecrf_name() -> None:
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    h, w = 16, 16
    prob = np.stack([np.full((h, w), 0.8), np.full((h, w), 0.2)]).astype(np.float32)
    prob[1, 4:12, 4:12], prob[0, 4:12, 4:12] = 0.9, 0.1
    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(prob)))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    labels = np.argmax(np.array(crf.inference(3)), axis=0).reshape(h, w)
    assert labels[8, 8] == 1 and labels[0, 0] == 0


def test_smp_unet_builds_without_downloading_weights() -> None:
    import segmentation_models_pytorch as smp
    import torch

    model = smp.Unet("resnet18", encoder_weights=None, in_channels=1, classes=1)
    with torch.no_grad():
        out = model(torch.zeros(1, 1, 64, 64))
    assert out.shape == (1, 1, 64, 64)


def test_torch_and_torchvision_import_together() -> None:
    import torch
    import torchvision

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.5)
    assert keep.tolist() == [0]


def test_field_libraries_import() -> None:
    import cleanfid.fid  # noqa: F401
    import diffusers  # noqa: F401
    import nibabel  # noqa: F401
    import pydicom  # noqa: F401
    import skimage  # noqa: F401
