"""Drawing primitives and the normal anatomy of the synthetic chest radiograph.

Everything is drawn as a *density* map (how much the X-rays are attenuated along each ray) on
anatomical coordinates ``(u, v)``: ``u`` runs from the image's left (patient's right) to its right,
``v`` from the top (neck) to the bottom (abdomen), both about ``[-1, 1]``. A study's pose
(shift, scale, rotation) moves that grid, so every structure moves with it. The caller turns the
density into intensities (exposure, noise, blur) in :mod:`corex_cxr.phantom`.

All functions are vectorised numpy on float32 arrays: no per-pixel Python loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Array = np.ndarray


def ramp(signed_distance: Array, width: float) -> Array:
    """A soft edge: 0 outside (negative distance), 1 inside, linear across ``width``.

    Cheaper than a sigmoid, and the image is blurred afterwards anyway.
    """
    return np.clip(0.5 + signed_distance / width, 0.0, 1.0)


def superellipse(u: Array, v: Array, cu: float, cv: float, ru: float, rv: float, power: int = 2) -> Array:
    """``|du/ru|^p + |dv/rv|^p`` for an even ``power``: below 1 inside, 1 on the outline."""
    return even_power((u - cu) / ru, power) + even_power((v - cv) / rv, power)


def even_power(x: Array, power: int) -> Array:
    """``x ** power`` by repeated multiplication: several times faster than a float power."""
    if power < 2 or power % 2:
        raise ValueError(f"power must be an even integer of at least 2, got {power}")
    square = x * x
    result = square
    for _ in range(power // 2 - 1):
        result = result * square
    return result


def blob(u: Array, v: Array, cu: float, cv: float, ru: float, rv: float) -> Array:
    """A Gaussian bump of peak 1 and standard deviations ``ru``, ``rv``: a hazy, soft-edged spot."""
    return np.exp(-0.5 * (((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2))


def segment_distance(u: Array, v: Array, start: tuple[float, float], end: tuple[float, float]) -> Array:
    """Distance from each point to the line segment ``start``-``end``."""
    (u0, v0), (u1, v1) = start, end
    du, dv = u1 - u0, v1 - v0
    t = np.clip(((u - u0) * du + (v - v0) * dv) / (du * du + dv * dv), 0.0, 1.0)
    return np.sqrt((u - u0 - t * du) ** 2 + (v - v0 - t * dv) ** 2)


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> Array:
    """Low-frequency noise in ``[0, 1]``: a ``cells x cells`` random grid, bilinearly upsampled.

    Used for tissue texture and the patchiness of ground-glass opacities.
    """
    grid = rng.random((cells + 1, cells + 1), dtype=np.float32)
    position = np.linspace(0.0, cells, size, dtype=np.float32)
    index = np.minimum(position.astype(np.int64), cells - 1)
    frac = position - index
    # np.take rather than a matrix product: BLAS threads stall when the cores are busy.
    rows = np.take(grid, index, axis=0) * (1 - frac)[:, None]
    rows += np.take(grid, index + 1, axis=0) * frac[:, None]
    return np.take(rows, index, axis=1) * (1 - frac) + np.take(rows, index + 1, axis=1) * frac


def blur(image: Array, passes: int = 1) -> Array:
    """Separable [1, 2, 1] / 4 smoothing, ``passes`` times (edges repeated): the imaging system's blur."""
    for _ in range(passes):
        padded = np.pad(image, 1, mode="edge")
        image = (padded[:-2] + 2 * padded[1:-1] + padded[2:]) * 0.25
        image = (image[:, :-2] + 2 * image[:, 1:-1] + image[:, 2:]) * 0.25
    return image


@dataclass(frozen=True)
class Pose:
    """Where the patient sits in the image: shift (image units), scale and rotation (radians)."""

    shift_u: float = 0.0
    shift_v: float = 0.0
    scale: float = 1.0
    rotation: float = 0.0

    def grid(self, size: int) -> tuple[Array, Array]:
        """Anatomical coordinates ``(u, v)`` of every pixel centre, each ``(size, size)`` float32."""
        axis = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0
        x, y = axis[None, :] - self.shift_u, axis[:, None] - self.shift_v
        cos, sin = np.cos(self.rotation) / self.scale, np.sin(self.rotation) / self.scale
        return (cos * x + sin * y).astype(np.float32), (cos * y - sin * x).astype(np.float32)


@dataclass(frozen=True)
class Thorax:
    """The drawn anatomy: the total density and the lung masks the findings are confined to."""

    density: Array
    air: float  # how much density the lungs' air removes: a finding that fills a lung adds it back
    right_lung: Array  # patient's right lung, on the image's left
    left_lung: Array  # patient's left lung, on the image's right

    def lung(self, side: int) -> Array:
        """The lung on image side ``side`` (-1: image left = patient right, +1: image right)."""
        return self.right_lung if side < 0 else self.left_lung


# Lung geometry in anatomical coordinates: lateral extent (measured from the midline), apex, and the
# height of each diaphragm dome. The patient's right dome sits a little higher (the liver below it).
LUNG_MEDIAL, LUNG_LATERAL = 0.11, 0.76
LUNG_APEX = -0.66
DOME_TOP = {-1: 0.34, +1: 0.40}


