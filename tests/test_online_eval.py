"""Online evaluation during pretraining: the same features as expmae-features, the same probes as expmae.probe,
a step-0 score equal to the random-init encoder's offline probe, no effect on training, and the curve of a killed
and resumed 2-rank run equal to a straight run's (ZeRO-2), also under partitioned ZeRO-3."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from launching import (LAUNCH_TIMEOUT, REPO, finish, kill_hard, launch, read_metrics, run_ok, write_launcher,
                       write_tiny_config)

EVAL = {"every": 2, "layers": [-1, 1], "readouts": ["mean", "position"], "knn_k": 3, "batch_size": 5}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> dict:
    from expmae.learning_benchmark import LearningBenchmarkSize, write_learning_benchmark

    size = dataclasses.replace(LearningBenchmarkSize.quick(), pool_identities=4, identities=6, test_identities=2,
                               clips_per_identity=4, num_frames=8)
    return write_learning_benchmark(tmp_path_factory.mktemp("bench"), size, progress=False)


def eval_section(bench: dict, **extra) -> dict:
    return {"source": str(bench["labelled"]), "labels": str(bench["labelled"] / "labels.csv"), **EVAL, **extra}


def train_single(config: Path, log: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    rc = subprocess.call([sys.executable, "-m", "expmae.pretrain", "--config", str(config)], cwd=REPO, env=env,
                         stdout=open(log, "w"), stderr=subprocess.STDOUT, timeout=LAUNCH_TIMEOUT)
    assert rc == 0, log.read_text()[-3000:]


def evals(records: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in records if any(k.startswith("eval/") for k in r)}


def losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def single(tmp_path_factory, bench) -> dict[str, Path]:
    """One process, 4 steps, evaluated at 0, 2 and 4; and the same run without the evaluation."""
    work = tmp_path_factory.mktemp("single")
    runs = {}
    for name, section in (("eval", eval_section(bench)), ("plain", {})):
        config = write_tiny_config(work / f"{name}.yaml", bench["pool"], work / name, eval=section,
                                   train={"max_steps": 4}, data={"num_workers": 0}, log={"recon_every": 0})
        train_single(config, work / f"{name}.txt")
        runs[name] = work / name
    return runs


def test_eval_is_logged_at_step_0_every_n_steps_and_at_the_end_without_changing_training(single):
    records = read_metrics(single["eval"])
    by_step = evals(records)
    assert sorted(by_step) == [0, 2, 4]
    for task in ("static", "dynamic"):  # every task of the CSV on its own; the first layer is the headline
        for key in ("knn_acc", "probe_acc", "probe_uar", "L2/mean/knn_acc", "L1/position/linear_acc"):
            assert 0 <= by_step[4][f"eval/{task}/{key}"] <= 1, key
        assert by_step[4][f"eval/{task}/knn_acc"] == by_step[4][f"eval/{task}/L2/mean/knn_acc"]
    assert 0 < by_step[4]["eval/time_share"] < 1 and by_step[4]["eval/seconds"] > 0
    assert losses(records) == losses(read_metrics(single["plain"]))  # the probes' draws leave training alone
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(single["eval"] / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("eval/static/knn_acc")] == [0, 2, 4]


def offline_features(encoder_dir: Path, bench: dict, out: Path, layer: int, readout: str, stride: int) -> Path:
    from expmae.features.visual import extract_visual_features

    extract_visual_features(bench["labelled"], out, encoder_dir, layers=(layer,), readout=readout,
                            sample_stride=stride, progress=False, device="cpu")
    return out


def test_step_0_equals_the_offline_probe_of_the_random_init_encoder(single, bench, tmp_path):
    """expmae-export's random-init twin -> expmae-features -> expmae.probe: the online step-0 numbers, exactly."""
    from expmae.benchmark import save_random_init_encoder
    from expmae.config import load_config
    from expmae.learning_benchmark import read_labels
    from expmae.probe import knn_probe, linear_probe, read_features

    cfg = load_config(single["eval"] / "config.yaml")
    encoder = save_random_init_encoder(cfg.model.name, cfg.model.overrides(), tmp_path / "enc", seed=cfg.train.seed)
    step0 = evals(read_metrics(single["eval"]))[0]
    checked = 0
    for layer, readout in ((-1, "mean"), (1, "position")):
        feats = offline_features(encoder, bench, tmp_path / f"f{layer}{readout}", layer, readout, cfg.data.sample_stride)
        for task in ("static", "dynamic"):
            rows = read_labels(bench["labelled"], task)
            fit, test = ([r for r in rows if r["split"] == s] for s in ("train", "test"))
            x, x_test = (read_features(feats, [r["name"] for r in part]) for part in (fit, test))
            y, y_test = ([r["discrete"] for r in part] for part in (fit, test))
            key = f"eval/{task}/L{layer % (cfg.model.depth + 1)}/{readout}"
            assert step0[f"{key}/knn_acc"] == knn_probe(x, y, x_test, y_test, k=3)["accuracy"]
            assert step0[f"{key}/linear_acc"] == linear_probe(x, y, x_test, y_test)["accuracy"]
            checked += 1
    assert checked == 4


