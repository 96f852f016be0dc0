"""Weights in and out, exactly: transformers VideoMAE / ViTMAE folders (random init, saved to tmp folders) and
official VideoMAE .pth files into expMAE and back out to transformers, against transformers itself as the oracle.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from expmae.export import init_from, load_encoder, load_pretrained_weights, main
from expmae.model import ExpMAE, ExpMAEConfig, create_model, tube_masking
from expmae.pos_embed import get_2d_sincos_pos_embed
from expmae.weights import read_source

transformers = pytest.importorskip("transformers")

# 32 px, patch 8 (16 patches), 4 frames, tubelet 2: 32 tubelets; width 48, 2 blocks; decoder 32 wide, 2 blocks.
VIDEOMAE = dict(image_size=32, patch_size=8, num_channels=3, num_frames=4, tubelet_size=2, hidden_size=48,
                num_hidden_layers=2, num_attention_heads=3, intermediate_size=192, decoder_hidden_size=32,
                decoder_num_hidden_layers=2, decoder_num_attention_heads=4, decoder_intermediate_size=128,
                use_mean_pooling=False, norm_pix_loss=True)
VITMAE = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
              intermediate_size=192, decoder_hidden_size=32, decoder_num_hidden_layers=1,
              decoder_num_attention_heads=4, decoder_intermediate_size=128,
              layer_norm_eps=1e-6)  # MAE's own eps, and expMAE's (transformers' ViTMAE default is 1e-12)


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Move every parameter off its init (norms at 1 / 0, biases at 0) so that the comparison exercises it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def clips(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 4, 32, 32, generator=torch.Generator().manual_seed(seed))  # (B, C, T, H, W)


def one_line(excinfo) -> str:
    assert "\n" not in str(excinfo.value), str(excinfo.value)
    return str(excinfo.value)


@pytest.fixture(scope="module")
def videomae_folder(tmp_path_factory) -> Path:
    """A transformers VideoMAEForPreTraining folder (config.json + model.safetensors), as save_pretrained writes."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf") / "videomae-pretrain"
    model = transformers.VideoMAEForPreTraining(transformers.VideoMAEConfig(**VIDEOMAE))
    perturb_(model).save_pretrained(folder)
    return folder


def hf_encoder(folder) -> torch.nn.Module:
    return transformers.VideoMAEModel.from_pretrained(str(folder)).eval()


# ---- transformers VideoMAE in --------------------------------------------------------------------------------
def test_videomae_folder_exports_with_its_own_size_and_matches_transformers(videomae_folder, tmp_path, capsys):
    assert main([str(videomae_folder), str(tmp_path / "enc")]) == 0  # no --model, no --set
    summary = json.loads(capsys.readouterr().out)
    assert summary["import"]["layout"] == "transformers-videomae"
    assert summary["import"]["position_code"] == "videomae"
    encoder = load_encoder(tmp_path / "enc")
    assert (encoder.cfg.embed_dim, encoder.cfg.depth, encoder.cfg.position_code) == (48, 2, "videomae")
    x = clips()
    with torch.no_grad():
        ours = encoder.forward_clips(x)
        ref = hf_encoder(videomae_folder)(x.transpose(1, 2)).last_hidden_state  # transformers: (B, T, C, H, W)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert (ours - ref).abs().max() < 1e-4 and ref.abs().mean() > 0.1  # a real signal, not zeros


def test_videomae_loss_matches_videomae_for_pretraining(videomae_folder):
    """Same folder, same clips, same tube mask: ExpMAE(mode=videomae, position_code=videomae) gives transformers'
    VideoMAEForPreTraining loss and logits, with the decoder imported too; nothing of transformers is touched."""
    cfg = ExpMAEConfig(**read_source(videomae_folder).config)
    assert (cfg.mode, cfg.position_code, cfg.video_decoder_embed_dim) == ("videomae", "videomae", 32)
    model = ExpMAE(cfg).eval()
    report = load_pretrained_weights(model, videomae_folder)
    assert report.decoders == {"video_decoder": "loaded"} and report.missing == [] and report.unexpected == []
    hf = transformers.VideoMAEForPreTraining.from_pretrained(str(videomae_folder)).eval()
    x = clips(batch=3)
    mask = tube_masking(3, 2, 16, 0.75, generator=torch.Generator().manual_seed(0)).mask
    with torch.no_grad():
        ours = model(x, mask_video=mask)
        ref = hf(x.transpose(1, 2), bool_masked_pos=mask)
    torch.testing.assert_close(ours["loss_video"], ref.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["pred_video"], ref.logits, atol=1e-4, rtol=0)


