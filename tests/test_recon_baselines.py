"""expmae.recon_baselines (trivial predictors in the model's loss space) and the demo's held-out reconstruction."""
import pytest
import torch

from conftest import TINY_PICTURES as TINY

from expmae.data import normalize_clips
from expmae.demo import heldout_recon
from expmae.model import create_model
from expmae.recon_baselines import baseline_losses, nearest_visible, predict
from expmae.visualize import reconstruction_loss, reconstruction_losses

CPU = torch.device("cpu")


def test_nearest_visible_in_a_frame_grid_by_hand():
    # 3 x 3 grid, visible: 0 at (0, 0) and 8 at (2, 2). Ties (4: 2 vs 2; 2, 6: 4 vs 4) go to the lower index, 0.
    mask = torch.ones(1, 9, dtype=torch.bool)
    mask[0, [0, 8]] = False
    assert nearest_visible(mask, (1, 3, 3)).tolist() == [[0, 0, 0, 0, 0, 8, 0, 8, 8]]


def test_nearest_visible_in_space_time_by_hand():
    # 2 x 2 x 2 tubelet grid (t, y, x), visible: 3 = (0, 1, 1) and 4 = (1, 0, 0).
    # 0 = (0, 0, 0): to 3 dy^2 + dx^2 = 2, to 4 dt^2 = 1 -> 4; 7 = (1, 1, 1): to 3 dt^2 = 1, to 4 2 -> 3; ...
    mask = torch.ones(1, 8, dtype=torch.bool)
    mask[0, [3, 4]] = False
    assert nearest_visible(mask, (2, 2, 2)).tolist() == [[4, 3, 3, 3, 4, 4, 4, 3]]
    # each sample uses its own mask
    both = torch.cat([mask, mask.roll(1, dims=1)])  # second: visible 4 = (1, 0, 0) and 5 = (1, 0, 1)
    assert nearest_visible(both, (2, 2, 2))[1].tolist() == [4, 5, 4, 5, 4, 5, 4, 5]


def test_nearest_visible_refuses_a_wrong_grid_and_a_fully_masked_sample():
    with pytest.raises(ValueError, match=r"grid \(1, 3, 3\) has 9"):
        nearest_visible(torch.zeros(1, 8, dtype=torch.bool), (1, 3, 3))
    with pytest.raises(ValueError, match="no visible token"):
        nearest_visible(torch.ones(2, 4, dtype=torch.bool), (1, 2, 2))


def test_predictions_copy_the_nearest_visible_rows_and_the_patch_mean_is_zero():
    target = torch.arange(9.0)[None, :, None].repeat(1, 1, 2)  # row i = (i, i)
    mask = torch.ones(1, 9, dtype=torch.bool)
    mask[0, [0, 8]] = False
    copied = predict(target, mask, (1, 3, 3), "copy_visible")
    assert copied[0, :, 0].tolist() == [0, 0, 0, 0, 8, 0, 8]  # masked tokens 1..7 in token order
    assert torch.equal(predict(target, mask, (1, 3, 3), "patch_mean"), torch.zeros(1, 7, 2))
    with pytest.raises(ValueError, match="predictor 'median'"):
        predict(target, mask, (1, 3, 3), "median")


