"""What real face crops vary in besides the expression, as image operations on rendered frames.

Real expression recognition is hard because of everything that is not the expression: the crop sits the face at
another place, scale and roll every time, the light falls from another side, a hand or hair covers part of the
face, and the video is blurred and compressed. :class:`Nuisance` draws one such setting per clip (from its own
random stream, so a clip's expression is drawn exactly as without nuisance) and :func:`degrade` applies the
per-frame image part. ``strength`` scales every range: 0 changes nothing, 1 is the learning benchmark's setting
(expmae.learning_benchmark), where a linear read-out of pixels or of random-init features stays far from what a
trained encoder reaches.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter


@dataclass(frozen=True)
class Nuisance:
    """One clip's nuisance: framing (applied while drawing) and image degradations (applied by :func:`degrade`)."""

    scale: float  # face width multiplier
    shift: tuple[float, float]  # (dx, dy) of the face centre, in units of the frame size
    drift: float  # multiplier of the head's smooth drift
    roll: float  # in-plane rotation, degrees, about the face centre
    gain: float  # global brightness gain
    gradient: tuple[float, float]  # (amplitude, angle): light falling from one side
    cast: tuple[float, float, float]  # per-channel colour gain
    occluder: tuple[float, float, float, float, tuple[float, float, float]] | None  # (dx, dy, rx, ry) in face widths, colour
    blur: float  # Gaussian blur radius in pixels
    jpeg_quality: int  # 0 = no compression
    noise: float  # Gaussian pixel noise sigma (0-255 scale)
    talk: float  # extra mouth movement while talking

    @classmethod
    def draw(cls, seed: int, strength: float) -> "Nuisance":
        rng = np.random.default_rng([seed, 0x6E75])  # its own stream: the expression's draws stay untouched
        s = float(strength)
        occluded = rng.random() < 0.6 * s
        occluder = None
        if occluded:
            colour = SKINLIKE[rng.integers(len(SKINLIKE))] if rng.random() < 0.5 else tuple(rng.uniform(10, 90, 3))
            occluder = (float(rng.uniform(-0.45, 0.45)), float(rng.uniform(-0.2, 0.6)), float(rng.uniform(0.12, 0.28)),
                        float(rng.uniform(0.12, 0.28)), tuple(float(c) for c in colour))
        return cls(scale=float(rng.uniform(1 - 0.35 * s, 1 + 0.05 * s)),
                   shift=(float(rng.uniform(-0.1, 0.1) * s), float(rng.uniform(-0.08, 0.08) * s)),
                   drift=1 + s, roll=float(rng.uniform(-20, 20) * s), gain=float(rng.uniform(1 - 0.45 * s, 1 + 0.25 * s)),
                   gradient=(float(rng.uniform(0, 0.7) * s), float(rng.uniform(0, 2 * np.pi))),
                   cast=tuple(float(c) for c in rng.uniform(1 - 0.15 * s, 1 + 0.15 * s, 3)),
                   occluder=occluder, blur=float(rng.uniform(0, 1.2) * s),
                   jpeg_quality=int(rng.integers(15, 60)) if rng.random() < s else 0,
                   noise=float(rng.uniform(0, 8) * s), talk=float(0.4 * s))


SKINLIKE = ((224, 172, 140), (198, 134, 96), (161, 102, 68), (241, 194, 167))  # a hand in front of the face


def degrade(frame: np.ndarray, nuisance: Nuisance, center: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """One rendered frame (H, W, 3) float32 in 0-255 -> uint8 with roll, light, blur, compression and noise."""
    h, w = frame.shape[:2]
    if nuisance.roll:
        pad = h // 4  # reflect the borders out so the rotation brings in more of the room, not a fill colour
        big = np.pad(frame, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
        img = Image.fromarray(np.clip(big, 0, 255).astype(np.uint8))
        img = img.rotate(nuisance.roll, resample=Image.BILINEAR, center=(center[0] + pad, center[1] + pad))
        frame = np.asarray(img, np.float32)[pad : pad + h, pad : pad + w]
    amplitude, angle = nuisance.gradient
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = ((xx / w - 0.5) * np.cos(angle) + (yy / h - 0.5) * np.sin(angle))  # (H, W) in [-0.71, 0.71]
    light = nuisance.gain * (1 + amplitude * ramp)[..., None] * np.asarray(nuisance.cast, np.float32)  # (H, W, 3)
    frame = frame * light
    if nuisance.noise:
        frame = frame + rng.normal(0, nuisance.noise, frame.shape).astype(np.float32)
    img = Image.fromarray(np.clip(frame, 0, 255).astype(np.uint8))
    if nuisance.blur > 0.2:
        img = img.filter(ImageFilter.GaussianBlur(nuisance.blur))
    if nuisance.jpeg_quality:
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=nuisance.jpeg_quality)
        img = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return np.asarray(img, np.uint8)
