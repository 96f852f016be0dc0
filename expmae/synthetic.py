"""Procedurally drawn "talking face" videos that facenet-pytorch's MTCNN detects (p > 0.95), for demos and tests.

No download: a shaded skin-toned head with hair, ears, eye sockets, eyes (sclera, iris, pupil) that blink,
brows that move with the expression, a shaded nose with nostrils, and a mouth that opens while "talking" and
widens into a smile, on a gradient background with soft blobs. The head drifts and zooms a little. What made
MTCNN fire, found by trial: dark eyes inside shaded sockets, dark brows above them, a darker nose line and a
mouth well below the eyes, with face width >= ~25 px; flat cartoon ellipses without the shading score lower.
"""
from __future__ import annotations

import csv
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from expmae.nuisance import Nuisance, degrade
from expmae.video import write_video

# Skin tones from light to dark; MTCNN finds the face on all of them (tests/test_synthetic.py checks).
SKIN_TONES = ((241, 194, 167), (224, 172, 140), (198, 134, 96), (161, 102, 68), (120, 76, 50), (92, 58, 40))
HAIR_COLORS = ((40, 28, 20), (70, 45, 25), (20, 20, 20), (150, 110, 60), (110, 110, 110))


def _paint(img: np.ndarray, cy, cx, ry, rx, color, alpha: float = 1.0, angle: float = 0.0, edge: float = 1.0,
           shade: float = 0.0) -> None:
    """Alpha-blend an anti-aliased ellipse into ``img`` (H, W, 3 float32), touching only its bounding box.

    ``shade`` > 0 darkens the ellipse towards its rim (a cheap 3-D look that helps the detector).
    """
    h, w = img.shape[:2]
    r = max(rx, ry) + 2 * edge + 1
    y0, y1 = max(0, int(cy - r)), min(h, int(cy + r) + 1)
    x0, x1 = max(0, int(cx - r)), min(w, int(cx + r) + 1)
    if y0 >= y1 or x0 >= x1 or rx <= 0 or ry <= 0:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u = (dx * c + dy * s) / rx
    v = (-dx * s + dy * c) / ry
    rho = np.sqrt(u * u + v * v)
    mask = np.clip(0.5 - (rho - 1.0) * min(rx, ry) / edge, 0.0, 1.0) * alpha
    target = np.asarray(color, np.float32)
    if shade:
        target = target * np.clip(1.05 - shade * rho**2, 0.4, 1.1)[..., None]
    region = img[y0:y1, x0:x1]
    region += mask[..., None] * (target - region)


def _smooth_noise(rng: np.random.Generator, t: np.ndarray, amplitude: float) -> np.ndarray:
    """A smooth random wobble: sum of two sinusoids with random frequency (0.1-0.6 Hz at 25 fps) and phase."""
    out = np.zeros_like(t, dtype=np.float64)
    for _ in range(2):
        freq = rng.uniform(0.1, 0.6) / 25.0
        out += np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
    return amplitude * out / 2


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle), 0, 1)[..., None]
    c0, c1 = rng.uniform(30, 220, 3), rng.uniform(30, 220, 3)
    img = (c0 * (1 - t) + c1 * t).astype(np.float32)
    for _ in range(3):  # soft blobs: a room-like, non-flat background
        _paint(img, *rng.uniform(0, size, 2), *rng.uniform(0.08, 0.25, 2) * size, rng.uniform(30, 220, 3),
               alpha=0.5, edge=size * 0.05)
    return img


