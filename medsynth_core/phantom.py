"""Seeded synthetic chest-radiograph phantoms: medsynth's built-in default dataset.

``make_phantom`` draws a frontal (PA) chest X-ray look-alike together with its lung-field mask, so that every
command can run without downloading data. The picture is built in *patient coordinates* (x, y in about
[-1, 1], y pointing down, x to the image right) as a sum of layers, each a simple closed-form shape:

* air outside a soft-tissue body outline (neck, shoulders, chest wall, abdomen);
* two lung fields, dark and rounded; the patient's left lung is on the image right (radiological
  convention), slightly smaller, with the heart shadow cutting into its lower medial part;
* mediastinum with trachea and spine, diaphragm domes with brighter abdomen below;
* curved posterior rib bands and clavicles, added as semi-transparent bone;
* smooth low-frequency texture, vessel-like lung markings, a mild detector blur and fine noise.

The mask is the union of the two visible lung fields (after the heart, mediastinum and diaphragm cuts), drawn
with the same hard boundary that the image layers are built from. Only numpy and scipy are used.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MIN_SIZE = 32
MAX_SIZE = 512

# Coarse grids for the smooth noise fields. They are fixed, not scaled with ``size``, so that one seed gives
# the same anatomy and texture at every resolution (only the fine noise and nodule pixels depend on size).
_LOW_FREQ_CELLS = 6
_MARKING_CELLS = 20


def make_phantom(
    rng: np.random.Generator, size: int = 128, nodules: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Return (image float32 HxW in [0,1], mask uint8 HxW with values {0,1}) for one synthetic chest X-ray.

    Args:
        rng: source of all randomness; the same generator state always gives identical arrays.
        size: height and width in pixels, from 32 to 512.
        nodules: add 0-3 small bright round nodules lying wholly inside the lung fields. Their random draws
            come after every other draw, so a seed gives the same underlying chest with or without them.
            The mask stays the lung mask.

    Raises:
        ValueError: ``size`` is not an integer from 32 to 512.
    """
    _check_size(size)
    x, y = _patient_grid(rng, size)

    body = _body_outline(rng, x, y)
    mediastinum, midline = _mediastinum(rng, x, y)
    heart = _heart(rng, x, y)
    dome_y = _diaphragm_height(rng, x)
    lungs = _lung_fields(rng, x, y) & ~heart & ~mediastinum & (y < dome_y) & (body > 0.5)
    lungs = _two_largest_regions(lungs)

    image = _soft_tissue(rng, body)
    image += _mediastinal_density(rng, x - midline, y, mediastinum, heart)
    image += _upper_abdomen(rng, y, dome_y, body)
    image -= _lung_lucency(rng, x, y, lungs)
    image += _bones(rng, x, y) * body
    image += 0.03 * _smooth_noise(rng, _LOW_FREQ_CELLS, size) * body
    image = _detector_response(rng, image, size)

    mask = lungs.astype(np.uint8)
    if nodules:
        image = _add_nodules(rng, image, mask)
    return np.clip(image, 0.0, 1.0).astype(np.float32), mask


def _check_size(size: int) -> None:
    """Reject sizes outside the range the anatomy was tuned for."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"phantom size must be an integer from {MIN_SIZE} to {MAX_SIZE}, got {size!r}")


def _patient_grid(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates mapped into patient space with a small random pose (tilt, shift, zoom)."""
    angle = np.deg2rad(rng.uniform(-3.0, 3.0))
    shift_x, shift_y = rng.uniform(-0.04, 0.04, size=2)
    zoom = rng.uniform(0.95, 1.05)
    axis = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
    img_y, img_x = np.meshgrid(axis - shift_y, axis - shift_x, indexing="ij")
    cos, sin = np.cos(angle), np.sin(angle)
    x = (cos * img_x + sin * img_y) / zoom
    y = (-sin * img_x + cos * img_y) / zoom
    return x, y