def test_online_knn_equals_sklearn_and_the_linear_probe_equals_expmae_probe(bench):
    """The evaluator's scores from its own features against sklearn's KNeighborsClassifier (cosine, weights
    exp(sim / T)) and expmae.probe.linear_probe, fitted here on the same features and split."""
    import torch
    from sklearn.neighbors import KNeighborsClassifier

    from expmae.config import EvalConfig
    from expmae.model import create_model
    from expmae.pretrain.online_eval import OnlineEvaluator
    from expmae.probe import linear_probe

    torch.manual_seed(0)
    model = create_model("tiny", img_size=32, num_frames=4, patch_size=8, embed_dim=48, depth=2, num_heads=3)
    cfg = EvalConfig(**eval_section(bench, knn_k=5, knn_temperature=0.1, layers=[-1], readouts=["mean"]))
    evaluator = OnlineEvaluator(cfg, model.encoder, sample_stride=2, rank=0, world=1, device="cpu")
    assert model.encoder.training  # building the evaluator leaves the training mode alone
    feats = evaluator.features(model.encoder)["L2/mean"]
    scores = evaluator.score(evaluator.mine, {"L2/mean": feats})
    data = evaluator.data
    for task in ("static", "dynamic"):
        fit, test = (data.tasks == task) & ~data.held_out, (data.tasks == task) & data.held_out
        knn = KNeighborsClassifier(n_neighbors=5, metric="cosine", algorithm="brute",
                                   weights=lambda d: np.exp((1 - d) / 0.1)).fit(feats[fit], data.labels[fit])
        assert scores[f"eval/{task}/knn_acc"] == pytest.approx(np.mean(knn.predict(feats[test]) == data.labels[test]))
        lin = linear_probe(feats[fit], data.labels[fit], feats[test], data.labels[test])
        assert scores[f"eval/{task}/probe_acc"] == lin["accuracy"]
        assert scores[f"eval/{task}/probe_uar"] == lin["balanced_accuracy"]