def _draw_face(img: np.ndarray, cx: float, cy: float, fw: float, skin, hair, shirt, blink: float, mouth_open: float,
               smile: float, brow: float) -> None:
    """Draw one head centred at (cx, cy) with face width ``fw`` into ``img`` (float32, in place)."""
    skin = np.asarray(skin, np.float32)
    hair = np.minimum(np.asarray(hair, np.float32), skin * 0.55)  # the head outline must stay visible
    brow_color = np.minimum(hair * 1.2, skin * 0.35)
    fh = fw * 1.3
    _paint(img, cy + fh * 1.25, cx, fh * 0.6, fw * 1.4, shirt)  # shoulders
    _paint(img, cy + fh * 0.55, cx, fh * 0.35, fw * 0.28, skin * 0.8)  # neck
    _paint(img, cy - fh * 0.1, cx, fh * 0.55, fw * 0.56, hair)  # hair behind the head
    for sx in (-1, 1):  # ears
        _paint(img, cy, cx + sx * fw * 0.5, fh * 0.1, fw * 0.07, skin * 0.85)
    _paint(img, cy, cx, fh * 0.5, fw * 0.5, skin, edge=1.5, shade=0.35)  # head
    _paint(img, cy - fh * 0.47, cx, fh * 0.13, fw * 0.45, hair)  # fringe
    ey = cy - fh * 0.07
    for sx in (-1, 1):
        ex = cx + sx * fw * 0.2
        _paint(img, ey, ex, fh * 0.07, fw * 0.14, skin * 0.6, alpha=0.4, edge=max(1.0, fw * 0.05))  # socket
        # brow > 0 raises the brows (surprise); < 0 lowers and tilts them inwards (anger)
        _paint(img, ey - fh * (0.1 + 0.04 * brow), ex, fh * 0.025, fw * 0.12, brow_color,
               angle=-sx * (0.15 - 0.3 * min(brow, 0.0)))
        opening = max(0.12, 1.0 - blink)
        eh = fh * 0.035 * opening
        _paint(img, ey, ex, eh, fw * 0.09, (240, 240, 235))  # sclera
        _paint(img, ey, ex, min(eh, fw * 0.04), fw * 0.04, (50, 35, 25))  # iris
        _paint(img, ey, ex, min(eh, fw * 0.018), fw * 0.018, (10, 10, 10))  # pupil
        if blink > 0.5:  # a closed lid: skin with a dark lash line
            _paint(img, ey, ex, fh * 0.03, fw * 0.1, skin * 0.9)
            _paint(img, ey + fh * 0.01, ex, fh * 0.006, fw * 0.09, (40, 30, 25))
    _paint(img, cy + fh * 0.06, cx + fw * 0.03, fh * 0.12, fw * 0.03, skin * 0.75, alpha=0.5, edge=3)  # nose ridge
    for sx in (-1, 1):
        _paint(img, cy + fh * 0.16, cx + sx * fw * 0.04, fh * 0.015, fw * 0.025, skin * 0.45)  # nostrils
    my = cy + fh * (0.27 - 0.02 * smile)
    mw = fw * (0.17 + 0.05 * smile)
    _paint(img, my, cx, fh * (0.025 + 0.06 * mouth_open), mw, (150, 60, 60))  # lips
    _paint(img, my, cx, fh * (0.006 + 0.05 * mouth_open), mw * 0.82, (50, 15, 20))  # mouth opening