def _smoothstep(t: np.ndarray | float) -> np.ndarray:
    """Cubic ease from 0 to 1 over t in [0, 1]; used to blend widths without kinks."""
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _chord(distance: np.ndarray, half_width: float | np.ndarray) -> np.ndarray:
    """X-ray path length through a cylinder of the given radius: the natural profile of a bone or body."""
    return np.sqrt(np.clip(1.0 - (distance / half_width) ** 2, 0.0, None))


def _body_outline(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Return the normalised tissue thickness (0 outside the body, up to 1 at the midline).

    The body is a vertical column that is narrow at the neck, widens over the shoulders and tapers slightly
    over the abdomen. Thickness follows a flattened cylinder chord so the chest wall fades towards the skin.
    """
    neck, chest = rng.uniform(0.24, 0.32), rng.uniform(0.86, 0.94)
    shoulder_y = rng.uniform(-0.74, -0.62)
    half_width = neck + (chest - neck) * _smoothstep((y + 1.05) / (shoulder_y + 1.05))
    half_width = half_width - 0.06 * _smoothstep((y - 0.55) / 0.5)
    chord = _chord(x, half_width)
    # Mostly flat inside, so the tissue around the lungs stays bright; a thin soft fall-off at the skin.
    return np.where(chord > 0, 0.75 + 0.25 * chord, 0.0) * _smoothstep(chord / 0.12)


def _mediastinum(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Central column between the lungs, narrow above and widening towards the heart; also its centre x."""
    centre = rng.uniform(-0.03, 0.03)
    top, bottom = rng.uniform(0.10, 0.14), rng.uniform(0.15, 0.20)
    half_width = top + (bottom - top) * _smoothstep((y + 0.4) / 0.7)
    return np.abs(x - centre) < half_width, centre


def _heart(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Tilted ellipse low in the chest, shifted to the patient's left (image right), apex pointing down."""
    cx, cy = rng.uniform(0.10, 0.16), rng.uniform(0.36, 0.42)
    semi_a, semi_b = rng.uniform(0.31, 0.36), rng.uniform(0.22, 0.26)
    tilt = np.deg2rad(rng.uniform(15.0, 30.0))
    u = np.cos(tilt) * (x - cx) + np.sin(tilt) * (y - cy)
    v = -np.sin(tilt) * (x - cx) + np.cos(tilt) * (y - cy)
    return (u / semi_a) ** 2 + (v / semi_b) ** 2 < 1.0


def _diaphragm_height(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """Height (y) of the two diaphragm domes at each x; the right dome (image left) sits a little higher."""
    base = rng.uniform(0.66, 0.74)
    right_peak, left_peak = rng.uniform(0.36, 0.46), rng.uniform(0.42, 0.52)
    right = base - (base - right_peak) * np.cos(np.clip((x + 0.40) / 0.50, -1, 1) * np.pi / 2)
    left = base - (base - left_peak) * np.cos(np.clip((x - 0.40) / 0.50, -1, 1) * np.pi / 2)
    return np.where(x < 0, right, left)


def _lung_fields(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Union of the two raw lung shapes, before the heart, mediastinum and diaphragm cut into them."""
    # The shapes reach below the diaphragm on purpose: the domes cut them where they are broad, which gives
    # the sharp lateral costophrenic angles of a real radiograph.
    half_w, half_h = rng.uniform(0.33, 0.38), rng.uniform(0.72, 0.80)
    cy = rng.uniform(0.10, 0.16)
    right = _lung_shape(rng, x, y, side=-1, cx=-rng.uniform(0.37, 0.41), cy=cy, half_w=half_w, half_h=half_h)
    # The patient's left lung shares space with the heart, so it is drawn a little smaller.
    shrink = rng.uniform(0.88, 0.96)
    left_cx = rng.uniform(0.37, 0.41)
    left = _lung_shape(
        rng, x, y, side=1, cx=left_cx, cy=cy + 0.02, half_w=half_w * shrink, half_h=half_h * shrink
    )
    return right | left


def _lung_shape(
    rng: np.random.Generator,
    x: np.ndarray,
    y: np.ndarray,
    *,
    side: int,
    cx: float,
    cy: float,
    half_w: float,
    half_h: float,
) -> np.ndarray:
    """One lung: an egg shape, narrow at the apex, broad and boxy below, flatter medially, gently wobbled.

    ``side`` is -1 for the image-left lung and +1 for the image-right one; it mirrors local coordinates so
    that positive ``u`` always points laterally.
    """
    tilt = np.deg2rad(rng.uniform(2.0, 8.0)) * side  # apices lean towards the midline
    u = side * (np.cos(tilt) * (x - cx) + np.sin(tilt) * (y - cy))
    v = -np.sin(tilt) * (x - cx) + np.cos(tilt) * (y - cy)
    vn = v / half_h
    taper = 0.55 + 0.45 * _smoothstep((vn + 1.0) / 1.1)
    lateral = u >= 0
    un = np.abs(u) / (half_w * taper * np.where(lateral, 1.0, rng.uniform(0.85, 0.93)))
    power_u = np.where(lateral, 2.0, rng.uniform(2.4, 3.0))
    power_v = np.where(vn < 0, 2.0, 3.5)
    radius = un**power_u + np.abs(vn) ** power_v  # < 1 inside; the level set stays convex-ish
    theta = np.arctan2(vn, np.where(lateral, un, -un))
    harmonics = np.arange(2, 5)
    amps = rng.uniform(0.0, 0.05, size=3)
    phases = rng.uniform(0.0, 2 * np.pi, size=3)
    wobble = np.tensordot(amps, np.cos(harmonics[:, None, None] * theta + phases[:, None, None]), axes=1)
    return radius < 1.0 + wobble


def _two_largest_regions(lungs: np.ndarray) -> np.ndarray:
    """Keep the two lung fields, dropping pixel-sized slivers the heart and domes can leave between them."""
    labels, count = ndimage.label(lungs)
    if count <= 2:
        return lungs
    areas = ndimage.sum_labels(lungs, labels, index=np.arange(1, count + 1))
    keep = np.argsort(areas)[-2:] + 1
    return np.isin(labels, keep)


def _soft_tissue(rng: np.random.Generator, body: np.ndarray) -> np.ndarray:
    """Air level outside the body and soft-tissue brightness inside it."""
    air, tissue = rng.uniform(0.02, 0.07), rng.uniform(0.52, 0.62)
    return air + (tissue - air) * body


def _mediastinal_density(
    rng: np.random.Generator, dx: np.ndarray, y: np.ndarray, mediastinum: np.ndarray, heart: np.ndarray
) -> np.ndarray:
    """Extra density of the mediastinum and heart, a dark trachea, and the spine with vertebral segments.

    ``dx`` is the horizontal offset from the mediastinal midline.
    """
    density = rng.uniform(0.07, 0.12) * mediastinum + rng.uniform(0.04, 0.08) * heart
    trachea_w = rng.uniform(0.025, 0.035)
    trachea = _chord(dx - 0.01, trachea_w) * _smoothstep((-0.15 - y) / 0.15)
    density -= rng.uniform(0.06, 0.10) * trachea
    spine_w, period = rng.uniform(0.055, 0.075), rng.uniform(0.10, 0.13)
    # Vertebral bodies read as bright blocks separated by darker disc spaces.
    segments = 0.75 + 0.25 * np.cos(np.pi * (y + rng.uniform(0, period)) / period) ** 2
    density += rng.uniform(0.07, 0.12) * _chord(dx, spine_w) * segments
    return density


def _upper_abdomen(
    rng: np.random.Generator, y: np.ndarray, dome_y: np.ndarray, body: np.ndarray
) -> np.ndarray:
    """Liver and stomach below the diaphragm read a little denser than the chest wall."""
    return rng.uniform(0.03, 0.07) * _smoothstep((y - dome_y) / 0.05) * body


def _lung_lucency(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, lungs: np.ndarray) -> np.ndarray:
    """How much darker the lungs are than tissue, less the vessel markings that fan out from each hilum."""
    depth = rng.uniform(0.32, 0.42)
    hilum_x, hilum_y = rng.uniform(0.20, 0.26), rng.uniform(-0.02, 0.08)
    hila = np.exp(-(((np.abs(x) - hilum_x) / 0.12) ** 2) - ((y - hilum_y) / 0.2) ** 2)
    markings = _smooth_noise(rng, _MARKING_CELLS, x.shape[0])
    vessels = rng.uniform(0.10, 0.14) * hila + rng.uniform(0.03, 0.045) * markings * (0.5 + hila)
    # Breast and diaphragm soft tissue overlie the lower lungs, so the bases read slightly denser.
    bases = rng.uniform(0.02, 0.05) * _smoothstep((y - 0.1) / 0.5)
    return (depth - vessels - bases) * lungs


def _bones(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Ribs and clavicles as semi-transparent bone (0 where there is none, up to about 0.15).

    Posterior ribs leave the spine, rise briefly and droop laterally; the fainter anterior ribs run the other
    way, down towards the sternum, which gives the criss-cross pattern of a frontal chest film.
    """
    amp = rng.uniform(0.08, 0.13)
    spacing = rng.uniform(0.13, 0.15)
    first = rng.uniform(-0.80, -0.74)
    droop = rng.uniform(0.75, 0.95)
    dist = np.abs(x)
    # Ribs start a little lateral of the spine; dim them there so they seem to pass behind it.
    emerge = _smoothstep((dist - 0.06) / 0.10)
    posterior = np.zeros_like(x)
    for k in range(10):
        start_y = first + k * spacing * (1.0 + 0.03 * k) + rng.normal(0.0, 0.01)
        centre_y = start_y - 0.22 * dist + droop * dist**2
        posterior = np.maximum(posterior, _chord(y - centre_y, 0.020 + 0.002 * k + rng.uniform(0.0, 0.005)))
    anterior = np.zeros_like(x)
    lateral_band = _smoothstep((dist - 0.18) / 0.12) * _smoothstep((0.85 - dist) / 0.1)
    for k in range(6):
        start_y = first + 0.25 + k * spacing * 1.25 + rng.normal(0.0, 0.01)
        centre_y = start_y + 0.55 * (0.8 - dist) ** 2
        anterior = np.maximum(anterior, _chord(y - centre_y, 0.03))
    clavicle_y = first + rng.uniform(0.0, 0.05) - 0.2 * dist + 0.2 * dist**2
    clavicle_span = _smoothstep((dist - 0.05) / 0.06) * _smoothstep((0.7 - dist) / 0.1)
    clavicles = _chord(y - clavicle_y, 0.03) * clavicle_span
    return amp * (posterior * emerge + 0.35 * anterior * lateral_band + 0.9 * clavicles)


def _smooth_noise(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    """Zero-mean, roughly unit-scale noise with features about size/cells pixels wide."""
    coarse = rng.standard_normal((cells, cells))
    field = ndimage.zoom(coarse, size / cells, order=3, mode="reflect", grid_mode=True)
    return field[:size, :size]


def _detector_response(rng: np.random.Generator, image: np.ndarray, size: int) -> np.ndarray:
    """Slight contrast change, optical blur and quantum noise, as a real detector would add."""
    gamma = rng.uniform(0.9, 1.1)
    image = np.clip(image, 0.0, 1.0) ** gamma
    image = ndimage.gaussian_filter(image, sigma=max(0.5, size / 180.0))
    return image + rng.normal(0.0, rng.uniform(0.008, 0.02), size=image.shape)


def _add_nodules(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Add 0-3 round bright nodules, each placed where its whole disc fits inside the lung mask."""
    size = mask.shape[0]
    count = int(rng.integers(0, 4))
    if count == 0 or not mask.any():
        return image
    depth_in_lung = ndimage.distance_transform_edt(mask)
    rows, cols = np.indices(mask.shape)
    image = image.copy()
    for _ in range(count):
        radius = max(1.5, rng.uniform(0.025, 0.05) * size / 2)
        strength = rng.uniform(0.15, 0.30)
        candidates = np.flatnonzero(depth_in_lung > radius + 1.0)
        if candidates.size == 0:
            continue
        row, col = np.unravel_index(candidates[rng.integers(candidates.size)], mask.shape)
        image += strength * _chord(np.hypot(rows - row, cols - col), radius)
    return image
