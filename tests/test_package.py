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