def render_face_clip(num_frames: int = 48, size: int = 128, seed: int = 0, face: bool = True,
                     distractor: bool = False) -> tuple[np.ndarray, dict]:
    """Frames uint8 (T, size, size, 3) and the ground truth of the main face.

    Truth: ``center`` (T, 2) float (x, y) of the head ellipse, ``face_width`` (T,) in pixels; with
    ``distractor`` a second, smaller face sits in a corner (``distractor_center``). ``face=False`` draws the
    same kind of background with nothing on it (a face-less clip).
    """
    if num_frames < 1 or size < 32:
        raise ValueError(f"num_frames={num_frames}, size={size}: need num_frames >= 1 and size >= 32")
    rng = np.random.default_rng(seed)
    background = _background(rng, size)
    t = np.arange(num_frames, dtype=np.float64)
    skin = SKIN_TONES[rng.integers(len(SKIN_TONES))]
    hair = HAIR_COLORS[rng.integers(len(HAIR_COLORS))]
    shirt = rng.uniform(20, 200, 3)
    base_w = size * rng.uniform(0.30, 0.40)
    side = -1 if rng.random() < 0.5 else 1
    cx = size / 2 + side * size * rng.uniform(0.0, 0.06) + _smooth_noise(rng, t, size * 0.05)
    cy = size * 0.46 + _smooth_noise(rng, t, size * 0.03)
    fw = base_w * (1 + _smooth_noise(rng, t, 0.05))
    # Talking: the mouth opens at 3-5 Hz with pauses; blinks every 2-4 s for ~4 frames.
    talk = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) / 25.0 * t + rng.uniform(0, 6)), 0, 1)
    talk *= _smooth_noise(rng, t, 1.0) > -0.4
    blink = np.zeros(num_frames)
    start = rng.integers(5, 40)
    while start < num_frames:
        blink[start : start + 4] = (0.6, 1.0, 1.0, 0.6)[: len(blink[start : start + 4])]
        start += rng.integers(50, 100)
    smile = np.clip(_smooth_noise(rng, t, 1.5), 0, 1)  # expression drifts between neutral and a smile
    brow = np.clip(_smooth_noise(rng, t, 1.2), -0.5, 1)
    d_skin = SKIN_TONES[rng.integers(len(SKIN_TONES))]
    d_xy = (size * 0.14 if side > 0 else size * 0.86, size * 0.2)

    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for i in range(num_frames):
        img = background.copy()
        if face and distractor:
            _draw_face(img, d_xy[0], d_xy[1], base_w * 0.5, d_skin, hair, shirt * 0.7, 0.0, 0.0, 0.0, 0.0)
        if face:
            _draw_face(img, cx[i], cy[i], fw[i], skin, hair, shirt, blink[i], talk[i], smile[i], brow[i])
        frames[i] = np.clip(img, 0, 255).astype(np.uint8)
    truth = {"center": np.stack([cx, cy], 1), "face_width": fw}
    if distractor:
        truth["distractor_center"] = np.array(d_xy)
    return frames, truth


def _check_size(size: int) -> None:
    # yuv420p needs even sizes; decord 0.6.0 mis-reads frames 48 and 72 pixels wide.
    if size < 32 or size % 2 or size in (48, 72):
        raise ValueError(f"size={size}: use an even size >= 32 other than 48 and 72 (e.g. 64, 96, 128, 224)")


def make_face_videos(out_dir: str | os.PathLike, n: int = 8, num_frames: int = 48, size: int = 128, fps: int = 25,
                     seed: int = 0, distractor: bool = False) -> list[Path]:
    """Write ``n`` synthetic talking-face mp4s ``face_000.mp4`` ... into ``out_dir``; returns their paths.

    Video ``i`` uses seed ``seed * 1000 + i``, so a set is reproducible and its members differ.
    """
    _check_size(size)
    out_dir = Path(out_dir)
    paths = []
    for i in range(n):
        frames, _ = render_face_clip(num_frames, size, seed * 1000 + i, distractor=distractor)
        paths.append(write_video(out_dir / f"face_{i:03d}.mp4", frames, fps))
    return paths


def make_noface_video(path: str | os.PathLike, num_frames: int = 48, size: int = 128, fps: int = 25, seed: int = 0) -> Path:
    """A background-only clip (no face anywhere): the 'no face found' case for tests and demos."""
    _check_size(size)
    frames, _ = render_face_clip(num_frames, size, seed, face=False)
    return write_video(path, frames, fps)


# ---------------------------------------------------------------------------------------------------------
# A labelled expression benchmark: the label lives in a static cue or in a dynamic one only.
#
# Static task: the held expression (mouth curve, brows, eye/mouth opening) names the class; every frame shows it.
# Dynamic task: the same expression either appears (onset) or fades (offset): an offset clip is its onset clip
# with the frames in reverse order, so any average of per-frame evidence is identical for the two classes and
# only the order of the frames tells them apart.
# Identity (skin, hair, clothes, face size, background) and pose (drift, zoom) vary, talking and blinking are
# nuisances; train and test identities are disjoint. Labels use MER2023 names and a valence in [-5, 5].

STATIC_CLASSES = {  # name: (smile, brow, mouth held open, valence at full intensity)
    "neutral": (0.0, 0.0, 0.0, 0.0),
    "happy": (2.0, 0.3, 0.0, 3.0),
    "surprise": (0.0, 1.5, 0.8, 1.0),
    "angry": (-0.3, -1.0, 0.0, -3.0),
}
DYNAMIC_CLASSES = {"happy": "onset", "sad": "offset"}  # MER name: a smile appears / the same smile fades
TASKS = ("static", "dynamic")


