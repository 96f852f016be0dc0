#!/usr/bin/env bash
# One GPU check, at most 8 minutes on one GPU: what the CPU tests cannot show (README, "Throughput").
#
#   tools/gpu_check.sh [--out DIR] [--dry-run]
#
#   1. bench_pretrain --device cuda   the expMAE step alone: clips/s, MFU, peak memory (ViT-B 16x224, bf16)
#   2. bench_data --device cuda       loader (clips/s per core, device augmentation), demand, pipeline
#   2b. bench_data --only crop        crop settings, and today's per-video crop vs the pipelined job of one process
#                                     (the one of each GPU under accelerate launch): frames/s per GPU and per core
#   3. device augmentation on CUDA    expmae.data_resample.augment_on_device gives the CPU path's bytes
#   4. pretraining                    ~100 steps of 1-GPU DeepSpeed ZeRO-2 bf16, ViT-B 16x224, on synthetic face
#                                     clips, through `accelerate launch` (4 samples per decode, device augmentation)
#   5. export + features              expmae-export of that run, expmae-features video on CUDA
#
# Prints one JSON summary on stdout (also $OUT/summary.json): the step's clips/s, MFU and peak memory, the
# training run's clips/s, MFU, peak memory and data wait. Each step's log is $OUT/<step>.log.
# --dry-run: the same steps on the CPU at toy sizes (2 DeepSpeed CPU ranks, fp32) in a few minutes: what CI runs.
# Missing packages are installed from the project's own setup.cfg (pip install -e .); set WHEELHOUSE=DIR to
# install from a folder of wheels on a machine without a package index.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
# The training entry point, in one place (the loop lives in the library).
TRAIN_ENTRY=(-m expmae.pretrain)

DRY_RUN=0
OUT="$REPO/runs/gpu_check"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --out) OUT="$(mkdir -p "$2" && cd "$2" && pwd)"; shift 2 ;;
    -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (expected --out DIR, --dry-run)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
rm -f "$OUT"/bench_pretrain.jsonl "$OUT"/bench_data.jsonl "$OUT"/bench_crop.jsonl  # the benchmarks append: start afresh
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS="ignore::FutureWarning"
say() { echo "[gpu_check] $*" >&2; }
step() {  # step NAME CMD...: run, log to $OUT/NAME.log, stop with the log's tail on failure
  local name="$1"; shift
  say "$name: $*"
  local t0=$SECONDS
  if ! "$@" >"$OUT/$name.log" 2>&1; then
    tail -n 30 "$OUT/$name.log" >&2
    say "$name failed (log: $OUT/$name.log)"
    exit 1
  fi
  say "$name: done in $((SECONDS - t0)) s"
}

# ---- 0. what the machine lacks, from the project's own files
if ! "$PY" -c "import expmae, torch, timm, accelerate, deepspeed, decord, transformers, tensorboard, av, yaml" >/dev/null 2>&1; then
  say "installing the project's dependencies (setup.cfg)"
  "$PY" -m pip install -q ${WHEELHOUSE:+--no-index --find-links "$WHEELHOUSE"} -e "$REPO"
fi

if [[ $DRY_RUN == 1 ]]; then
  export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  DEVICE=cpu
  ACCELERATE_CONFIG=pretrain/configs/accelerate/cpu_deepspeed_2proc.yaml
  PRECISION=no
  BENCH_PRETRAIN=(--quick --configs expmae)
  BENCH_DATA=(--quick --workers 0 --samples 8 --repeated-samples 2 --augment-on device)
  BENCH_CROP=(--quick)
  CLIPS=(8 12 64)  # videos, frames, size
  TRAIN=(--config pretrain/configs/tiny_demo.yaml model.img_size=32 model.num_frames=4 model.depth=2
         data.num_workers=1 data.sample_stride=2 data.repeated_samples=2 train.batch_size=2 train.max_steps=4
         train.warmup_steps=1 log.log_every=2)
  FEATURES=(--batch-size 2 --max-clips 2)
else
  DEVICE=cuda
  ACCELERATE_CONFIG=pretrain/configs/accelerate/deepspeed_zero2.yaml
  PRECISION=bf16
  BENCH_PRETRAIN=(--configs expmae,videomae)
  BENCH_DATA=(--workers 8 --repeated-samples 4 --augment-on device)
  BENCH_CROP=(--videos 16 --frames 192)  # 16 x 192 frames at 224 px, twice each way: a few seconds of GPU time per way
  CLIPS=(64 96 224)
  TRAIN=(--config pretrain/configs/vit_base_16x224.yaml data.num_workers=8 data.repeated_samples=4 train.batch_size=32
         train.max_steps=100 train.warmup_steps=10 log.log_every=10)
  FEATURES=(--batch-size 16 --max-clips 4 --dtype bfloat16)
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run with --dry-run on a CPU')"
fi

# ---- 1-3. benchmarks and the device augmentation check
step bench_pretrain "$PY" tools/bench_pretrain.py --device "$DEVICE" "${BENCH_PRETRAIN[@]}" --out "$OUT/bench_pretrain.jsonl"
step bench_data "$PY" tools/bench_data.py --device "$DEVICE" --synthetic --only loader,pipeline "${BENCH_DATA[@]}" \
  --out "$OUT/bench_data.jsonl"