def tiled_clips(batch=2):
    """uint8 clips (B, 3, 4, 64, 64) whose every patch (16 px) of every frame is the same random texture."""
    texture = torch.randint(0, 256, (batch, 3, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    return texture.repeat(1, 1, 4, 4, 4).to(torch.uint8)


def test_on_a_tiled_static_clip_copying_is_exact_and_the_patch_mean_scores_one_minus_one_over_d():
    """Every patch equal: a copied neighbour is the masked patch itself (loss 0); predicting the patch's mean leaves
    the normalised patch's mean square: (n - 1) / n of its unbiased variance 1 (n = 16 * 16 * 3 values per MAE
    patch, 2 * 16 * 16 per VideoMAE tubelet channel), up to the 1e-6 terms."""
    model = create_model("tiny", **TINY).eval()
    scored = reconstruction_losses(model, tiled_clips(), seed=0, draws=2, device=CPU,
                                   baselines=("patch_mean", "copy_visible"))
    assert scored["copy_visible"] == {"loss_mae": 0.0, "loss_video": 0.0, "loss": 0.0}
    patch_mean = scored["patch_mean"]
    assert patch_mean["loss_mae"] == pytest.approx(1 - 1 / 768, rel=1e-4)
    assert patch_mean["loss_video"] == pytest.approx(1 - 1 / 512, rel=1e-4)
    assert patch_mean["loss"] == pytest.approx(patch_mean["loss_mae"] + patch_mean["loss_video"], rel=1e-6)


def brute_force_copy_loss(target, mask, coords):
    """The copy-visible loss by a loop over masked tokens: nearest visible by squared distance, lowest index on ties."""
    errors = []
    for b in range(target.shape[0]):
        visible = [j for j in range(mask.shape[1]) if not mask[b, j]]
        for i in (i for i in range(mask.shape[1]) if mask[b, i]):
            j = min(visible, key=lambda j: (sum((coords[i][k] - coords[j][k]) ** 2 for k in range(3)), j))
            errors.append(((target[b, i] - target[b, j]) ** 2).mean())
    return float(torch.stack(errors).mean())


def test_baselines_use_the_models_masks_targets_and_loss_weights():
    model = create_model("tiny", **TINY, mae_loss_weight=0.5, video_loss_weight=2.0).eval()
    uint8 = torch.randint(0, 256, (3, 3, 4, 64, 64), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    clips = normalize_clips(uint8, dtype=torch.float32, mean=model.cfg.mean, std=model.cfg.std)
    with torch.no_grad():
        out = model(clips, generator=torch.Generator().manual_seed(5))
        mean_loss = baseline_losses(model, clips, out, "patch_mean")
        copy_loss = baseline_losses(model, clips, out, "copy_visible")
    frames = clips.transpose(1, 2)[torch.arange(3), out["frame_idx"]]
    mae_masked = model.mae_target(frames, out["mask_mae"].nonzero()[:, 1].reshape(3, -1))  # the model's own target
    assert float(mean_loss["loss_mae"]) == pytest.approx(float(mae_masked.square().mean()), rel=1e-6)
    assert float(mean_loss["loss"]) == pytest.approx(0.5 * float(mean_loss["loss_mae"]) + 2.0 * float(mean_loss["loss_video"]))
    frame_coords = [(0, i // 4, i % 4) for i in range(16)]
    tube_coords = [(i // 16, i // 4 % 4, i % 4) for i in range(32)]
    assert float(copy_loss["loss_mae"]) == pytest.approx(
        brute_force_copy_loss(model.mae_target(frames), out["mask_mae"], frame_coords), rel=1e-5)
    assert float(copy_loss["loss_video"]) == pytest.approx(
        brute_force_copy_loss(model.video_target(clips), out["mask_video"], tube_coords), rel=1e-5)


def test_the_trivial_predictors_need_normalised_pixel_targets():
    model = create_model("tiny", **TINY, norm_pix_loss=False).eval()
    clips = normalize_clips(tiled_clips(1), dtype=torch.float32)
    with torch.no_grad():
        out = model(clips)
    with pytest.raises(ValueError, match="norm_pix_loss=False"):
        baseline_losses(model, clips, out, "patch_mean")


def test_demo_heldout_recon_scores_four_predictors_on_the_same_mask_draws():
    torch.manual_seed(0)
    random_init = create_model("tiny", **TINY).eval()
    pretrained = create_model("tiny", **TINY).eval()
    with torch.no_grad():  # a model unlike its init
        for p_trained, p_init in zip(pretrained.parameters(), random_init.parameters()):
            p_trained.copy_(p_init + 0.05 * torch.randn_like(p_init))
    clips = torch.randint(0, 256, (2, 3, 4, 64, 64), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    recon = heldout_recon(pretrained, random_init, clips, draws=2, seed=3)
    assert list(recon) == ["random_init", "patch_mean", "copy_visible", "pretrained"]
    assert all(set(r) == {"loss", "loss_mae", "loss_video"} for r in recon.values())
    assert recon["random_init"] == reconstruction_loss(random_init, clips, seed=3, draws=2, device=CPU)
    assert recon["pretrained"] == reconstruction_loss(pretrained, clips, seed=3, draws=2, device=CPU)
    assert recon["pretrained"]["loss"] != recon["random_init"]["loss"]
    # the baselines depend on the masks only: scored beside the random-init model they are the same numbers
    beside_init = reconstruction_losses(random_init, clips, seed=3, draws=2, device=CPU,
                                        baselines=("patch_mean", "copy_visible"))
    assert recon["patch_mean"] == beside_init["patch_mean"] and recon["copy_visible"] == beside_init["copy_visible"]
    assert recon["copy_visible"]["loss"] != recon["patch_mean"]["loss"]
