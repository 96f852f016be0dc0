import subprocess
import sys

import expmae


def test_version_is_exposed():
    assert isinstance(expmae.__version__, str) and expmae.__version__.count(".") >= 1


def test_package_import_is_light():
    """`import expmae` must not drag in deepspeed, facenet-pytorch or timm (slow, noisy imports)."""
    code = "import sys, expmae; heavy = [m for m in ('deepspeed', 'facenet_pytorch', 'timm', 'accelerate') if m in sys.modules]; print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_synthetic_video_fixture_round_trips_through_decord(make_video):
    import decord

    path = make_video(num_frames=10, size=64)
    vr = decord.VideoReader(str(path))
    assert len(vr) == 10
    assert vr[0].asnumpy().shape == (64, 64, 3)


# ------------------------------------------------------------------------------ installed-package surface

import configparser
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def console_scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = [line.strip() for line in cfg["options.entry_points"]["console_scripts"].splitlines() if line.strip()]
    return dict(line.split(" = ") for line in lines)


def run_entry(target: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    """Run a console script's entry point (``module:function``) as the installed script would."""
    module, function = target.split(":")
    code = f"import sys; from {module} import {function} as main; sys.argv[0] = 'prog'; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


@pytest.mark.parametrize("name", sorted(console_scripts()))
def test_every_console_script_prints_the_one_version(name):
    proc = run_entry(console_scripts()[name], "--version")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith(f"(expmae) {expmae.__version__}"), proc.stdout


def test_pretrain_module_prints_the_version_and_lists_its_shipped_configs():
    proc = subprocess.run([sys.executable, "-m", "expmae.pretrain", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith(expmae.__version__)
    listing = subprocess.run([sys.executable, "-m", "expmae.pretrain", "--list-configs"], capture_output=True,
                             text=True).stdout.split()
    assert {"tiny_demo", "vit_base_16x224", "deepspeed_zero2", "cpu_deepspeed_2proc"} <= set(listing)


def test_shipped_configs_resolve_by_name_from_any_folder(tmp_path):
    from expmae.config import load_config
    from expmae.shipped_configs import find_config, list_configs, resolve_config

    assert {"tiny_demo", "vit_base_16x224"} <= set(list_configs("pretrain"))
    assert "deepspeed_zero3" in list_configs("accelerate")
    path = resolve_config("tiny_demo", "pretrain")
    assert path == REPO / "expmae" / "pretrain" / "configs" / "tiny_demo.yaml"
    assert find_config("tiny_demo.yaml") == path
    assert load_config(path, ["data.source=x"]).model.name == "tiny"
    # a path wins over a name; a missing one is a one-line error naming what is shipped
    own = tmp_path / "tiny_demo.yaml"
    own.write_text("train:\n  batch_size: 3\n")
    assert resolve_config(own, "pretrain") == own
    with pytest.raises(FileNotFoundError) as info:
        resolve_config("vit_huge", "pretrain")
    assert "\n" not in str(info.value) and "vit_huge" in str(info.value) and "tiny_demo" in str(info.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_config(tmp_path / "missing.yaml", "pretrain")


def test_pretrain_cli_takes_a_shipped_name_and_names_a_bad_one(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "expmae.pretrain", "--check", "--config", "tiny_demo",
                         "data.source=/x", "train.batch_size=3"], capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0 and "batch_size: 3" in ok.stdout and "source: /x" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "expmae.pretrain", "--check", "--config", "tiny_dmeo"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "tiny_dmeo" in bad.stderr


def test_expmae_configs_lists_prints_paths_and_copies(tmp_path):
    target = console_scripts()["expmae-configs"]
    listing = run_entry(target).stdout
    assert "pretrain configs" in listing and "accelerate configs" in listing and "vit_base_16x224" in listing
    path = run_entry(target, "path", "deepspeed_zero2").stdout.strip()
    assert Path(path).read_text().count("zero_stage: 2") == 1
    copied = run_entry(target, "copy", "vit_base_16x224", cwd=tmp_path)
    assert copied.returncode == 0 and (tmp_path / "vit_base_16x224.yaml").read_text() == Path(
        run_entry(target, "path", "vit_base_16x224").stdout.strip()).read_text()
    again = run_entry(target, "copy", "vit_base_16x224", cwd=tmp_path)
    assert again.returncode == 2 and "exists" in again.stderr
    missing = run_entry(target, "path", "nope")
    assert missing.returncode == 2 and "no shipped config named 'nope'" in missing.stderr