@dataclass(frozen=True)
class ExpressionClip:
    """One clip of the benchmark: its name, identity, split, label and valence, and the seed that draws it."""

    name: str
    task: str
    identity: int
    split: str  # "train" (pretraining + finetune folds) or "test" (held-out identities)
    label: str
    valence: float
    intensity: float
    seed: int


def expression_benchmark(task: str, *, identities: int = 24, test_identities: int = 6, clips_per_identity: int = 8,
                         seed: int = 0, first_identity: int = 0) -> list[ExpressionClip]:
    """The clips of one task, balanced over classes within every identity; the last ``test_identities`` are test.
    Identities are numbered from ``first_identity`` (another range: other people)."""
    if task not in TASKS:
        raise ValueError(f"task={task!r}; expected one of {', '.join(TASKS)}")
    if not 0 < test_identities < identities:
        raise ValueError(f"test_identities={test_identities} must be in [1, identities={identities})")
    classes = list(STATIC_CLASSES if task == "static" else DYNAMIC_CLASSES)
    clips = []
    for identity in range(first_identity, first_identity + identities):
        rng = np.random.default_rng([seed, TASKS.index(task), identity])
        split = "test" if identity >= first_identity + identities - test_identities else "train"
        for k in range(clips_per_identity):
            label = classes[(k + identity) % len(classes)]
            intensity = float(rng.uniform(0.6, 1.0))
            if task == "static":
                valence = STATIC_CLASSES[label][3] * intensity
            else:  # where the expression ends up: a smile that appears ends positive, one that fades ends neutral
                valence = 3.0 * intensity * (1 if DYNAMIC_CLASSES[label] == "onset" else -1) / 2
            clips.append(ExpressionClip(f"{task}_{identity:03d}_{k:02d}", task, identity, split, label,
                                        round(valence, 3), intensity, int(rng.integers(2**31))))
    return clips


def _identity_look(seed: int, task: str, identity: int, size: int, framing: str) -> dict:
    rng = np.random.default_rng([seed, 7, identity])  # the same person in both tasks
    face_frac = rng.uniform(0.30, 0.40) if framing == "scene" else rng.uniform(0.62, 0.72)
    return {"background": _background(rng, size), "skin": SKIN_TONES[rng.integers(len(SKIN_TONES))],
            "hair": HAIR_COLORS[rng.integers(len(HAIR_COLORS))], "shirt": rng.uniform(20, 200, 3),
            "face_width": size * face_frac, "dx": rng.uniform(-0.06, 0.06) * size}


