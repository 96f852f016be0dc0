"""expmae.visualize / expmae-visualize: a pretraining checkpoint's reconstructions of face clips as a PNG grid."""
import json

import numpy as np
import pytest
import torch

from conftest import TINY_PICTURES as TINY
from conftest import write_checkpoint

from expmae.checkpoint import MODEL_CONFIG_NAME
from expmae.data import VideoClipDataset, normalize_clips
from expmae.model import create_model
from expmae.visualize import main, reconstruction_grid, reconstruction_losses



def read_png(path):
    from PIL import Image

    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


def test_cli_grid_is_the_checkpoints_model_on_the_centre_views(tmp_path, make_video, capsys):
    torch.manual_seed(0)
    model = create_model("tiny", **TINY).eval()
    with torch.no_grad():  # a model unlike a fresh init, so a grid of unloaded weights would differ
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run = write_checkpoint(tmp_path / "run", model).parents[1]  # the run folder: its newest checkpoint is read
    videos = [make_video(f"clip{i}.mp4", num_frames=12, size=64, seed=i) for i in range(3)]
    out = tmp_path / "recon" / "grid.png"
    assert main([str(run), *map(str, videos), "--out", str(out), "--num-clips", "2", "--seed", "3",
                 "--sample-stride", "2", "--device", "cpu", "--loss-draws", "2", "--baselines"]) == 0
    printed = capsys.readouterr().out
    assert f"{out}: 2 clips reconstructed by" in printed and "at step 7" in printed

    # the oracle: the in-memory model on the first two clips' evaluation views, same seed
    views = VideoClipDataset([str(v) for v in videos[:2]], 4, 2, 64, train=False)
    clips = torch.stack([views.transform(views.load_frames(i, None), None) for i in range(2)])
    expected = reconstruction_grid(model, clips, seed=3, device=torch.device("cpu"))
    png = read_png(out)
    assert png.shape == expected.shape  # 2 clips x (1 MAE row + 3 VideoMAE rows), 64 px upscaled to 128
    assert expected.shape[1] == 2 * 4 * (128 + 2) + 2
    torch.testing.assert_close(png, (expected * 255).round() / 255, atol=1 / 255 + 1e-6, rtol=0)
    # --loss-draws 2: the mean of the model's losses under mask seeds 3 and 4, on the same views
    losses = json.loads(printed.strip().splitlines()[-1])
    with torch.no_grad():
        draws = [model(normalize_clips(clips), generator=torch.Generator().manual_seed(s)) for s in (3, 4)]
    assert losses["clips"] == 2 and losses["draws"] == 2 and losses["step"] == 7
    for key in ("loss", "loss_mae", "loss_video"):
        assert losses[key] == pytest.approx(sum(float(d[key]) for d in draws) / 2, abs=1e-5)
    assert float(draws[0]["loss"]) != float(draws[1]["loss"])  # the draws differ: the mean is of two mask draws
    # --baselines: the trivial predictors on those same draws
    baselines = reconstruction_losses(model, clips, seed=3, draws=2, device=torch.device("cpu"),
                                      baselines=("patch_mean", "copy_visible"))
    for name in ("patch_mean", "copy_visible"):
        assert losses[name] == pytest.approx(baselines[name], abs=1e-5)


def test_unreadable_clips_are_skipped_and_none_readable_fails_in_one_line(tmp_path, make_video, capsys):
    run = write_checkpoint(tmp_path / "run", create_model("tiny", **TINY))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    good = make_video("good.mp4", num_frames=12, size=64)
    out = tmp_path / "grid.png"
    assert main([str(run), str(broken), str(good), "--out", str(out), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert f"skipping {broken}" in captured.err and "1 clips reconstructed" in captured.out and out.is_file()

    with pytest.raises(SystemExit) as err:
        main([str(run), str(broken), "--out", str(tmp_path / "none.png"), "--device", "cpu"])
    assert str(err.value) == "expmae-visualize: none of the 1 inputs could be read as a clip"
    assert not (tmp_path / "none.png").exists()


@pytest.mark.parametrize("argv_tail, message", [
    (["--num-clips", "0"], "--num-clips 0: expected >= 1"),
    (["--sample-stride", "0"], "--sample-stride 0: expected >= 1"),
    (["--loss-draws", "-1"], "--loss-draws -1: expected >= 0"),
    (["--baselines"], "--baselines: expected with --loss-draws N (the baselines are scored on its mask draws)"),
])
def test_bad_arguments_fail_in_one_line(tmp_path, argv_tail, message):
    with pytest.raises(SystemExit) as err:
        main([str(tmp_path), "x.mp4", "--out", str(tmp_path / "g.png"), *argv_tail])
    assert str(err.value) == message


def test_missing_checkpoint_and_mismatched_weights_fail_in_one_line(tmp_path, make_video):
    video = make_video("v.mp4", num_frames=12, size=64)
    with pytest.raises(SystemExit) as err:
        main([str(tmp_path / "nowhere"), str(video), "--out", str(tmp_path / "g.png")])
    assert "nowhere: no such file or folder" in str(err.value) and "\n" not in str(err.value)

    run = write_checkpoint(tmp_path / "run", create_model("tiny", **TINY))  # then claim the weights are of a MAE-only model
    config = run / MODEL_CONFIG_NAME
    config.write_text(json.dumps({**json.loads(config.read_text()), "mode": "mae"}))
    with pytest.raises(SystemExit) as err:
        main([str(run), str(video), "--out", str(tmp_path / "g.png"), "--device", "cpu"])
    assert "weights do not match its model config (mode=mae)" in str(err.value) and "\n" not in str(err.value)
