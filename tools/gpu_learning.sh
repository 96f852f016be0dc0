#!/usr/bin/env bash
# One GPU call answers the seed's Table 1: does pretraining beat random init on the learning benchmark, per mode?
#
#   tools/gpu_learning.sh [--out DIR] [--dry-run]
#
# On one GPU, at most ~6 minutes including its data (an estimate from CPU measurements: never timed on a GPU yet):
#   1. renders the learning benchmark (expmae.learning_benchmark: 4,000 unlabelled pool clips of other people,
#      1,888 labelled clips split by identity) with every CPU core;
#   2. pretrains expmae, mae and videomae (config learning_small, batch 256, 1,500 steps = 384k samples = 96 passes
#      over the pool: the published regime of hundreds of epochs, not the CPU's), 4 samples per decoded clip with
#      the augmentation on the GPU, with online evaluation at steps 0, 500, 1000, 1500;
#   3. the references: the random-init encoder over 8 init seeds, raw pixels, and end to end (1,500 steps of batch
#      32 each): the encoder from scratch, a frame CNN, and each mode's pretrained encoder finetuned (--finetune);
#   4. prints the Table-1-shaped table (table.md) and a JSON summary; curve_<task>.png has the curves.
# --dry-run: the same steps on the CPU at toy size (tools/learning_curve.py --quick): what CI runs.
# Missing packages are installed from the project's own setup.cfg; set WHEELHOUSE=DIR to install from a folder of
# wheels on a machine without a package index (as tools/gpu_check.sh).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
DRY_RUN=0
OUT="$REPO/runs/gpu_learning"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --out) OUT="$(mkdir -p "$2" && cd "$2" && pwd)"; shift 2 ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_learning.sh: unknown argument '$1' (expected --out DIR, --dry-run)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS="ignore::FutureWarning"

if ! "$PY" -c "import expmae, torch, timm, accelerate, deepspeed, decord, av, sklearn, yaml, matplotlib" >/dev/null 2>&1; then
  echo "[gpu_learning] installing the project's dependencies (setup.cfg)" >&2
  "$PY" -m pip install -q ${WHEELHOUSE:+--no-index --find-links "$WHEELHOUSE"} -e "$REPO"
fi

if [[ $DRY_RUN == 1 ]]; then
  export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  STUDY=(--quick --modes expmae,mae,videomae --finetune)
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run with --dry-run on a CPU')"
  CORES="$(nproc)"
  STUDY=(--modes expmae,mae,videomae --steps 1500 --batch-size 256 --eval-every 500 --layers=-1,2 --random-seeds 8
         --supervised-steps 1500 --cnn-steps 1500 --finetune --workers "$CORES" data.num_workers="$(( CORES > 12 ? 12 : CORES ))"
         data.repeated_samples=4 data.augment_on=device log.log_every=50)
fi

t0=$SECONDS
"$PY" tools/learning_curve.py --out "$OUT" "${STUDY[@]}" >&2
cat "$OUT/table.md" >&2
"$PY" - "$OUT" "$DRY_RUN" "$((SECONDS - t0))" <<'PY' | tee "$OUT/summary.json"
import json, sys
from pathlib import Path
out, dry, seconds = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
study = json.loads((out / "curves.json").read_text())
table = {}
for task, per in study["summary"].items():
    for probe, entry in per.items():
        row = {"random_init": entry["random_init"]["mean"], "random_init_max": entry["random_init"]["max"],
               "pixels": entry["pixels"], "supervised": entry["supervised"],
               "end_to_end": entry["end_to_end"], "ceiling_margin": entry.get("ceiling_margin"),
               "held_out": entry["held_out"]}
        row.update({mode: curve["last"] for mode, curve in entry["modes"].items()})
        row["leaves_random_band_at_samples"] = {mode: c["leaves_band_at"] for mode, c in entry["modes"].items()}
        table[f"{task}/{probe}"] = row
print(json.dumps({"dry_run": dry, "seconds": seconds, "headline_layer": study["headline_layer"],
                  "samples_per_step": study["samples_per_step"], "table": table}, indent=1))
PY
