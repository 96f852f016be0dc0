#!/usr/bin/env bash
# The project as a user installs it: build the wheel, install it into a fresh virtual environment, and from a
# folder outside the checkout run every console script, list the shipped configs, pretrain 2 steps through
# `accelerate launch -m expmae.pretrain` with shipped configs and export the result. CI runs this (.ci/run).
#
#   bash tools/check_wheel.sh [PYTHON]     # PYTHON: an environment with the heavy dependencies (default .venv)
#
# The fresh environment reuses the heavy dependencies (torch, deepspeed, ...) of PYTHON's environment through a
# .pth path entry, so nothing is downloaded; expmae itself comes only from the wheel.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${1:-$REPO/.venv/bin/python}"
WORK="$(mktemp -d /tmp/expmae-wheel.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
say() { printf '[check_wheel] %s\n' "$*"; }

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

say "installing it into a fresh virtual environment"
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$SITE/heavy-deps.pth"
"$VPY" -m pip install --quiet --no-deps --no-index "$WHEEL"
# the reused dependencies' own console script that the commands below need, as pip would have written it
printf '#!%s\nimport sys\nfrom accelerate.commands.accelerate_cli import main\nsys.exit(main())\n' "$VPY" > "$WORK/venv/bin/accelerate"
chmod +x "$WORK/venv/bin/accelerate"

mkdir -p "$WORK/user" && cd "$WORK/user"   # no checkout on the path from here on
export PATH="$WORK/venv/bin:$PATH" CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 HF_HOME="$WORK/hf"
unset PYTHONPATH
"$VPY" - "$WORK/venv" <<'PY'
import sys, expmae
from importlib.metadata import version
assert expmae.__file__.startswith(sys.argv[1]), f"expmae imported from {expmae.__file__}, not the wheel"
assert version("expmae") == expmae.__version__, (version("expmae"), expmae.__version__)
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
expmae-finetune --list-configs | grep -q mer2023_attention

say "2-step pretraining from the installed package (shipped config tiny_demo)"
"$VPY" -c 'from expmae.synthetic import make_face_videos; make_face_videos("clips", n=16, num_frames=16, size=64, seed=0)'
accelerate launch -m expmae.pretrain --config tiny_demo data.source=clips train.max_steps=2 \
    train.output_dir=run log.recon_every=0 data.num_workers=0 > launch.log 2>&1 || { tail -40 launch.log; exit 1; }
ls run/checkpoints/step_0000002 >/dev/null
expmae-export run encoder >/dev/null
"$VPY" -c 'import expmae, torch; e = expmae.load_encoder("encoder"); print("[check_wheel] exported encoder:", type(e).__name__)'

say "the same on 2 DeepSpeed ranks with the shipped launcher config"
accelerate launch --config_file "$(expmae-configs path cpu_deepspeed_2proc)" -m expmae.pretrain --config tiny_demo \
    data.source=clips train.max_steps=2 train.output_dir=run2 log.recon_every=0 data.num_workers=0 \
    > launch2.log 2>&1 || { tail -40 launch2.log; exit 1; }
expmae-export run2 encoder2 >/dev/null
say "ok: expmae $VERSION works from its wheel"