def render_expression_clip(clip: ExpressionClip, num_frames: int = 16, size: int = 64, framing: str = "face",
                           benchmark_seed: int = 0, nuisance: float = 0.0) -> np.ndarray:
    """Frames uint8 (T, size, size, 3) of one benchmark clip. ``framing``: "face" (the face fills the frame, as
    a face crop) or "scene" (a head in a room, for the face-crop tool). ``nuisance`` > 0 adds what real face
    crops vary in (expmae.nuisance: framing, roll, light, occlusion, blur, compression, noise, more talking);
    0 draws exactly the clip it always did."""
    if framing not in ("face", "scene"):
        raise ValueError(f"framing={framing!r}; expected 'face' or 'scene'")
    if not 0 <= nuisance <= 2:
        raise ValueError(f"nuisance={nuisance}; expected a strength in [0, 2] (1: the learning benchmark's)")
    look = _identity_look(benchmark_seed, clip.task, clip.identity, size, framing)
    rng = np.random.default_rng(clip.seed)
    nz = Nuisance.draw(clip.seed, nuisance) if nuisance else None
    t = np.arange(num_frames, dtype=np.float64)
    cx = size / 2 + look["dx"] + _smooth_noise(rng, t, size * 0.04)
    cy = size * (0.46 if framing == "scene" else 0.52) + _smooth_noise(rng, t, size * 0.03)
    fw = look["face_width"] * (1 + _smooth_noise(rng, t, 0.04))
    if nz is not None:  # the crop frames the face elsewhere, larger or smaller, and it moves more
        cx = size / 2 + look["dx"] + nz.shift[0] * size + (cx - size / 2 - look["dx"]) * nz.drift
        cy = cy + nz.shift[1] * size
        fw = fw * nz.scale
    talk = (0.5 + (nz.talk if nz else 0.0)) * np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) / 25.0 * t + rng.uniform(0, 6)), 0, 1)
    blink = np.zeros(num_frames)
    start = int(rng.integers(0, max(1, num_frames)))
    blink[start : start + 3] = (0.7, 1.0, 0.7)[: len(blink[start : start + 3])]
    if clip.task == "static":
        smile, brow, held_open, _ = STATIC_CLASSES[clip.label]
        wobble = _smooth_noise(rng, t, 0.1)
        smile_t, brow_t = np.full(num_frames, smile * clip.intensity) + wobble, np.full(num_frames, brow * clip.intensity)
        open_t = np.maximum(talk, held_open * clip.intensity)
    else:  # a smile (with a little brow lift) rises over ~a third of the clip, centred near the middle
        centre = num_frames * rng.uniform(0.4, 0.6)
        ramp = 2 * clip.intensity / (1 + np.exp(-(t - centre) / (num_frames / 10)))
        smile_t, brow_t, open_t = ramp, 0.15 * ramp, talk
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    noise_rng = np.random.default_rng([clip.seed, 0x6E6F])
    for i in range(num_frames):
        img = look["background"].copy()
        _draw_face(img, cx[i], cy[i], fw[i], look["skin"], look["hair"], look["shirt"], blink[i], open_t[i],
                   smile_t[i], brow_t[i])
        if nz is None:
            frames[i] = np.clip(img, 0, 255).astype(np.uint8)
            continue
        if nz.occluder is not None:  # a hand / object in front of part of the face, moving with it
            ox, oy, rx, ry, colour = nz.occluder
            _paint(img, cy[i] + oy * fw[i], cx[i] + ox * fw[i], ry * fw[i], rx * fw[i], colour, edge=1.5, shade=0.2)
        frames[i] = degrade(img, nz, (cx[i], cy[i]), noise_rng)
    if clip.task == "dynamic" and DYNAMIC_CLASSES[clip.label] == "offset":
        frames = frames[::-1].copy()  # the same frames, in the other order
    return frames


def write_expression_benchmark(out_dir: str | os.PathLike, task: str, *, num_frames: int = 16, size: int = 64,
                               framing: str = "face", fps: int = 25, seed: int = 0, **sizes) -> dict[str, Path]:
    """Write one task's clips to ``out_dir/videos/<split>/<name>.mp4`` (split: train, or test for the held-out
    identities) and its labels in MER2023's layout
    (``name,discrete,valence``): ``train-label.csv`` (train identities), ``test-label.csv`` (held-out identities)
    and ``clips.csv`` (every clip with identity, split, label, valence). Existing videos are kept (reruns reuse
    them). ``sizes``: identities, test_identities, clips_per_identity (see expression_benchmark)."""
    _check_size(size)
    out_dir = Path(out_dir)
    clips = expression_benchmark(task, seed=seed, **sizes)
    for clip in clips:
        path = out_dir / "videos" / clip.split / f"{clip.name}.mp4"
        if not path.is_file():
            write_video(path, render_expression_clip(clip, num_frames, size, framing, seed), fps)
    paths = {"videos": out_dir / "videos", "train": out_dir / "train-label.csv", "test": out_dir / "test-label.csv",
             "clips": out_dir / "clips.csv"}
    for split in ("train", "test"):
        with open(paths[split], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["name", "discrete", "valence"])
            w.writerows([c.name, c.label, c.valence] for c in clips if c.split == split)
    with open(paths["clips"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ExpressionClip.__dataclass_fields__))
        w.writeheader()
        w.writerows(dataclasses.asdict(c) for c in clips)
    return paths