def lung_mask(u: Array, v: Array, side: int, width: float, edge: float) -> Array:
    """One lung field: a rounded apex, a convex lateral wall, the mediastinum medially and the
    diaphragm dome below, which meets the lateral wall in a sharp costophrenic angle."""
    lateral = side * u  # 0 at the midline, growing towards this lung's chest wall
    centre = 0.5 * (LUNG_MEDIAL + LUNG_LATERAL) * width
    half = 0.5 * (LUNG_LATERAL - LUNG_MEDIAL) * width
    # Upper half: an ellipse for the apex; lower half: a squarer superellipse down to the dome.
    across = (lateral - centre) / half
    upper = even_power(across, 2) + even_power(np.minimum(v, 0.0) / LUNG_APEX, 2)
    lower = even_power(across, 6) + even_power(np.maximum(v, 0.0) / 0.8, 6)
    inside = ramp(1.0 - np.where(v < 0.0, upper, lower), edge * 4)
    dome = DOME_TOP[side] + 0.17 * ((lateral - 0.35 * width) / half) ** 2
    return inside * ramp(dome - v, edge)


def draw_thorax(
    u: Array, v: Array, rng: np.random.Generator, variation: float, pixel: float
) -> Thorax:
    """Draw a normal chest: body outline and soft tissue, lungs, heart and mediastinum, spine,
    ribs, clavicles, diaphragm. ``variation`` scales how much each patient differs from the
    average one; ``pixel`` is one pixel's size in anatomical units (for edge widths)."""

    def jitter(scale: float) -> float:
        return float(rng.uniform(-scale, scale) * variation)

    edge = 3.0 * pixel
    # Soft tissue: a rounded torso touching the bottom of the image, the neck above it.
    torso = superellipse(u, v, 0.0, 0.3 + jitter(0.05), 0.93 + jitter(0.05), 1.22, power=4)
    torso = ramp(1.0 - torso, 0.08)
    neck = ramp(0.2 - np.abs(u), edge) * ramp(-0.6 - v, 0.1)
    body = np.maximum(torso, neck)
    density = body * np.float32(0.42 + jitter(0.06))

    # Heart: on the image's right (patient's left), its lower edge on the diaphragm.
    heart_centre = (0.13 + jitter(0.04), 0.3 + jitter(0.03))
    heart = ramp(1.0 - superellipse(u, v, *heart_centre, 0.34 + jitter(0.04), 0.3), 0.06)
    heart *= ramp(0.42 + 0.1 * u - v, 0.04)
    # Lungs are air: they cancel most of the soft tissue in front of and behind them, except
    # where the heart fills the chest's depth.
    lung_width = 1.0 + jitter(0.06)
    visible = 1.0 - 0.85 * heart
    right = lung_mask(u, v, -1, lung_width, edge) * visible
    left = lung_mask(u, v, +1, lung_width, edge) * visible
    air = np.float32(0.28 + jitter(0.04))
    density -= air * (right + left)
    # Mediastinum and aortic knob: the column between the lungs, denser than plain soft tissue.
    mediastinum = ramp(0.13 - np.abs(u - 0.02), 0.05) * ramp(v + 0.65, 0.1) * ramp(0.45 - v, 0.1)
    aortic_knob = ramp(1.0 - superellipse(u, v, 0.1, -0.33, 0.09, 0.07), 0.1)
    density += 0.06 * np.maximum(np.maximum(heart, mediastinum), aortic_knob)

    # Spine: a vertical band with a vertebra every ~0.13 units, seen faintly through the heart.
    spine = ramp(0.075 - np.abs(u), edge) * ramp(0.95 - np.abs(v + 0.05), 0.1)
    density += spine * (0.07 + 0.03 * np.cos(2 * np.pi * v / 0.13)).astype(np.float32)

    # Posterior ribs: curved bands, rising from the spine and sweeping down to the lateral wall;
    # anterior ribs: fainter bands falling towards the midline.
    lateral = np.abs(u)
    chest = ramp(1.0 - superellipse(lateral, v, 0.43, -0.1, 0.38, 0.72, 4), 0.05) * ramp(0.5 - v, 0.1)
    spacing = np.float32(0.15 + jitter(0.015))
    phase = (v + 0.05 * lateral - 0.9 * (lateral - 0.2) ** 2) / (spacing * (1.0 + 0.25 * v))
    posterior = np.clip((np.cos(2 * np.pi * phase) - 0.35) * 2.0, 0.0, 1.0)
    phase = (v - 0.45 * lateral + 0.3 * (lateral - 0.3) ** 2) / (spacing * 1.3)
    anterior = np.clip((np.cos(2 * np.pi * phase + 1.0) - 0.5) * 2.0, 0.0, 1.0)
    density += chest * (0.07 * posterior + 0.03 * anterior)

    # Hila and lung markings: vessels branching out from the hila, fading towards the periphery.
    markings = smooth_noise(rng, u.shape[0], 18)
    for side, lung in ((-1, right), (1, left)):
        hilum = np.sqrt((u - side * 0.22) ** 2 + ((v + 0.02) * 0.8) ** 2)
        density += lung * (0.09 * np.exp(-hilum / 0.07) + 0.1 * np.exp(-hilum / 0.3) * markings)

    # Clavicles: bright bars from the sternal notch out to the shoulders.
    for side in (-1, 1):
        start = (side * 0.08, -0.68 + jitter(0.04))
        end = (side * (0.62 + jitter(0.05)), -0.8 + jitter(0.05))
        density += 0.15 * ramp(0.035 - segment_distance(u, v, start, end), edge)

    # Gastric air bubble under the left hemidiaphragm (image right).
    bubble = ramp(1.0 - superellipse(u, v, 0.38, 0.63, 0.1, 0.06), 0.3)
    density -= 0.08 * bubble * body
    return Thorax(density=density, air=float(air), right_lung=right, left_lung=left)