def test_hf_export_loads_strictly_and_round_trips(videomae_folder, tmp_path, capsys):
    assert main([str(videomae_folder), str(tmp_path / "enc"), "--hf"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["verify"]["hf_max_abs_diff"] < 1e-4
    out = tmp_path / "enc" / "hf"
    model, info = transformers.VideoMAEModel.from_pretrained(str(out), output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    x = clips()
    encoder = load_encoder(tmp_path / "enc")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x.transpose(1, 2)).last_hidden_state, encoder.forward_clips(x),
                                   atol=1e-4, rtol=0)
    # transformers -> expmae -> transformers: the original tensors, exactly
    original = hf_encoder(videomae_folder).state_dict()
    back = model.state_dict()
    assert set(back) == set(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key
    # a classifier from it: only the fresh head is missing
    _, info = transformers.VideoMAEForVideoClassification.from_pretrained(str(out), num_labels=3,
                                                                           output_loading_info=True)
    assert {k.split(".")[0] for k in info["missing_keys"]} == {"classifier"} and not info["unexpected_keys"]
    # the model card
    card = (out / "README.md").read_text()
    for fragment in (str(videomae_folder.resolve()), "VideoMAEModel.from_pretrained", "timm.create_model",
                     "expmae.load_encoder", '"position_code": "videomae"', '"embed_dim": 48'):
        assert fragment in card, fragment


def test_hf_export_of_a_separable_encoder_is_a_one_line_error(tmp_path, capsys):
    from expmae.export import save_encoder

    save_encoder(create_model("tiny", img_size=32, patch_size=8, num_frames=4, depth=1), tmp_path / "enc")
    assert main([str(tmp_path / "enc"), str(tmp_path / "out"), "--hf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "position_code='separable'" in err[0] and "transformers" in err[0]
    assert not (tmp_path / "out").exists()


def test_position_code_mismatch_is_a_one_line_error_before_training(videomae_folder):
    model = create_model("tiny", img_size=32, patch_size=8, num_frames=4, embed_dim=48, depth=2, num_heads=3)
    with pytest.raises(ValueError) as err:
        init_from(model, videomae_folder)
    message = one_line(err)
    assert "position_code='videomae'" in message and "position_code='separable'" in message
    assert "set model.position_code=videomae" in message
    model = create_model("tiny", img_size=32, patch_size=8, num_frames=4, embed_dim=48, depth=2, num_heads=3,
                         video_decoder_embed_dim=32, video_decoder_depth=2, video_decoder_num_heads=4,
                         position_code="videomae")
    note = init_from(model, videomae_folder)
    assert "transformers-videomae layout" in note and "video_decoder from it too" in note
    assert note.endswith("; mae_decoder freshly initialised")


# ---- official VideoMAE .pth, built from the transformers model by the known key map ------------------------------
def official_videomae_state(hf_state: dict, depth: int, decoder_depth: int) -> dict:
    """transformers' convert_videomae_to_pytorch.py, run backwards: VideoMAEForPreTraining keys -> the
    MCG-NJU/VideoMAE PretrainVisionTransformer keys (qkv fused without bias, q_bias / v_bias separate)."""
    out = {"encoder.patch_embed.proj.weight": hf_state["videomae.embeddings.patch_embeddings.projection.weight"],
           "encoder.patch_embed.proj.bias": hf_state["videomae.embeddings.patch_embeddings.projection.bias"],
           "encoder.norm.weight": hf_state["videomae.layernorm.weight"],
           "encoder.norm.bias": hf_state["videomae.layernorm.bias"],
           "encoder_to_decoder.weight": hf_state["encoder_to_decoder.weight"], "mask_token": hf_state["mask_token"],
           "decoder.norm.weight": hf_state["decoder.norm.weight"], "decoder.norm.bias": hf_state["decoder.norm.bias"],
           "decoder.head.weight": hf_state["decoder.head.weight"], "decoder.head.bias": hf_state["decoder.head.bias"]}
    for ours, theirs, n in (("encoder.blocks", "videomae.encoder.layer", depth),
                            ("decoder.blocks", "decoder.decoder_layers", decoder_depth)):
        for i in range(n):
            o, h = f"{ours}.{i}.", f"{theirs}.{i}."
            att = h + "attention.attention."
            out[o + "attn.qkv.weight"] = torch.cat([hf_state[att + f"{n_}.weight"] for n_ in ("query", "key", "value")])
            out[o + "attn.q_bias"], out[o + "attn.v_bias"] = hf_state[att + "query.bias"], hf_state[att + "value.bias"]
            for a, b in (("norm1", "layernorm_before"), ("norm2", "layernorm_after"),
                         ("attn.proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
                         ("mlp.fc2", "output.dense")):
                out[o + a + ".weight"], out[o + a + ".bias"] = hf_state[h + b + ".weight"], hf_state[h + b + ".bias"]
    return out


def test_official_videomae_pth_imports_with_the_videomae_code(videomae_folder, tmp_path, capsys):
    hf = transformers.VideoMAEForPreTraining.from_pretrained(str(videomae_folder)).eval()
    state = official_videomae_state(hf.state_dict(), 2, 2)
    assert len(state) == len(hf.state_dict()) - 4 * 2  # key weights fused (2 + 2 layers), q / v biases separate
    torch.save({"model": state}, tmp_path / "checkpoint.pth")
    args = ["--model", "tiny", "--set", "img_size=32", "patch_size=8", "num_frames=4", "embed_dim=48", "depth=2",
            "num_heads=3"]
    assert main([str(tmp_path / "checkpoint.pth"), str(tmp_path / "enc"), *args]) == 0
    assert json.loads(capsys.readouterr().out)["import"]["position_code"] == "videomae"
    x = clips()
    with torch.no_grad():
        torch.testing.assert_close(load_encoder(tmp_path / "enc").forward_clips(x),
                                   hf.videomae(x.transpose(1, 2)).last_hidden_state, atol=1e-4, rtol=0)
    # and the whole pretraining model: same loss as transformers
    model = create_model("tiny", img_size=32, patch_size=8, num_frames=4, embed_dim=48, depth=2, num_heads=3,
                         mode="videomae", position_code="videomae", video_decoder_embed_dim=32,
                         video_decoder_depth=2, video_decoder_num_heads=4).eval()
    assert load_pretrained_weights(model, tmp_path / "checkpoint.pth").decoders == {"video_decoder": "loaded"}
    mask = tube_masking(2, 2, 16, 0.75, generator=torch.Generator().manual_seed(3)).mask
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask_video=mask)["loss_video"],
                                   hf(x.transpose(1, 2), bool_masked_pos=mask).loss, atol=1e-5, rtol=0)


# ---- transformers ViTMAE in ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vitmae_folder(tmp_path_factory) -> Path:
    """A ViTMAEForPreTraining folder. Its fixed sin-cos codes are set to MAE's (transformers 5 leaves a random-init
    model's position_embeddings / decoder_pos_embed at zero; hub checkpoints hold MAE's code)."""
    torch.manual_seed(0)
    model = perturb_(transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**VITMAE)))
    with torch.no_grad():
        for param, dim in ((model.vit.embeddings.position_embeddings, 48), (model.decoder.decoder_pos_embed, 32)):
            param[0, 1:] = get_2d_sincos_pos_embed(dim, 4)
            param[0, :1] = 0
    folder = tmp_path_factory.mktemp("hf") / "vitmae"
    model.save_pretrained(folder)
    return folder


def vitmae_noise(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ViTMAE's masking input: uniform noise, argsorted per sample, keeps int(N * (1 - 0.75)) = 4 of 16 patches;
    and the (B, N) mask it makes (True = masked), what expMAE takes."""
    noise = torch.rand(batch, 16, generator=torch.Generator().manual_seed(seed))
    return noise, noise.argsort(dim=1).argsort(dim=1) >= 4


def test_vitmae_folder_is_the_frame_encoder_with_its_class_token(vitmae_folder, tmp_path, capsys):
    """ViTMAE -> expmae-export (size and class token from its config and weights, no --set) -> the frame encoder
    is ViTMAEModel: last_hidden_state (class token first) on every patch in order, and on the same visible ones."""
    assert main([str(vitmae_folder), str(tmp_path / "enc")]) == 0
    summary = json.loads(capsys.readouterr().out)["import"]
    assert summary["layout"] == "transformers-vitmae" and summary["position_code"] == "separable"
    assert summary["class_token"] is True and "vit.embeddings.cls_token" not in summary["dropped"]
    encoder = load_encoder(tmp_path / "enc")
    assert encoder.cfg.class_token and encoder.num_prefix_tokens == 1
    images = clips()[:, :, 0]
    with torch.no_grad():
        hf = transformers.ViTMAEModel.from_pretrained(str(vitmae_folder), mask_ratio=0.0).eval()
        ref = hf(images, noise=torch.arange(16.0).expand(2, -1)).last_hidden_state  # every patch, in token order
        ours = encoder.forward_frames(images)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
        assert ref.shape == (2, 17, 48) and ref.abs().mean() > 0.1
        noise, _ = vitmae_noise(2, seed=5)  # the pretraining masking: 4 visible patches in ViTMAE's shuffle order
        masked = transformers.ViTMAEModel.from_pretrained(str(vitmae_folder)).eval()(images, noise=noise)
        ids_keep = noise.argsort(dim=1)[:, :4]
        visible = encoder.forward_tokens(encoder.embed_visible_frames(images, ids_keep))
        torch.testing.assert_close(visible, masked.last_hidden_state, atol=1e-4, rtol=0)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_vitmae_loss_matches_vitmae_for_pretraining(vitmae_folder, norm_pix_loss):
    """Same folder, same image, the mask ViTMAE's noise makes: ExpMAE(mode=mae) with the imported class token and
    frame decoder gives ViTMAEForPreTraining's loss and the logits of the masked patches; transformers untouched."""
    fields = {**read_source(vitmae_folder).config, "norm_pix_loss": norm_pix_loss}
    model = ExpMAE(ExpMAEConfig(**fields)).eval()
    assert (model.cfg.mode, model.cfg.class_token, model.cfg.mae_decoder_embed_dim) == ("mae", True, 32)
    report = load_pretrained_weights(model, vitmae_folder)
    assert report.decoders == {"mae_decoder": "loaded"} and report.missing == [] and report.unexpected == []
    hf = transformers.ViTMAEForPreTraining.from_pretrained(str(vitmae_folder), norm_pix_loss=norm_pix_loss).eval()
    x = clips(batch=3)
    noise, mask = vitmae_noise(3, seed=7)
    with torch.no_grad():
        ours = model(x, frame_idx=0, mask_mae=mask)
        ref = hf(x[:, :, 0], noise=noise)
    assert torch.equal(ref.mask.bool(), ours["mask_mae"])
    torch.testing.assert_close(ours["loss_mae"], ref.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["pred_mae"], ref.logits[mask].reshape(3, 12, -1), atol=1e-4, rtol=0)


def test_vitmae_export_loads_strictly_and_round_trips(vitmae_folder, tmp_path, capsys):
    """--hf-vitmae: OUT/hf_vitmae loads in transformers' ViTMAEModel with no missing / unexpected keys, gives the
    frame encoder's tokens, and transformers -> expmae -> transformers gives the original tensors back."""
    assert main([str(vitmae_folder), str(tmp_path / "enc"), "--hf-vitmae"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["verify"]["hf_vitmae_max_abs_diff"] < 1e-4
    out = tmp_path / "enc" / "hf_vitmae"
    model, info = transformers.ViTMAEModel.from_pretrained(str(out), mask_ratio=0.0, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    images = clips()[:, :, 0]
    with torch.no_grad():
        theirs = model.eval()(images, noise=torch.arange(16.0).expand(2, -1)).last_hidden_state
        torch.testing.assert_close(theirs, load_encoder(tmp_path / "enc").forward_frames(images), atol=1e-4, rtol=0)
    original = transformers.ViTMAEForPreTraining.from_pretrained(str(vitmae_folder)).vit.state_dict()
    back = model.state_dict()
    assert set(back) == set(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key
    assert model.config.mask_ratio == 0.0 and json.loads((out / "config.json").read_text())["mask_ratio"] == 0.75
    # continued MAE pretraining in transformers: only the decoder is fresh
    _, info = transformers.ViTMAEForPreTraining.from_pretrained(str(out), output_loading_info=True)
    assert {k.split(".")[0] for k in info["missing_keys"]} == {"decoder"} and not info["unexpected_keys"]
    card = (out / "README.md").read_text()
    for fragment in (str(vitmae_folder.resolve()), "ViTMAEModel.from_pretrained", "mask_ratio=0.0",
                     "timm.create_model", "expmae.load_encoder", '"class_token": true'):
        assert fragment in card, fragment


def test_class_token_mismatch_is_a_one_line_error(vitmae_folder, videomae_folder, tmp_path, capsys):
    """As a position-code mismatch: never a silent drop (ViTMAE's patches attended to its class token)."""
    sizes = dict(img_size=32, patch_size=8, num_frames=4, embed_dim=48, depth=2, num_heads=3)
    with pytest.raises(ValueError) as err:
        load_pretrained_weights(create_model("tiny", **sizes), vitmae_folder)
    message = one_line(err)
    assert "the weights have a class token" in message and "set model.class_token=true" in message
    with pytest.raises(ValueError) as err:
        init_from(create_model("tiny", **sizes, position_code="videomae", class_token=True), videomae_folder)
    assert "the weights have no class token" in one_line(err) and "set model.class_token=false" in str(err.value)
    assert main([str(vitmae_folder), str(tmp_path / "enc"), "--set", "class_token=false"]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "class_token=False" in err_lines[0] and not (tmp_path / "enc").exists()


def test_hf_exports_say_in_one_line_what_transformers_cannot_express(vitmae_folder, tmp_path, capsys):
    from expmae.export import save_encoder

    assert main([str(vitmae_folder), str(tmp_path / "enc"), "--hf"]) == 2  # separable and a class token
    assert "position_code='separable'" in capsys.readouterr().err
    save_encoder(create_model("tiny", img_size=32, patch_size=8, num_frames=4, depth=1, position_code="videomae",
                              class_token=True), tmp_path / "cls")
    assert main([str(tmp_path / "cls"), str(tmp_path / "out"), "--hf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "class_token=True" in err[0] and "--hf-vitmae" in err[0]
    save_encoder(create_model("tiny", img_size=32, patch_size=8, num_frames=4, depth=1), tmp_path / "plain")
    assert main([str(tmp_path / "plain"), str(tmp_path / "out"), "--hf-vitmae"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no class token (class_token=False)" in err[0] and not (tmp_path / "out").exists()


def test_init_from_videomae_into_a_separable_run_fails_before_training(videomae_folder, tmp_path):
    """pretrain/train.py with train.init_from = a VideoMAE folder and the default separable code: one error line
    naming the option to set, before any data is read or step taken."""
    import os
    import subprocess
    import sys

    from launching import LAUNCH_TIMEOUT, REPO, write_tiny_config

    config = write_tiny_config(tmp_path / "tiny.yaml", tmp_path / "no-videos-needed", tmp_path / "run",
                               train={"init_from": str(videomae_folder)})
    proc = subprocess.run([sys.executable, "pretrain/train.py", "--config", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith(f"error: train.init_from={videomae_folder}: ")
    assert "position_code='videomae'" in errors[0] and "set model.position_code=videomae" in errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_features_run_unchanged_on_an_imported_videomae_encoder(videomae_folder, tmp_path):
    """expmae.features on the encoder folder imported from transformers: clip features are VideoMAEModel's tokens,
    mean-pooled, on the documented window (the 3-frame clip holds its last frame)."""
    import numpy as np

    from expmae.features.visual import extract_visual_features

    assert main([str(videomae_folder), str(tmp_path / "enc")]) == 0
    clip = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    (tmp_path / "crops" / "clips").mkdir(parents=True)
    np.save(tmp_path / "crops" / "clips" / "a.npy", clip)
    summary = extract_visual_features(tmp_path / "crops", tmp_path / "feat", tmp_path / "enc", modality="video",
                                      sample_stride=2, progress=False)
    assert (summary.done, summary.failed) == (1, 0)
    x = torch.from_numpy(clip[[0, 2, 2, 2]]).float() / 255  # (T, H, W, C)
    x = ((x - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = hf_encoder(videomae_folder)(x[None]).last_hidden_state.mean(dim=1)[0]
    np.testing.assert_allclose(np.load(tmp_path / "feat" / "a.npy"), expected.numpy(), atol=1e-4, rtol=0)


def test_an_expmae_trained_videomae_encoder_exports_to_transformers(tmp_path):
    """An ExpMAE pretrained with position_code=videomae (its key bias is not zero, as training leaves it): --hf
    drops the key bias, exactly, and transformers reproduces the encoder."""
    from expmae.export import export_encoder, save_encoder

    torch.manual_seed(0)
    model = perturb_(create_model("tiny", img_size=32, patch_size=8, num_frames=4, embed_dim=48, depth=2,
                                  num_heads=3, position_code="videomae"), scale=0.2).eval()
    assert model.encoder.blocks[0].attn.qkv.bias[48:96].abs().max() > 0.1
    save_encoder(model, tmp_path / "trained")
    summary = export_encoder(tmp_path / "trained", tmp_path / "enc", hf=True)
    hf = transformers.VideoMAEModel.from_pretrained(str(tmp_path / "enc" / "hf")).eval()
    x = clips()
    with torch.no_grad():
        torch.testing.assert_close(hf(x.transpose(1, 2)).last_hidden_state, model.encoder.forward_clips(x),
                                   atol=1e-4, rtol=0)
    assert summary["verify"]["hf_max_abs_diff"] < 1e-4


@pytest.mark.parametrize("code, learn", [("separable", True), ("videomae", False)])
def test_an_expmae_trained_class_token_encoder_exports_to_vitmae(tmp_path, code, learn):
    """--hf-vitmae of an ExpMAE pretrained with a class token, under either position code (ViTMAE stores its code,
    so a learned or VideoMAE-table frame code goes in as it is): transformers reproduces the frame encoder."""
    from expmae.export import export_encoder, save_encoder

    torch.manual_seed(0)
    model = perturb_(create_model("tiny", img_size=32, patch_size=8, num_frames=4, embed_dim=48, depth=2,
                                  num_heads=3, class_token=True, position_code=code, learn_pos_embed=learn),
                     scale=0.2).eval()
    save_encoder(model, tmp_path / "trained")
    summary = export_encoder(tmp_path / "trained", tmp_path / "enc", hf_vitmae=True)
    assert summary["verify"]["hf_vitmae_max_abs_diff"] < 1e-4
    hf = transformers.ViTMAEModel.from_pretrained(str(tmp_path / "enc" / "hf_vitmae"), mask_ratio=0.0).eval()
    images = clips()[:, :, 1]
    with torch.no_grad():
        theirs = hf(images, noise=torch.arange(16.0).expand(2, -1)).last_hidden_state
        torch.testing.assert_close(theirs, model.encoder.forward_frames(images), atol=1e-4, rtol=0)
