"""End-to-end finetuning (expmae.e2e): layer-wise lr decay, and the one command from an exported encoder + face
clips to results.json, on a tiny encoder and tiny synthetic videos (64 px wide: decord 0.6.0 mis-reads some widths)."""
import csv
import json
import re

import numpy as np
import pytest
import torch

from expmae.files import TEMP_MARK
from expmae.labels import MER_CLASSES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_model(**overrides):
    from expmae.model import create_model

    return create_model("tiny", img_size=32, num_frames=4, **{"depth": 3, **overrides})


def write_labels(path, names, classes):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "discrete", "valence"])
        for i, (n, c) in enumerate(zip(names, classes)):
            writer.writerow([n, MER_CLASSES[c], f"{(c - 2.5) + 0.1 * i:.2f}"])
    return path


@pytest.fixture
def mer_videos(tmp_path, make_video):
    """An exported tiny encoder (pretraining stride 2), 14 face clips: 12 labelled (2 per class) + 2 test, a
    test name without a clip, and 14 audio-like utterance features."""
    from expmae.export import save_encoder

    torch.manual_seed(0)
    encoder_dir = save_encoder(tiny_model(), tmp_path / "encoder", sample_stride=2, model_name="tiny")
    names = [f"sample_{i:08d}" for i in range(14)]
    for i, name in enumerate(names):
        make_video(f"videos/{name}.mp4", num_frames=24, size=64, seed=i)
    classes = np.arange(14) % 6
    write_labels(tmp_path / "train-label.csv", names[:12], classes[:12])
    write_labels(tmp_path / "test1-label.csv", names[12:] + ["sample_99999999"], [0, 1, 2])
    rng = np.random.default_rng(0)
    (tmp_path / "audio").mkdir()
    for name in names:
        np.save(tmp_path / "audio" / f"{name}.npy", rng.normal(size=8).astype(np.float32))
    return {"root": tmp_path, "encoder": encoder_dir, "videos": tmp_path / "videos", "names": names}


def e2e_args(data, out, *extra):
    root = data["root"]
    return ["--labels", str(root / "train-label.csv"), "--videos", str(data["videos"]), "--encoder", str(data["encoder"]),
            "--test", str(root / "test1-label.csv"), "--out", str(out), "--folds", "2", "--epochs", "2",
            "--batch-size", "4", "--warmup-epochs", "1", "--lr", "1e-3", "--weight-decay", "0.05",
            "--no-progress", "--threads", "1", *extra]