def test_bad_eval_settings_are_one_line_errors(bench, tmp_path):
    from expmae.config import ConfigError, EvalConfig, load_config
    from expmae.pretrain.online_eval import read_eval_set

    with pytest.raises(ConfigError, match="eval.source is set but eval.labels is not"):
        load_config(None, [f"data.source={bench['pool']}", f"eval.source={bench['labelled']}"])
    bad = tmp_path / "labels.csv"
    bad.write_text("name,discrete,split\nnot_a_clip,happy,train\n")
    with pytest.raises(ConfigError, match=r"1 clips not found in eval.source=.*'not_a_clip'"):
        read_eval_set(EvalConfig(source=str(bench["labelled"]), labels=str(bad)))
    name = read_eval_set(EvalConfig(**eval_section(bench))).names[0]
    bad.write_text(f"name,discrete,split\n{name},happy,holdout\n")
    with pytest.raises(ConfigError, match="split value 'holdout'"):
        read_eval_set(EvalConfig(source=str(bench["labelled"]), labels=str(bad)))
    bad.write_text(f"name,discrete,identity\n{name},happy,7\n")  # one person: nobody left to fit on
    with pytest.raises(ConfigError, match="no train clips"):
        read_eval_set(EvalConfig(source=str(bench["labelled"]), labels=str(bad)))


def test_without_a_split_column_whole_identities_are_held_out(bench, tmp_path):
    import csv

    from expmae.config import EvalConfig
    from expmae.pretrain.online_eval import read_eval_set

    with open(bench["labelled"] / "labels.csv") as f:
        rows = [{k: r[k] for k in ("name", "discrete", "identity")} for r in csv.DictReader(f)]
    path = tmp_path / "no_split.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    data = read_eval_set(EvalConfig(source=str(bench["labelled"]), labels=str(path), val_fraction=0.25))
    identity = np.array([r["identity"] for r in rows])
    assert set(identity[data.held_out]).isdisjoint(identity[~data.held_out])
    assert len(set(identity[data.held_out])) == 2  # ceil(0.25 x 6 people)


# ---------------------------------------------------------------------------------------- two ranks


@pytest.fixture(scope="module")
def distributed(tmp_path_factory, bench) -> Path:
    """2-rank ZeRO-2: a straight 6-step run evaluated every 2 steps, a run killed after its step-4 checkpoint and
    resumed; a partitioned ZeRO-3 run of 2 steps."""
    work = tmp_path_factory.mktemp("dist")
    common = dict(eval=eval_section(bench), train={"max_steps": 6, "batch_size": 2}, log={"recon_every": 0},
                  checkpoint={"every": 2, "keep_last": 5})
    run_ok(write_tiny_config(work / "straight.yaml", bench["pool"], work / "straight", **common), log=work / "s.txt")
    config = write_tiny_config(work / "killed.yaml", bench["pool"], work / "killed", **common)
    proc = launch(config, log=work / "k1.txt")
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not (work / "killed" / "checkpoints" / "step_0000004").is_dir() and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    kill_hard(proc)
    run_ok(config, "--resume", "auto", log=work / "k2.txt")
    from test_pretrain_dist import ZERO3

    launcher = write_launcher(work / "zero3.yaml", deepspeed=ZERO3)
    run_ok(write_tiny_config(work / "zero3_train.yaml", bench["pool"], work / "zero3",
                             **{**common, "train": {"max_steps": 2, "batch_size": 2}}), log=work / "z.txt",
           launcher=launcher)
    return work


@pytest.mark.timeout(6 * LAUNCH_TIMEOUT)
def test_two_rank_curves_resume_exactly_and_zero3_evaluates_like_zero2(distributed, single):
    straight, resumed = (evals(read_metrics(distributed / n)) for n in ("straight", "killed"))
    assert sorted(straight) == sorted(resumed) == [0, 2, 4, 6]  # no evaluation redone or lost by the resume
    for step in (0, 2, 4, 6):
        for key, value in straight[step].items():
            if key.startswith("eval/") and key.endswith(("_acc", "_uar")):
                assert resumed[step][key] == value, (step, key)
    # step 0: the same init weights whatever the ranks, so the gathered scores are the single process's
    zero3 = evals(read_metrics(distributed / "zero3"))
    one = evals(read_metrics(single["eval"]))[0]
    assert sorted(zero3) == [0, 2]
    for key, value in one.items():
        if key.startswith("eval/") and key.endswith("_acc"):
            assert straight[0][key] == value and zero3[0][key] == value, key
