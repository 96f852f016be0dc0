#!/usr/bin/env bash
# The project as a user installs it: build the wheel, `pip install` it into a fresh virtual environment with
# exactly its declared dependencies (no extras: the tts stack stays out, and nothing of the development
# environment is visible), then from a folder outside the checkout run every console script, list the shipped
# configs, pretrain 2 steps through `accelerate launch -m expmae.pretrain` and export, crop a synthetic video with
# expmae-crop, and run expmae-demo (2 DeepSpeed ranks with the shipped launcher config, features, finetune).
# CI runs this (.ci/run).
#
#   bash tools/check_wheel.sh [PYTHON]     # PYTHON builds the wheel and makes the venv (default .venv's)
#
# Dependencies come from the package index pip is configured with. torch and torchvision are pinned to the build
# this machine holds on local disk (EXPMAE_TORCH_SPEC overrides; "" lets pip pick what setup.cfg allows).
# pip's cache (~/.cache/pip, or PIP_CACHE_DIR) keeps downloads and the wheel it builds for deepspeed (an sdist),
# so a second run downloads and builds nothing; keep that folder between CI runs to save the downloads. What stays
# is unpacking about 6 GB (torch's CUDA build and its nvidia libraries) into the fresh venv.
# Measured on the 2-core machine with other jobs running (2026-12-07, three runs): install 2.8-4.5 min (no faster
# with a warm cache: here every file comes from local disk), the whole script 13.9 and 19.7 min, of which the demo
# 9.6 and 13.7 min (it takes about 2.5 min on an idle machine).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${1:-$REPO/.venv/bin/python}"
TORCH_SPEC="${EXPMAE_TORCH_SPEC-torch==2.14.1 torchvision==0.29.1}"
WORK="$(mktemp -d /tmp/expmae-wheel.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
say() { printf '[check_wheel %4ss] %s\n' "$SECONDS" "$*"; }

say "building the wheel"
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$WORK/dist" "$REPO" >/dev/null
WHEEL="$(ls "$WORK"/dist/expmae-*.whl)"
VERSION="$(basename "$WHEEL" | cut -d- -f2)"   # setup.cfg reads it from expmae.__version__ (the one place)
"$PY" - "$WHEEL" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["expmae/pretrain/configs/tiny_demo.yaml", "expmae/pretrain/configs/vit_base_16x224.yaml",
        "expmae/pretrain/configs/accelerate/deepspeed_zero2.yaml", "expmae/pretrain/configs/accelerate/cpu_deepspeed_2proc.yaml",
        "expmae/finetune/configs/mer2023_attention.yaml", "expmae/finetune/configs/dfew_uar.yaml"]
missing = [n for n in need if n not in names]
licence = [n for n in names if n.endswith("LICENSE")]
assert not missing, f"the wheel lacks {missing}"
assert licence, "the wheel carries no LICENSE"
print(f"[check_wheel] {sys.argv[1].rsplit('/', 1)[-1]}: {len(names)} files, configs and LICENSE present")
PY

say "installing it with its declared dependencies into a fresh virtual environment ($TORCH_SPEC)"
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
# shellcheck disable=SC2086 # TORCH_SPEC is a list of requirements
# (the filter drops pip's notes on index folders this machine's pip configuration names but lacks)
"$VPY" -m pip install --quiet "$WHEEL" $TORCH_SPEC 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
"$VPY" -m pip check
say "installed: $("$VPY" -m pip list --format=freeze 2>/dev/null | wc -l) distributions"

mkdir -p "$WORK/user" && cd "$WORK/user"   # no checkout on the path from here on
export PATH="$WORK/venv/bin:$PATH" CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 HF_HOME="$WORK/hf" \
  TORCH_EXTENSIONS_DIR="$WORK/torch_extensions"  # its own DeepSpeed op build: sharing the cache with .venv made the suite rebuild it
unset PYTHONPATH
"$VPY" - "$WORK/venv" <<'PY'
import importlib.util, sys, expmae
from importlib.metadata import version
assert expmae.__file__.startswith(sys.argv[1]), f"expmae imported from {expmae.__file__}, not the wheel"
assert version("expmae") == expmae.__version__, (version("expmae"), expmae.__version__)
extras = [m for m in ("TTS", "pytest") if importlib.util.find_spec(m)]
assert not extras, f"the fresh environment has {extras}: an extra leaked into the core install"
PY

SCRIPTS="$("$VPY" -c 'from importlib.metadata import entry_points; print(" ".join(sorted({e.name for e in entry_points(group="console_scripts") if e.value.startswith("expmae")})))')"
say "console scripts: $SCRIPTS"
for s in $SCRIPTS; do
    "$s" --help >/dev/null
    got="$("$s" --version)"
    [[ "$got" == *" $VERSION" ]] || { echo "$s --version says '$got', setup.cfg says $VERSION" >&2; exit 1; }
done
expmae-configs --list-configs
"$VPY" -m expmae.pretrain --list-configs >/dev/null
expmae-finetune --list-configs | grep mer2023_attention >/dev/null  # not -q: an early exit breaks the pipe

say "expmae-crop on synthetic face videos (written by this environment's PyAV)"
"$VPY" -c 'from expmae.synthetic import make_face_videos; make_face_videos("videos", n=2, num_frames=16, size=128, seed=0)'
expmae-crop videos crops --size 64 --workers 1 --quiet || { cat crops/failures.jsonl >&2 || true; exit 1; }
[[ "$(find crops -name '*.mp4' | wc -l)" == 2 ]] || { echo "expmae-crop wrote $(find crops -name '*.mp4' | wc -l) clips, expected 2" >&2; exit 1; }

say "2-step pretraining from the installed package (shipped config tiny_demo, the accelerate console script)"
"$VPY" -c 'from expmae.synthetic import make_face_videos; make_face_videos("clips", n=16, num_frames=16, size=64, seed=0)'
accelerate launch -m expmae.pretrain --config tiny_demo data.source=clips train.max_steps=2 \
    train.output_dir=run log.recon_every=0 data.num_workers=0 > launch.log 2>&1 || { tail -40 launch.log; exit 1; }
ls run/checkpoints/step_0000002 >/dev/null
expmae-export run encoder >/dev/null
"$VPY" -c 'import expmae, torch; e = expmae.load_encoder("encoder"); print("[check_wheel] exported encoder:", type(e).__name__)'

# The demo's pretraining is the 2-rank DeepSpeed launch with the shipped cpu_deepspeed_2proc config.
say "expmae-demo (crop, 2 DeepSpeed ranks, export, features, finetune)"
expmae-demo --out demo > demo.log 2>&1 || { tail -60 demo.log; exit 1; }
"$VPY" - <<'PY'
import json
summary = json.load(open("demo/summary.json"))
missing = [k for k in ("probe", "metric") if set(summary.get(k, {})) != {"random_init", "pretrained"}]
recon = {"random_init", "patch_mean", "copy_visible", "pretrained"}
missing += ["heldout_recon"] if set(summary.get("heldout_recon", {})) != recon else []
assert not missing, f"demo/summary.json lacks {missing}: {sorted(summary)}"
PY
sed -n '/held-out identities:$/,/pretrained beats random init/p' demo.log
say "ok: expmae $VERSION works from its wheel with its declared dependencies"