step bench_crop "$PY" tools/bench_data.py --device "$DEVICE" --synthetic --only crop "${BENCH_CROP[@]}" --out "$OUT/bench_crop.jsonl"
step augment_check "$PY" - "$DEVICE" "$OUT/augment_check.json" <<'EOF'
import json, sys
import numpy as np, torch
from expmae.data import crop_resize_frames, multi_scale_crop_box
from expmae.data_resample import augment_on_device
device, out = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
frames = rng.integers(0, 256, (32, 224, 224, 3), dtype=np.uint8)
index = rng.integers(0, 32, (64, 16))  # 64 samples of 16 frames
boxes = [multi_scale_crop_box(224, 224, 224, rng) for _ in range(64)]
flips = [bool(f) for f in rng.integers(0, 2, 64)]
cpu = torch.stack([crop_resize_frames(frames[i], b, 224, f) for i, b, f in zip(index, boxes, flips)])
batch = {"frames": torch.from_numpy(frames), "frame_index": torch.from_numpy(index),
         "box": torch.tensor(boxes), "flip": torch.tensor(flips)}
dev = augment_on_device({k: v.to(device) for k, v in batch.items()}, 224).cpu()
diff = (dev.int() - cpu.int()).abs()
result = {"device": device, "samples": 64, "equal": bool(torch.equal(dev, cpu)), "max_abs_diff": int(diff.max()),
          "fraction_different": float((diff > 0).float().mean())}
json.dump(result, open(out, "w"))
print(json.dumps(result))
sys.exit(0 if result["equal"] else 1)
EOF

# ---- 4. pretraining on synthetic face clips
step clips "$PY" - "$OUT/clips" "${CLIPS[@]}" <<'EOF'
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from expmae.synthetic import make_face_videos
out, n, frames, size = Path(sys.argv[1]), *map(int, sys.argv[2:5])
with ProcessPoolExecutor() as pool:  # one folder per video: make_face_videos names its files face_000.mp4, ...
    paths = list(pool.map(make_face_videos, [out / f"s{i:03d}" for i in range(n)], [1] * n, [frames] * n,
                          [size] * n, [25] * n, range(n)))
print(f"{sum(len(p) for p in paths)} synthetic face clips of {frames} frames at {size} px in {out}")
EOF
rm -rf "$OUT/run"
PORT="$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")"
step train "$PY" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" --num_processes "$([[ $DRY_RUN == 1 ]] && echo 2 || echo 1)" \
  --mixed_precision "$PRECISION" --main_process_port "$PORT" "${TRAIN_ENTRY[@]}" "${TRAIN[@]}" \
  data.source="$OUT/clips" data.augment_on=device train.output_dir="$OUT/run" \
  log.recon_every=0 checkpoint.every=1000

# ---- 5. export and features
step export "$PY" -m expmae.export "$OUT/run" "$OUT/encoder" --overwrite
step features "$PY" -m expmae.features.cli video "$OUT/clips/s000" "$OUT/features" --model "$OUT/encoder" \
  --device "$DEVICE" --no-progress "${FEATURES[@]}"

# ---- the summary
"$PY" - "$OUT" "$DRY_RUN" <<'EOF' | tee "$OUT/summary.json"
import json, sys
from pathlib import Path
out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
lines = lambda name: [json.loads(l) for l in (out / name).read_text().splitlines() if l.strip()]
def scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    # the first logging interval holds start-up (compilation, worker start, cudnn autotune): left out when there are more
    values = {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return {tag: sum(v[1:] or v) / len(v[1:] or v) for tag, v in values.items()}
perf = scalars(out / "run" / "tensorboard")
metrics = [r for r in lines("run/metrics.jsonl") if "loss" in r]
pretrain = {r["config"]: r for r in lines("bench_pretrain.jsonl") if "config" in r}
data = lines("bench_data.jsonl")
pick = lambda kind: [r for r in data if r["bench"] == kind]
crop = lines("bench_crop.jsonl")
(cp,) = [r for r in crop if r["bench"] == "crop_pipeline"]
keep = lambda r, keys: {k: r.get(k) for k in keys}
summary = {
    "dry_run": dry,
    "bench_pretrain": {name: keep(r, ("clips_per_s", "mfu", "peak_memory_mb", "median_step_ms", "batch_size", "dtype"))
                       for name, r in pretrain.items()},
    "bench_data": {"loader_best_per_core": max((r["clips_per_s_per_core"] for r in pick("loader")), default=None),
                   "demand": [keep(r, ("demand_clips_per_s", "cores_per_gpu_needed", "best_loader")) for r in pick("demand")],
                   "pipeline": [keep(r, ("workers", "step_clips_per_s", "loader_clips_per_s", "pipeline_clips_per_s",
                                         "data_wait_fraction", "bottleneck")) for r in pick("pipeline")]},
    "bench_crop": {"settings_frames_per_s": {r["setting"]: r["frames_per_s"] for r in crop if r["bench"] == "crop"},
                   **keep(cp, ("device", "frames_per_s_per_gpu", "per_core_ratio", "same_output")),
                   "today_frames_per_core_s": cp["today"]["frames_per_core_s"],
                   "pipelined_frames_per_core_s": cp["pipelined"]["frames_per_core_s"]},
    "augment_on_device_equals_cpu": json.loads((out / "augment_check.json").read_text()),
    "train": {"steps": metrics[-1]["step"], "first_loss": metrics[0]["loss"], "last_loss": metrics[-1]["loss"],
              "clips_per_s": perf.get("perf/clips_per_s"), "mfu": perf.get("perf/mfu"),
              "peak_mem_gib": perf.get("perf/gpu_mem_peak_gib"), "data_wait_fraction": perf.get("perf/data_wait_frac")},
    "export": sorted(p.name for p in (out / "encoder").iterdir()),
    "features": len(list((out / "features").rglob("*.npy"))),
}
print(json.dumps(summary, indent=1))
EOF