# ----------------------------------------------------------------------------------------------- LLRD
def test_layer_decay_groups_hand_computed_and_as_timm_groups_the_exported_vit():
    import timm
    from timm.optim import param_groups_layer_decay

    from expmae.finetune.backends.video_model import VideoFusionModel, layer_decay_param_groups
    from expmae.optim import set_lr
    from expmae.finetune.heads import create_head
    from expmae.weights.timm_frame import timm_create_kwargs

    # learned position codes and a class token: they must land in the stem, without decay (MAE, timm)
    model = tiny_model(learn_pos_embed=True, class_token=True)
    fused = VideoFusionModel(model.encoder, create_head("attention", {"visual": 192, "audio": 8}, hidden_dim=16))
    groups = layer_decay_param_groups(fused, weight_decay=0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    decay = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert sorted(scale) == sorted(n for n, _ in fused.named_parameters())  # every parameter exactly once
    assert sum(len(g["params"]) for g in groups) == len(scale)

    # depth 3, decay 0.5, by hand: stem 0.5^4, block i 0.5^(3 - i); final norm, norm after pooling and head 1.
    expected = {"encoder.patch_embed.": 0.0625, "encoder.pos_embed": 0.0625, "encoder.time_embed": 0.0625,
                "encoder.cls_token": 0.0625,
                "encoder.blocks.0.": 0.125, "encoder.blocks.1.": 0.25, "encoder.blocks.2.": 0.5,
                "encoder.norm.": 1.0, "fc_norm.": 1.0, "head.": 1.0}
    for name, s in scale.items():
        prefix = next(p for p in expected if name.startswith(p))
        assert s == expected[prefix], name
    for name, param in fused.named_parameters():
        no_decay = param.ndim == 1 or name in ("encoder.pos_embed", "encoder.time_embed", "encoder.cls_token")
        assert decay[name] == (0.0 if no_decay else 0.05), name
    assert decay["encoder.blocks.1.attn.qkv.weight"] == 0.05 and decay["encoder.blocks.1.norm1.weight"] == 0.0

    # Oracle: timm's BEiT/MAE layer decay on the timm ViT the encoder exports to (same parameter names).
    name, kwargs = timm_create_kwargs(model.cfg)
    vit = timm.create_model(name, pretrained=False, **{**kwargs, "num_classes": 6})
    timm_groups = param_groups_layer_decay(vit, weight_decay=0.05, no_weight_decay_list=vit.no_weight_decay(),
                                           layer_decay=0.5)
    timm_scale = {n: g["lr_scale"] for g in timm_groups for n, p in vit.named_parameters()
                  if any(p is q for q in g["params"])}
    timm_decay = {n: g["weight_decay"] for g in timm_groups for n, p in vit.named_parameters()
                  if any(p is q for q in g["params"])}
    shared = [n for n in timm_scale if f"encoder.{n}" in scale]
    assert len(shared) == len(timm_scale) - 2  # all but timm's classifier head.weight / head.bias
    for n in shared:
        assert decay[f"encoder.{n}"] == timm_decay[n], n
        if n.startswith("norm."):  # the one difference: timm groups the final norm with the last block,
            assert timm_scale[n] == 0.5 and scale[f"encoder.{n}"] == 1.0  # MAE / VideoMAE (and we) with the head
        else:
            assert scale[f"encoder.{n}"] == pytest.approx(timm_scale[n]), n
    assert timm_scale["head.weight"] == scale["head.fc_emotion.weight"] == 1.0

    optimizer = torch.optim.AdamW(groups, lr=1.0)
    set_lr(optimizer, 2e-3)
    lrs = {n: g["lr"] for g in optimizer.param_groups for n in g["param_names"]}
    assert lrs["encoder.blocks.0.mlp.fc1.weight"] == pytest.approx(2e-3 * 0.125)
    assert lrs["encoder.patch_embed.proj.bias"] == pytest.approx(2e-3 * 0.0625) and lrs["head.fc_regression.bias"] == 2e-3

    frozen = VideoFusionModel(tiny_model().encoder, create_head("concat", {"visual": 192}, hidden_dim=16),
                              freeze_encoder=True)
    frozen_groups = layer_decay_param_groups(frozen, weight_decay=0.05, layer_decay=0.5)
    assert {n.split(".")[0] for g in frozen_groups for n in g["param_names"]} == {"fc_norm", "head"}
    assert all(g["lr_scale"] == 1.0 for g in frozen_groups)


@pytest.mark.parametrize("unfreeze", [-1, 0, 1, 2, 3])
def test_unfreeze_blocks_one_step_changes_exactly_the_last_blocks_at_their_decayed_lr(unfreeze, single_thread):
    """One AdamW step from zero moments moves every parameter with a gradient by lr x its lr_scale (Adam's first
    step is lr x g / |g|, weight decay 0 here): the last N blocks (+ final norm, fc_norm, head) move by exactly
    their layer-decayed lr, everything else stays bit-identical. Frozen blocks run in eval mode (no drop-path)."""
    from expmae.finetune.backends.video_model import VideoFusionModel, layer_decay_param_groups
    from expmae.optim import set_lr
    from expmae.finetune.heads import create_head

    torch.manual_seed(0)
    encoder = tiny_model(drop_path_rate=0.1, learn_pos_embed=True, class_token=True).encoder
    head = create_head("concat", {"visual": 192}, hidden_dim=16, dropout=0.0, num_targets=0)  # all get gradients
    model = VideoFusionModel(encoder, head, unfreeze_blocks=unfreeze).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(layer_decay_param_groups(model, weight_decay=0.0, layer_decay=0.5), lr=1.0)
    set_lr(optimizer, 1e-2)
    out = model(torch.randn(4, 3, 4, 32, 32))
    torch.nn.functional.cross_entropy(out["logits"], torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()

    trained_blocks = range(3) if unfreeze < 0 else range(3 - unfreeze, 3)
    expected_scale = {f"encoder.blocks.{i}.": 0.5 ** (3 - i) for i in trained_blocks}  # depth 3, decay 0.5
    if unfreeze != 0:
        expected_scale["encoder.norm."] = 1.0
    if unfreeze < 0:  # full finetuning: the stem (patch embedding, position codes, class token) too
        expected_scale.update({"encoder.patch_embed.": 0.0625, "encoder.pos_embed": 0.0625,
                               "encoder.time_embed": 0.0625, "encoder.cls_token": 0.0625})
    expected_scale.update({"fc_norm.": 1.0, "head.": 1.0})
    for name, param in model.named_parameters():
        prefix = next((p for p in expected_scale if name.startswith(p)), None)
        change = (param.detach() - before[name]).abs().max().item()
        if prefix is None:
            assert torch.equal(param, before[name]) and param.grad is None, name
        else:
            assert change == pytest.approx(1e-2 * expected_scale[prefix], rel=1e-3), name
    assert [b.training for b in model.encoder.blocks] == [i in trained_blocks for i in range(3)]
    assert model.encoder.norm.training == (unfreeze != 0) and model.head.training


def test_unfreeze_blocks_values_and_flags():
    from expmae.finetune.backends.video_model import VideoFusionModel
    from expmae.finetune.cli import config_from_args
    from expmae.finetune.config import FinetuneConfig
    from expmae.finetune.heads import create_head

    assert FinetuneConfig().unfreeze_blocks == -1  # full finetuning stays the default
    assert config_from_args(["--unfreeze-blocks", "all"]).unfreeze_blocks == -1
    assert config_from_args(["--unfreeze-blocks", "2"]).unfreeze_blocks == 2
    with pytest.raises(SystemExit):
        config_from_args(["--unfreeze-blocks", "some"])
    head = create_head("concat", {"visual": 192}, hidden_dim=16)
    with pytest.raises(ValueError, match=r"unfreeze_blocks=4: expected -1 \(all\) or 0..3"):
        VideoFusionModel(tiny_model().encoder, head, unfreeze_blocks=4)
    with pytest.raises(ValueError, match="not above 0 with freeze_encoder"):
        VideoFusionModel(tiny_model().encoder, head, unfreeze_blocks=1, freeze_encoder=True)
    assert VideoFusionModel(tiny_model().encoder, head, freeze_encoder=True).unfreeze_blocks == 0


def test_drop_path_comes_from_the_encoder_config_unless_overridden(tmp_path):
    from expmae.finetune.backends.video_model import load_finetune_encoder
    from expmae.export import save_encoder

    folder = save_encoder(tiny_model(drop_path_rate=0.2), tmp_path / "enc")
    rates = lambda enc: [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0 for b in enc.blocks]
    assert rates(load_finetune_encoder(folder)) == pytest.approx([0.0, 0.1, 0.2])  # linear over depth 3
    override = load_finetune_encoder(folder, drop_path=0.4)
    assert rates(override) == pytest.approx([0.0, 0.2, 0.4]) and override.training
    from expmae.export import load_encoder

    same = {k: v for k, v in load_encoder(folder).state_dict().items()}
    assert all(torch.equal(same[k], v) for k, v in override.state_dict().items())


# ----------------------------------------------------------------------------------------------- the one command
def test_one_command_finetunes_the_encoder_end_to_end_fused_with_features(mer_videos, tmp_path, capsys):
    from safetensors.torch import load_file

    from expmae.export import load_encoder
    from expmae.finetune.cli import main
    from expmae.finetune.heads import create_head
    from expmae.labels import read_label_csv
    from expmae.optim import cosine_lr

    data, out = mer_videos, tmp_path / "run"
    (data["videos"] / f"{data['names'][11]}.mp4").write_bytes(b"not a video")  # one labelled clip is broken
    args = e2e_args(data, out, "--features", f"audio={data['root'] / 'audio'}", "--head", "attention")
    assert main(args) == 0
    captured = capsys.readouterr()
    results = json.loads((out / "results.json").read_text())

    printed = re.search(r"^metric (-?\d+\.\d+) \(metric_e (\d+\.\d+), metric_v (\d+\.\d+)\)", captured.out, re.M)
    assert printed and float(printed.group(1)) == pytest.approx(results["cv"]["metric"], abs=1e-4)
    assert "branches=visual+audio" in captured.out
    assert results["feature_dims"] == {"visual": 192, "audio": 8}
    e2e = results["end_to_end"]
    assert e2e["sample_stride"] == 2 and e2e["encoder_config"]["depth"] == 3 and not e2e["frozen"]
    assert len(results["folds"]) == 2 and results["num_train"] == 12
    assert (out / "confusion_matrix.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "confusion_matrix_test1-label.png").read_bytes()[:8] == PNG_MAGIC

    # The broken clip is recorded and the run goes on; the test name without a clip is reported, not predicted.
    failures = [json.loads(line) for line in (out / "clip_failures.jsonl").read_text().splitlines()]
    assert failures and {f["key"] for f in failures} == {data["names"][11]}
    assert data["names"][11] in captured.err and "sample_99999999" in captured.err
    assert results["tests"]["test1-label"]["missing_features"] == {str(data["videos"]): ["sample_99999999"]}
    assert list(read_label_csv(out / "predictions_test1-label.csv")) == data["names"][12:]

    # Warmup + cosine per optimizer step: 6 training clips per fold, batches of 4 -> 2 steps per epoch.
    history = json.loads((out / "fold0" / "round0" / "result.json").read_text())["history"]
    for epoch, record in enumerate(history):
        assert record["lr"] == pytest.approx(cosine_lr(2 * epoch + 1, peak_lr=1e-3, min_lr=1e-6, warmup_steps=2,
                                                        total_steps=4))

    # Gradients reach every encoder tensor: each fold's finetuned encoder (an encoder folder) differs from the
    # pretrained one everywhere, stem included. head.safetensors holds the norm after pooling and a create_head
    # state dict whose precomputed branch is standardised with training statistics (the visual one by fc_norm).
    pretrained = load_encoder(data["encoder"]).state_dict()
    for k in range(2):
        finetuned = load_encoder(out / f"fold{k}" / "round0" / "encoder").state_dict()
        unchanged = [n for n, v in pretrained.items() if torch.equal(v, finetuned[n])]
        assert not unchanged, unchanged
        state = load_file(out / f"fold{k}" / "round0" / "head.safetensors")
        assert {n.split(".")[0] for n in state} == {"fc_norm", "head"}
        head = create_head("attention", {"visual": 192, "audio": 8})
        head.load_state_dict({n[len("head."):]: v for n, v in state.items() if n.startswith("head.")})
        assert torch.all(head.standardize["audio"].std != 1) and torch.all(head.standardize["visual"].std == 1)

    # A rerun with the same settings reuses both folds.
    assert main(args) == 0
    assert capsys.readouterr().err.count("finished earlier with the same settings") == 2


def test_labels_stay_with_their_clips_dark_versus_bright_faces_are_learned(mer_videos, tmp_path):
    """Class = brightness, which no crop or flip removes: held-out accuracy near chance would mean labels and
    clips were paired wrongly somewhere between the label CSV, the shuffled loader and the predictions.
    (valence_weight 0: at 20 optimizer steps the valence term would still dominate the small head; with it,
    the classes separate only after ~12 epochs.)"""
    from conftest import moving_pattern, write_video

    from expmae.finetune.cli import main

    names = [f"clip_{i:02d}" for i in range(12)]
    classes = [i % 2 * 2 for i in range(12)]  # neutral (dark) or happy (bright)
    for i, (name, c) in enumerate(zip(names, classes)):
        frames = moving_pattern(24, 64, seed=i).astype(np.float32) * 0.1 + (200 if c else 20)
        write_video(tmp_path / "faces" / f"{name}.mp4", frames.astype(np.uint8))
    write_labels(tmp_path / "labels.csv", names, classes)
    out = tmp_path / "run"
    assert main(["--labels", str(tmp_path / "labels.csv"), "--videos", str(tmp_path / "faces"),
                 "--encoder", str(mer_videos["encoder"]), "--out", str(out), "--folds", "2", "--epochs", "10",
                 "--batch-size", "3", "--warmup-epochs", "1", "--lr", "2e-3", "--valence-weight", "0", "--head", "concat",
                 "--hidden-dim", "32", "--no-progress", "--threads", "1", "--no-tensorboard"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["cv_pooled"]["war"] >= 0.9, results["cv_pooled"]


def test_freeze_encoder_trains_only_the_head(mer_videos, tmp_path, monkeypatch, capsys):
    from expmae.finetune.backends.video import VideoBackend
    from expmae.export import load_encoder
    from expmae.finetune.cli import main

    built, trained, modes = [], [], []
    build_model, save = VideoBackend.build_model, VideoBackend.save

    def spy_build(self, *args):  # the model as each fold starts it
        model = build_model(self, *args)
        built.append({k: v.clone() for k, v in model.head.state_dict().items()})
        # (model in training?, encoder in training?) at every encoder call
        model.encoder.blocks[0].register_forward_pre_hook(lambda blk, args: modes.append((model.training, blk.training)))
        return model

    def spy_save(self, model, fit, run_dir):  # and as the command leaves it
        trained.append(({k: v.clone() for k, v in model.encoder.state_dict().items()},
                        {k: v.clone() for k, v in model.head.state_dict().items()}))
        return save(self, model, fit, run_dir)

    monkeypatch.setattr(VideoBackend, "build_model", spy_build)
    monkeypatch.setattr(VideoBackend, "save", spy_save)
    out = tmp_path / "frozen"
    assert main(e2e_args(mer_videos, out, "--freeze-encoder", "--head", "concat", "--no-tensorboard",
                         "--drop-path", "0.5")) == 0
    assert "metric" in capsys.readouterr().out
    pretrained = load_encoder(mer_videos["encoder"]).state_dict()
    assert len(built) == len(trained) == 2
    for initial_head, (encoder_state, head_state) in zip(built, trained):
        assert all(torch.equal(pretrained[n], v) for n, v in encoder_state.items())
        assert not torch.equal(initial_head["fc_emotion.weight"], head_state["fc_emotion.weight"])
    # A frozen encoder runs in eval mode (no drop-path) even while the head trains.
    assert (True, False) in modes and (True, True) not in modes
    assert not list(out.glob("fold*/round0/encoder"))  # nothing to export: the encoder is the pretrained one
    assert json.loads((out / "results.json").read_text())["end_to_end"]["frozen"] is True


def test_the_last_block_and_an_attentive_head_over_the_tokens_finetune_from_the_command_line(mer_videos, tmp_path,
                                                                                             monkeypatch, single_thread):
    """--unfreeze-blocks 1 --head attentive: each fold's exported encoder is the pretrained one except its last block
    and final norm; the head gets the encoder's tokens (B, T'*S, D), not their mean; the setting is recorded."""
    from expmae.export import load_encoder
    from expmae.finetune.cli import main
    from expmae.finetune.heads import AttentiveFusion

    shapes, forward = [], AttentiveFusion.forward

    def spy_forward(self, inputs):
        shapes.append(tuple(inputs["visual"].shape))
        return forward(self, inputs)

    monkeypatch.setattr(AttentiveFusion, "forward", spy_forward)
    out = tmp_path / "partial"
    assert main(e2e_args(mer_videos, out, "--unfreeze-blocks", "1", "--head", "attentive", "--no-tensorboard")) == 0
    assert shapes and all(s[1:] == (2 * 4, 192) for s in shapes)  # 4 frames / tubelet 2, 2 x 2 patches of 16 px
    pretrained = load_encoder(mer_videos["encoder"]).state_dict()
    for k in range(2):
        finetuned = load_encoder(out / f"fold{k}" / "round0" / "encoder").state_dict()
        changed = sorted({n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks.") else "")
                          for n, v in finetuned.items() if not torch.equal(v, pretrained[n])})
        assert changed == ["blocks.2", "norm"], changed
    e2e = json.loads((out / "results.json").read_text())["end_to_end"]
    assert e2e["unfreeze_blocks"] == 1 and e2e["frozen"] is False


def test_bad_end_to_end_inputs_fail_with_one_line(mer_videos, tmp_path, capsys):
    from expmae.finetune.cli import main

    data = mer_videos
    cases = [
        (["--encoder", ""], "needs both videos"),
        (["--encoder", str(tmp_path / "nowhere")], "nowhere"),
        (["--features", f"visual={data['root'] / 'audio'}"], "'visual' is the encoder's"),
        (["--missing", "zero"], "missing='zero'"),
        (["--layer-decay", "1.5"], "layer_decay=1.5"),
        (["--videos", str(data["root"] / "audio")], "audio"),  # no videos there
        (["--test-views", "0"], "test_views=0 is out of range; expected a value >= 1"),
        (["--head", "svm"], "head 'svm' is fit on precomputed features"),
        (["--unfreeze-blocks", "4"], "unfreeze_blocks=4: expected -1 (all) or 0..3 (the encoder's depth)"),
    ]
    for extra, message in cases:
        assert main(e2e_args(data, tmp_path / "out", *extra)) == 2, extra
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, (extra, err)
    assert not (tmp_path / "out" / "results.json").exists()


# ----------------------------------------------------------------------------------------------- resume
class Interrupted(BaseException):
    """Stands for Ctrl-C / a kill: like KeyboardInterrupt, no ``except Exception`` on the way stops it."""


def run_recording(monkeypatch, args, *, interrupt=None) -> list[tuple[int, int]]:
    """expmae.finetune.cli.main(args); returns the (fold, epoch) pairs it trained, in order. ``interrupt=(fold,
    epoch)``: raise Interrupted in that epoch, after its first optimizer step (the run then ends with it)."""
    import expmae.finetune.heads
    from expmae.data import VideoClipDataset
    from expmae.finetune.cli import main

    trained, losses = [], []
    set_epoch, task_loss = VideoClipDataset.set_epoch, expmae.finetune.heads.task_loss

    def spy_set_epoch(self, epoch):
        trained.append((self.seed % 1000, epoch))  # a fold's seed is seed * 1000 + fold (seed 0 here)
        losses.clear()
        return set_epoch(self, epoch)

    def spy_loss(*a, **kw):
        losses.append(1)
        if trained[-1] == interrupt and len(losses) == 2:
            raise Interrupted
        return task_loss(*a, **kw)

    with monkeypatch.context() as m:
        m.setattr(VideoClipDataset, "set_epoch", spy_set_epoch)
        m.setattr(expmae.finetune.heads, "task_loss", spy_loss)
        if interrupt is None:
            assert main(args) == 0
        else:
            with pytest.raises(Interrupted):
                main(args)
    return trained


def assert_same_folds(a, b, folds: int = 2):
    """Two runs' folds hold identical records (metrics, best epoch, history), predictions and weights."""
    from safetensors.torch import load_file

    from expmae.export import load_encoder

    for k in range(folds):
        run_a, run_b = a / f"fold{k}" / "round0", b / f"fold{k}" / "round0"
        assert json.loads((run_a / "result.json").read_text()) == json.loads((run_b / "result.json").read_text())
        with np.load(run_a / "predictions.npz") as pa, np.load(run_b / "predictions.npz") as pb:
            assert pa.files == pb.files and all(np.array_equal(pa[f], pb[f]) for f in pa.files)
        torch.testing.assert_close(load_file(run_b / "head.safetensors"), load_file(run_a / "head.safetensors"), rtol=0, atol=0)
        torch.testing.assert_close(load_encoder(run_b / "encoder").state_dict(), load_encoder(run_a / "encoder").state_dict(),
                                   rtol=0, atol=0)


def resume_files(out):
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*resume*"))


def resume_args(data, out, *extra):
    # attention head (dropout) + stochastic depth: training draws from the torch RNG, which a resume restores
    return e2e_args(data, out, "--epochs", "3", "--features", f"audio={data['root'] / 'audio'}", "--drop-path", "0.2",
                    "--no-tensorboard", *extra)


def test_an_interrupted_fold_resumes_after_its_last_epoch_and_ends_as_an_uninterrupted_run(mer_videos, tmp_path,
                                                                                            monkeypatch, capsys):
    """Bit-identical on the CPU: model, optimizer, step, loop state and RNG are restored exactly, and each epoch's
    shuffle and augmentation depend on (seed, epoch) only. The interrupted run decodes clips in a DataLoader
    worker, the whole one in-process: the workers' seeds do not change what is trained either."""
    from expmae.finetune.backends.resume import FoldCheckpoint

    saved = []  # (fold tag, epoch saved, epoch read back with weights_only=True) of every checkpoint write
    save = FoldCheckpoint.save

    def spy_save(self, loop, *a, **kw):
        save(self, loop, *a, **kw)
        saved.append((self.tag, loop["epoch"], torch.load(self.path, weights_only=True)["loop"]["epoch"]))

    monkeypatch.setattr(FoldCheckpoint, "save", spy_save)
    data, whole, parts = mer_videos, tmp_path / "whole", tmp_path / "parts"
    every = [(f, e) for f in range(2) for e in range(3)]
    assert run_recording(monkeypatch, resume_args(data, whole)) == every
    assert saved == [(f"fold{f}/round0", e, e) for f, e in every]  # after every epoch, loadable safely
    assert resume_files(whole) == []  # removed once each fold finished

    # Killed in epoch 2 of fold 0: one checkpoint, of epoch 1, and nothing that marks the fold finished.
    worker = ("--workers", "1")
    assert run_recording(monkeypatch, resume_args(data, parts, *worker), interrupt=(0, 2)) == [(0, 0), (0, 1), (0, 2)]
    fold0 = parts / "fold0" / "round0"
    assert sorted(p.name for p in fold0.iterdir()) == ["resume.pt"]
    state = torch.load(fold0 / "resume.pt", weights_only=True)
    assert state["loop"]["epoch"] == 1 and state["step"] == 4  # 6 clips, batches of 4: 2 steps per epoch
    (fold0 / f".resume{TEMP_MARK}k1ll3d.pt").write_bytes(b"half a save")  # what a kill in the middle of a save leaves
    capsys.readouterr()

    # The same command again: fold 0 trains epoch 2 only, fold 1 all; everything ends as in the whole run.
    assert run_recording(monkeypatch, resume_args(data, parts, *worker)) == [(0, 2), (1, 0), (1, 1), (1, 2)]
    assert "[fold0/round0] resuming at epoch 2 from" in capsys.readouterr().err
    assert_same_folds(whole, parts)
    assert resume_files(parts) == []  # the checkpoint and the leftover of a killed save


def test_a_checkpoint_of_other_settings_or_an_unreadable_one_is_ignored(mer_videos, tmp_path, monkeypatch, capsys):
    data, out = mer_videos, tmp_path / "run"
    run_recording(monkeypatch, resume_args(data, out), interrupt=(0, 2))
    checkpoint = out / "fold0" / "round0" / "resume.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])  # torn (a disk filled up, a copy cut short)
    capsys.readouterr()

    # Unreadable: one line naming the file, fold 0 starts over; this time the run is killed in fold 1.
    lr2 = ("--lr", "2e-3")
    trained = run_recording(monkeypatch, resume_args(data, out, *lr2), interrupt=(1, 2))
    assert trained == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if "cannot resume" in line and str(checkpoint) in line]) == 1
    assert resume_files(out) == ["fold1/round0/resume.pt"]

    # Other settings (lr back to 1e-3): fold 1's checkpoint of lr 2e-3 is ignored, never mixed in.
    assert run_recording(monkeypatch, resume_args(data, out)) == [(f, e) for f in range(2) for e in range(3)]
    err = capsys.readouterr().err
    assert "[fold1/round0] ignoring" in err and "other settings or data" in err and "resuming" not in err
    assert resume_files(out) == []
    reference = tmp_path / "reference"
    run_recording(monkeypatch, resume_args(data, reference))
    assert_same_folds(reference, out)


def test_fold_checkpoint_restores_training_exactly_and_leaves_a_model_alone_when_it_cannot(tmp_path, capsys):
    from expmae.finetune.backends.resume import FoldCheckpoint
    from expmae.finetune.training import LOOP_KEYS

    def build(width=8):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Dropout(0.5), torch.nn.Linear(width, 3))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)

    def train_step(model, optimizer):
        loss = model(torch.randn(5, 4)).square().mean()  # input and dropout both draw from the torch RNG
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model, optimizer = build()
    snapshots = []
    for _ in range(3):
        train_step(model, optimizer)
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
    history = [{"epoch": e, "train_loss": float(e), "metric": np.float64(0.5 + e)} for e in range(3)]  # numpy: as mer_metrics
    path = tmp_path / "fold" / "resume.pt"
    for best_epoch in (1, 2):  # an earlier epoch's state is stored; the last epoch's is the model's own
        loop = dict(zip(LOOP_KEYS, (2, best_epoch, {"metric": np.float64(1.5)}, 1.5, snapshots[best_epoch], history)))
        FoldCheckpoint(path, "abc").save(loop, model, optimizer, step=7)
        expected_next = torch.rand(3)
        fresh, fresh_optimizer = build()
        restored, step = FoldCheckpoint(path, "abc").load(fresh, fresh_optimizer)
        assert step == 7 and restored["epoch"] == 2 and restored["best_epoch"] == best_epoch
        assert restored["history"] == history  # as Python numbers: what weights_only loading accepts
        assert {type(v) for h in restored["history"] for v in h.values()} == {int, float}
        torch.testing.assert_close(restored["best_state"], snapshots[best_epoch], rtol=0, atol=0)
        torch.testing.assert_close(fresh.state_dict(), model.state_dict(), rtol=0, atol=0)
        assert torch.equal(torch.rand(3), expected_next)  # the RNG continues where the saving process was
    # Continuing from the restored state is continuing the original: one more step on each, same draws.
    rng = torch.get_rng_state()
    train_step(model, optimizer)
    torch.set_rng_state(rng)
    train_step(fresh, fresh_optimizer)
    torch.testing.assert_close(fresh.state_dict(), model.state_dict(), rtol=0, atol=0)
    assert "resuming at epoch 3" in capsys.readouterr().err

    good = path.read_bytes()
    other = tmp_path / "other.pt"
    FoldCheckpoint(other, "abc").save(loop, *build(width=6), step=1)
    cases = {"torn": (good[: len(good) // 2], "abc", "cannot resume"), "garbage": (b"\x00" * 64, "abc", "cannot resume"),
             "other fingerprint": (good, "xyz", "other settings"),
             "other model": (other.read_bytes(), "abc", "cannot resume")}
    for name, (content, fingerprint, message) in cases.items():
        path.write_bytes(content)
        fresh, fresh_optimizer = build()
        initial = {k: v.clone() for k, v in fresh.state_dict().items()}
        assert FoldCheckpoint(path, fingerprint, tag="fold0/round0").load(fresh, fresh_optimizer) is None, name
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and str(path) in lines[0] and "[fold0/round0]" in lines[0], (name, lines)
        torch.testing.assert_close(fresh.state_dict(), initial, rtol=0, atol=0)
        assert not fresh_optimizer.state, name
    path.unlink()
    assert FoldCheckpoint(path, "abc").load(*build()) is None and capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------------------- multi-view testing
def view_backend(videos, encoder, out, views, **overrides):
    from expmae.finetune.backends.video import VideoBackend
    from expmae.finetune.config import FinetuneConfig

    return VideoBackend(FinetuneConfig(videos=str(videos), encoder=str(encoder), out_dir=str(out), batch_size=4,
                                       test_views=views, progress=False, **overrides))


def oracle_predict(model, clips_uint8, audio):
    """The model in eval mode on uint8 clips (V, T, H, W, 3) built by hand: normalised here, softmax."""
    enc = model.encoder.cfg
    mean, std = torch.tensor(enc.mean).view(1, 3, 1, 1, 1), torch.tensor(enc.std).view(1, 3, 1, 1, 1)
    x = (torch.from_numpy(np.stack(clips_uint8)).permute(0, 4, 1, 2, 3).float() / 255 - mean) / std
    model.eval()
    with torch.no_grad():
        out = model(x, {"audio": torch.from_numpy(np.repeat(audio[None], len(x), 0))})
    return out["logits"].softmax(1).numpy(), out["regression"][:, 0].numpy()


def test_one_test_view_is_the_centre_window_and_centre_crop_as_before(mer_videos, tmp_path):
    """test_views=1 predicts from expmae.data's deterministic view (centre window, centre crop), the one end-to-end
    evaluation used before multi-view testing, on real mp4 clips, batched 4 clips at a time."""
    from expmae.data import VideoClipDataset
    from expmae.finetune.featureset import FeatureSet

    data = mer_videos
    names = data["names"][:6]
    audio = np.random.default_rng(1).normal(size=(6, 8)).astype(np.float32)
    backend = view_backend(data["videos"], data["encoder"], tmp_path / "out", 1)
    torch.manual_seed(0)
    model = backend.build_model({"audio": 8})
    probs, valence = backend.predict(model, FeatureSet(names, {"audio": audio}))

    centre = VideoClipDataset([str(data["videos"] / f"{n}.mp4") for n in names], 4, 2, 32, train=False)
    for i in range(6):
        p, v = oracle_predict(model, [centre[i].permute(1, 2, 3, 0).numpy()], audio[i])
        np.testing.assert_allclose(probs[i], p[0], rtol=0, atol=1e-6)
        np.testing.assert_allclose(valence[i], v[0], rtol=0, atol=1e-6)
    assert len({tuple(p.round(6)) for p in probs}) == 6  # six clips, six different predictions


def test_several_test_views_average_the_softmax_over_windows_spread_over_the_clip(tmp_path, monkeypatch):
    """.npy face clips 32 x 48 (centre crop = columns 8..39, already the encoder's 32 px: no resampling), 4 frames
    2 apart (a window spans 7 frames). 3 views: windows from the first frame to the last, evenly spread; a clip
    shorter than a window has its one padded window; a clip 1 frame longer than a window has 2 distinct ones."""
    from expmae.export import save_encoder
    from expmae.files import JsonlLog
    from expmae.finetune.featureset import FeatureSet

    torch.manual_seed(0)
    encoder = save_encoder(tiny_model(), tmp_path / "encoder", sample_stride=2)
    rng = np.random.default_rng(0)
    lengths = {"long25": 25, "short5": 5, "broken": 0, "near8": 8, "long41": 41}
    frames, clips = {}, tmp_path / "faces" / "clips"  # an expmae-crop output folder
    clips.mkdir(parents=True)
    for name, n in lengths.items():
        if n:  # noise on a brightness ramp: windows at the start and the end look different
            frames[name] = (rng.integers(0, 56, (n, 32, 48, 3)) + np.linspace(0, 199, n)[:, None, None, None]).astype(np.uint8)
            np.save(clips / f"{name}.npy", frames[name])
    (clips / "broken.npy").write_bytes(b"not an array")
    names = list(lengths)
    audio = rng.normal(size=(len(names), 8)).astype(np.float32)
    features = FeatureSet(names, {"audio": audio})

    # Hand-computed windows: starts evenly from 0 to (length - 7); the short clip holds its last frame.
    starts = {"long25": [0, 9, 18], "near8": [0, 1], "long41": [0, 17, 34]}
    windows = {name: [s + 2 * np.arange(4) for s in st] for name, st in starts.items()}
    windows["short5"] = [np.array([0, 2, 4, 4])]
    centre = {"long25": 9, "near8": 0, "long41": 17}  # (length - 7) // 2, the one-view window

    batches = []
    one_view = view_backend(tmp_path / "faces", encoder, tmp_path / "out", 1)
    three_views = view_backend(tmp_path / "faces", encoder, tmp_path / "out", 3, workers=1)
    torch.manual_seed(1)
    model = one_view.build_model({"audio": 8})
    with torch.no_grad():
        model.head.fc_emotion.weight *= 50  # views then differ by far more than float rounding
    model.encoder.blocks[0].register_forward_pre_hook(lambda m, args: batches.append(len(args[0])))  # clips per batch
    probs1, valence1 = one_view.predict(model, features)
    batches.clear()
    probs3, valence3 = three_views.predict(model, features)
    probs3_again, _ = three_views.predict(model, features)
    # 3 + 1 + 0 + 2 + 3 views in batches of 4 clips; long41's views span two batches.
    assert batches == [4, 4, 1] * 2
    np.testing.assert_array_equal(probs3_again, probs3)

    for i, name in enumerate(names):
        if name == "broken":  # uniform, valence 0, one failure record however often it is evaluated
            np.testing.assert_array_equal(probs1[i], np.full(6, 1 / 6, np.float32))
            np.testing.assert_array_equal(probs3[i], probs1[i])
            assert valence1[i] == valence3[i] == 0
            continue
        view_probs, view_valence = oracle_predict(model, [frames[name][w][:, :, 8:40] for w in windows[name]], audio[i])
        np.testing.assert_allclose(probs3[i], view_probs.mean(0), rtol=0, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(valence3[i], view_valence.mean(), rtol=0, atol=1e-5, err_msg=name)
        assert abs(probs3[i].sum() - 1) < 1e-5
        if name == "short5":  # one padded view, whatever the number of views asked for
            np.testing.assert_allclose(probs1[i], probs3[i], rtol=0, atol=1e-6)
        else:  # the mean is not any single view's, and one view is the centre window
            assert np.abs(view_probs - probs3[i]).max(1).min() > 1e-3, name
            c = centre[name]
            p, v = oracle_predict(model, [frames[name][c + 2 * np.arange(4)][:, :, 8:40]], audio[i])
            np.testing.assert_allclose(probs1[i], p[0], rtol=0, atol=1e-5, err_msg=name)
    failures = JsonlLog(tmp_path / "out" / "clip_failures.jsonl").read()
    assert [(f["key"], f["stage"]) for f in failures] == [("broken", "evaluation")] * 2  # one per backend (run)


def test_eval_windows_spread_evenly_and_dedupe():
    from expmae.finetune.backends.video_data import eval_windows

    # by hand: a window of 4 frames 3 apart spans 10 frames
    assert eval_windows(100, 4, 3, 1).tolist() == [[45, 48, 51, 54]]  # the centre: (100 - 10) // 2
    assert eval_windows(100, 4, 3, 4)[:, 0].tolist() == [0, 30, 60, 90]
    assert eval_windows(10, 4, 3, 5).tolist() == [[0, 3, 6, 9]]  # exactly one window fits
    assert eval_windows(6, 4, 3, 2).tolist() == [[0, 3, 5, 5]]  # shorter: padded with the last frame
    with pytest.raises(ValueError, match="views=0"):
        eval_windows(100, 4, 3, 0)


def test_a_finished_one_view_fold_is_not_reused_for_three_views(mer_videos, tmp_path, capsys):
    from expmae.finetune.cli import main

    out = tmp_path / "run"
    args = e2e_args(mer_videos, out, "--epochs", "1", "--head", "concat", "--no-tensorboard")
    assert main(args) == 0
    one = {k: dict(np.load(out / f"fold{k}" / "round0" / "predictions.npz")) for k in range(2)}
    history_one = [json.loads((out / f"fold{k}" / "round0" / "result.json").read_text())["history"] for k in range(2)]
    capsys.readouterr()

    assert main(args + ["--test-views", "3"]) == 0
    assert "finished earlier" not in capsys.readouterr().err  # both folds trained and evaluated again
    for k in range(2):
        run = out / f"fold{k}" / "round0"
        three = dict(np.load(run / "predictions.npz"))
        history = json.loads((run / "result.json").read_text())["history"]
        # Training does not depend on the views (same losses); every prediction of the fold does.
        assert [h["train_loss"] for h in history] == [h["train_loss"] for h in history_one[k]]
        for key in ("val_probs", "test0_probs"):
            assert not np.allclose(three[key], one[k][key], rtol=0, atol=1e-7), (k, key)
    assert json.loads((out / "results.json").read_text())["config"]["test_views"] == 3

    assert main(args + ["--test-views", "3"]) == 0  # the same views again: reused
    assert capsys.readouterr().err.count("finished earlier with the same settings") == 2
