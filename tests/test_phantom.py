"""Tests of the built-in synthetic chest-radiograph phantom."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medsynth_core.phantom import make_phantom

SEEDS = range(20)


def _phantom(seed: int, size: int = 64, nodules: bool = False) -> tuple[np.ndarray, np.ndarray]:
    return make_phantom(np.random.default_rng(seed), size=size, nodules=nodules)


@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("nodules", [False, True])
def test_shapes_dtypes_and_ranges(size: int, nodules: bool) -> None:
    image, mask = _phantom(3, size, nodules)
    assert image.shape == (size, size) and mask.shape == (size, size)
    assert image.dtype == np.float32 and mask.dtype == np.uint8
    assert np.isfinite(image).all()
    assert image.min() >= 0.0 and image.max() <= 1.0
    # A real picture, not a flat or saturated one.
    assert image.std() > 0.1


def test_default_size_is_128() -> None:
    image, mask = make_phantom(np.random.default_rng(0))
    assert image.shape == mask.shape == (128, 128)


@pytest.mark.parametrize("seed", SEEDS)
def test_mask_is_binary_two_lungs_with_plausible_area(seed: int) -> None:
    _, mask = _phantom(seed)
    assert set(np.unique(mask)) == {0, 1}
    assert 0.15 <= mask.mean() <= 0.45
    labels, count = ndimage.label(mask)
    assert count == 2
    # The image-right lung (patient's left) is the smaller one, since the heart shadow cuts into it.
    areas = ndimage.sum(mask, labels, [1, 2])
    centres_x = [c[1] for c in ndimage.center_of_mass(mask, labels, [1, 2])]
    image_left, image_right = np.asarray(areas)[np.argsort(centres_x)]
    assert image_right < image_left


def test_same_seed_gives_identical_arrays() -> None:
    for nodules in (False, True):
        image_a, mask_a = _phantom(7, 96, nodules)
        image_b, mask_b = _phantom(7, 96, nodules)
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(mask_a, mask_b)


def test_different_seeds_give_different_images_and_masks() -> None:
    samples = [_phantom(seed) for seed in range(5)]
    for i in range(len(samples)):
        for j in range(i + 1, len(samples)):
            assert np.abs(samples[i][0] - samples[j][0]).mean() > 0.01
            assert (samples[i][1] != samples[j][1]).any()


@pytest.mark.parametrize("size", [64, 128])
def test_lungs_are_clearly_darker_than_surrounding_tissue(size: int) -> None:
    ring_width = max(2, size // 32)
    for seed in SEEDS:
        image, mask = _phantom(seed, size)
        lungs = mask.astype(bool)
        ring = ndimage.binary_dilation(lungs, iterations=ring_width) & ~lungs
        assert image[ring].mean() - image[lungs].mean() >= 0.15, seed


def test_nodules_lie_inside_the_lungs_and_leave_the_mask_unchanged() -> None:
    nodule_pixels = 0
    for seed in SEEDS:
        plain, plain_mask = _phantom(seed, 128, nodules=False)
        with_nodules, nodule_mask = _phantom(seed, 128, nodules=True)
        np.testing.assert_array_equal(plain_mask, nodule_mask)
        # Nodule draws come last, so the only difference is the nodules themselves, and they are bright.
        added = with_nodules - plain
        assert added.min() >= 0.0
        touched = added > 1e-6
        assert not (touched & (nodule_mask == 0)).any(), seed
        labels, count = ndimage.label(touched)
        assert count <= 3
        nodule_pixels += int(touched.sum())
    assert nodule_pixels > 0


@pytest.mark.parametrize("size", [0, 31, 513, -128])
def test_size_out_of_range_raises_value_error(size: int) -> None:
    with pytest.raises(ValueError, match="size"):
        make_phantom(np.random.default_rng(0), size=size)


def test_non_integer_size_raises_value_error() -> None:
    with pytest.raises(ValueError, match="size"):
        make_phantom(np.random.default_rng(0), size=128.0)  # type: ignore[arg-type]
