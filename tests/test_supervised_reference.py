"""expmae.supervised_reference: the learning benchmark's ceiling trains, scores the held-out people with its head,
and a killed run resumed from its state ends bit-equal to a straight run."""
import json

import pytest
import torch

from expmae.config import load_config
from expmae.data import normalize_clips
from expmae.learning_benchmark import LearningBenchmarkSize, read_labels, write_learning_benchmark
from expmae.shipped_configs import resolve_config
from expmae.supervised_reference import SupervisedRecipe, SupervisedReference


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    paths = write_learning_benchmark(out, LearningBenchmarkSize.quick(), progress=False)
    rows = read_labels(paths["labelled"], "static")
    split = {s: {r["name"]: r["discrete"] for r in rows if r["split"] == s} for s in ("train", "test")}
    cfg = load_config(resolve_config("learning_small", "pretrain"), ["model.drop_path_rate=0.1"])  # RNG in training
    return cfg, (paths["labelled"] / "clips", split["train"]), (paths["labelled"] / "clips", split["test"])


def reference(bench, folder, **recipe):
    cfg, train, test = bench
    recipe = SupervisedRecipe(**{"steps": 4, "batch_size": 4, "warmup_steps": 1, "eval_every": 2, "save_every": 2, **recipe})
    return SupervisedReference(cfg, train, test, folder, recipe)


def test_trains_logs_the_curve_and_summarises(bench, tmp_path):
    ref = reference(bench, tmp_path)
    before = [p.detach().clone() for p in ref.encoder.parameters()]
    encoder = ref.run(progress=False)
    assert not encoder.training and ref.step == 4
    assert any(not torch.equal(a, b) for a, b in zip(before, encoder.parameters()))  # the encoder itself trains
    curve = [json.loads(line) for line in (tmp_path / "curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [2, 4]
    summary = ref.summary()
    assert summary["head_acc"] == curve[-1]["head_acc"] == ref.head_accuracy()
    n = summary["test_clips"]
    assert n == len(bench[2][1]) and summary["train_clips"] == len(bench[1][1])
    assert round(summary["head_acc"] * n) == pytest.approx(summary["head_acc"] * n)  # a count of held-out clips
    low, high = summary["head_acc_ci95"]
    assert 0 <= low <= summary["head_acc"] <= high <= 1


def test_killed_run_resumes_bit_equal(bench, tmp_path):
    # scored at step 3, saved at 2: the resumed run opens a loader at step 2 that the straight run does not
    straight = reference(bench, tmp_path / "straight", eval_every=3).run(progress=False)
    first = reference(bench, tmp_path / "killed", eval_every=3)  # killed after step 2, where it saved
    for clips, labels in first.batches(0):
        first.train_step(clips, labels)
        if first.step == 2:
            break
    first.save()
    resumed = reference(bench, tmp_path / "killed", eval_every=3).run(progress=False)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_state_of_another_recipe_is_refused(bench, tmp_path):
    reference(bench, tmp_path).run(progress=False)
    with pytest.raises(ValueError, match="another recipe"):
        reference(bench, tmp_path, lr=3e-4).run(progress=False)


def test_position_head_reads_time_averaged_tokens_per_patch(bench, tmp_path):
    ref = reference(bench, tmp_path, readout="position")
    m = ref.mcfg
    n = (m.img_size // m.patch_size) ** 2
    assert ref.classifier.head.in_features == n * m.embed_dim
    clips = torch.randint(0, 255, (2, 3, m.num_frames, m.img_size, m.img_size), dtype=torch.uint8)
    ref.encoder.eval()
    with torch.no_grad():
        tokens = ref.encoder.forward_clips(normalize_clips(clips, mean=m.mean, std=m.std))[:, ref.encoder.num_prefix_tokens:]
        t = m.num_frames // m.tubelet_size
        expected = torch.stack([torch.cat([tokens[b, [s * n + p for s in range(t)]].mean(0) for p in range(n)])
                                for b in range(2)])  # token index = time slot * positions + position
        assert torch.allclose(ref.logits(clips), ref.classifier.head(expected), atol=1e-5)
    with pytest.raises(ValueError, match="readout='pooled'"):
        reference(bench, tmp_path / "bad", readout="pooled")


def test_init_from_a_checkpoint_finetunes_that_encoder(bench, tmp_path):
    from conftest import write_checkpoint
    from expmae.model import create_model

    cfg = bench[0]
    torch.manual_seed(123)  # not the recipe's seed: the weights must come from the file
    pretrained = create_model(cfg.model.name, **cfg.model.overrides())
    path = write_checkpoint(tmp_path / "run", pretrained)
    ref = reference(bench, tmp_path / "ref", init=str(path))
    for (name, a), b in zip(pretrained.encoder.state_dict().items(), ref.encoder.state_dict().values()):
        assert torch.equal(a, b), name
    scratch = reference(bench, tmp_path / "scratch")
    assert not torch.equal(scratch.encoder.patch_embed.proj.weight, ref.encoder.patch_embed.proj.weight)


def test_frame_cnn_averages_per_frame_logits_and_trains(bench, tmp_path):
    ref = reference(bench, tmp_path, model="frame_cnn")
    net = ref.classifier.eval()
    x = torch.randn(2, 3, 4, 48, 48)
    per_frame = torch.stack([net.net(x[:, :, t]) for t in range(4)], 1)  # (B, T, classes)
    assert torch.allclose(net(x), per_frame.mean(1), atol=1e-6)
    net.train()  # training reads one random frame per clip (BatchNorm on that batch of frames)
    torch.manual_seed(5)
    picked = torch.randint(4, (2,))
    torch.manual_seed(5)
    assert torch.allclose(net(x), net.net(x[torch.arange(2), :, picked]), atol=1e-6)
    assert ref.run(progress=False) is None  # no encoder to probe: its own head's accuracy is the score
    assert ref.summary()["steps"] == 4
    with pytest.raises(ValueError, match="model='resnet'"):
        reference(bench, tmp_path / "bad", model="resnet")
