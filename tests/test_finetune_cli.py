"""The one-command MER2023 protocol end to end on tiny synthetic feature folders + label CSVs."""
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score, mean_squared_error

from expmae.finetune.cli import main
from expmae.labels import MER_CLASSES, read_label_csv

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_labels(path, names, classes, valence=None):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "discrete", "valence"] if valence is not None else ["name", "discrete"])
        for i, (n, c) in enumerate(zip(names, classes)):
            writer.writerow([n, MER_CLASSES[c]] + ([f"{valence[i]:.3f}"] if valence is not None else []))
    return path


@pytest.fixture(scope="module")
def mer_data(tmp_path_factory):
    """A MER2023-shaped dataset: Train&Val (90, one sample lacking its visual feature), a labelled test set
    (24), a name-only test list (6) and 60 unlabeled samples; audio utterance-level, visual frame-level."""
    root = tmp_path_factory.mktemp("mer")
    rng = np.random.default_rng(0)
    means_audio, means_visual = rng.normal(size=(6, 8)), rng.normal(size=(6, 12))
    (root / "audio").mkdir(), (root / "visual").mkdir()
    names = [f"sample_{i:08d}" for i in range(180)]
    classes = np.arange(180) % 6
    for name, c in zip(names, classes):
        np.save(root / "audio" / f"{name}.npy", (means_audio[c] + 0.7 * rng.normal(size=8)).astype(np.float32))
        np.save(root / "visual" / f"{name}.npy", (means_visual[c] + 0.7 * rng.normal(size=(4, 12))).astype(np.float32))
    (root / "visual" / "sample_00000003.npy").unlink()
    valence = np.linspace(-4, 4, 6)[classes] + 0.3 * rng.normal(size=180)
    write_labels(root / "train-label.csv", names[:90], classes[:90], valence[:90])
    write_labels(root / "test1-label.csv", names[90:114], classes[90:114], valence[90:114])
    (root / "test3-names.txt").write_text("\n".join(names[114:120]) + "\n")
    return {"root": root, "names": names, "classes": classes, "valence": valence}


def base_args(data, out, *extra):
    root = data["root"]
    return ["--labels", str(root / "train-label.csv"), "--features", str(root / "audio"), f"visual={root / 'visual'}",
            "--test", str(root / "test1-label.csv"), str(root / "test3-names.txt"), "--out", str(out),
            "--epochs", "10", "--lr", "0.003", "--hidden-dim", "32", "--no-progress", "--threads", "1", *extra]


def test_script_runs_the_five_fold_protocol_and_prints_the_combined_metric(mer_data, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "finetune/train_fusion.py", *base_args(mer_data, out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())

    printed = re.search(r"^metric (-?\d+\.\d+) \(metric_e (\d+\.\d+), metric_v (\d+\.\d+)\)", proc.stdout, re.M)
    assert printed, proc.stdout
    cv = results["cv"]
    assert float(printed.group(1)) == pytest.approx(cv["metric"], abs=1e-4)
    assert cv["metric"] == pytest.approx(cv["metric_e"] - 0.25 * cv["metric_v"])
    assert cv["metric"] == pytest.approx(np.mean([f["metric"] for f in results["folds"]]))  # mean of folds' best

    # Five stratified folds over the 89 usable samples; the one lacking a feature is reported, not silent.
    assert len(results["folds"]) == 5 and sum(f["num_val"] for f in results["folds"]) == 89 == results["num_train"]
    assert all(0 <= f["best_epoch"] < 10 for f in results["folds"])
    fold0 = json.loads((out / "fold0" / "round0" / "result.json").read_text())
    assert len(fold0["history"]) == 10  # per-epoch curves kept with the fold
    best = max(fold0["history"], key=lambda h: h["metric"])  # best epoch = best combined metric on the held-out fold
    assert best["epoch"] == fold0["best_epoch"] and best["metric"] == pytest.approx(fold0["metric"])
    assert results["missing_features"] == {str(mer_data["root"] / "visual"): ["sample_00000003"]}
    assert "sample_00000003" in proc.stderr
    assert results["feature_dims"] == {"audio": 8, "visual": 12}

    for png in [out / "confusion_matrix.png", out / "confusion_matrix_test1-label.png"]:
        assert png.read_bytes()[:8] == PNG_MAGIC
    assert len(list(out.glob("fold*/round0/head.safetensors"))) == 5
    assert list(out.glob("tb/events.out.tfevents.*"))

    # Labelled test set: the reported metrics agree with sklearn on the written predictions.
    test = results["tests"]["test1-label"]
    pred = read_label_csv(test["predictions_csv"])
    truth = read_label_csv(mer_data["root"] / "test1-label.csv")
    assert list(pred) == list(truth)
    y_true = [truth[n].emotion for n in truth]
    y_pred = [pred[n].emotion for n in truth]
    assert test["metrics"]["metric_e"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"))
    mse = mean_squared_error([truth[n].valence for n in truth], [pred[n].valence for n in truth])
    assert test["metrics"]["metric_v"] == pytest.approx(mse, abs=1e-3)  # the CSV rounds valence to 4 decimals
    assert test["metrics"]["metric_e"] > 0.5  # the synthetic classes are learnable: the pipeline really learns

    # Name-only test list: predictions for every name, no metrics.
    names_only = results["tests"]["test3-names"]
    assert "metrics" not in names_only
    assert list(read_label_csv(names_only["predictions_csv"])) == mer_data["names"][114:120]


def test_rerun_reuses_finished_folds_and_changed_settings_or_features_retrain(mer_data, tmp_path, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(mer_data["root"], root)
    data = {**mer_data, "root": root}
    out = tmp_path / "run"
    args = base_args(data, out, "--head", "concat", "--no-tensorboard", "--folds", "3")
    assert main(args) == 0
    first = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().err.count("finished earlier with the same settings") == 3
    assert json.loads((out / "results.json").read_text())["folds"] == first["folds"]
    assert main(args + ["--lr", "0.001"]) == 0
    assert "finished earlier" not in capsys.readouterr().err
    np.save(root / "audio" / "sample_00000000.npy", np.zeros(8, np.float32))  # a re-extracted feature
    assert main(args + ["--lr", "0.001"]) == 0
    assert "finished earlier" not in capsys.readouterr().err


def test_weak_pseudo_labelling_adds_only_minority_classes_to_each_folds_training_split(mer_data, tmp_path):
    out = tmp_path / "semi"
    args = base_args(mer_data, out, "--head", "mfb", "--no-tensorboard", "--pseudo-label", "weak",
                     "--minority", "worried,surprise", "--threshold", "0.3", "--rounds", "2")
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    semi = results["pseudo_label"]
    # unlabeled = every sample with features in all folders that is neither Train&Val nor a test name: 180 - 90 - 24 - 6
    assert semi["num_unlabeled"] == 60 and len(semi["per_fold"]) == 5
    assert sum(f["num_selected"] for f in semi["per_fold"]) > 0
    for fold, record in zip(semi["per_fold"], results["folds"]):
        assert fold["history"] and all(h["classes"] == ["worried", "surprise"] for h in fold["history"])
        added = {c: sum(h["added_per_class"][c] for h in fold["history"]) for c in MER_CLASSES}
        assert all(added[c] == 0 for c in MER_CLASSES[:4]) and added["worried"] + added["surprise"] == fold["num_selected"]
        # the fold's final model trained on its labelled split plus its own pseudo-labels; the held-out split is unchanged
        k = fold["fold"]
        round0 = json.loads((out / f"fold{k}" / "round0" / "result.json").read_text())
        assert record["num_pseudo"] == fold["num_selected"] and record["num_train"] == round0["num_train"] + fold["num_selected"]
        assert record["num_val"] == round0["num_val"]
        if fold["num_selected"]:
            pseudo = read_label_csv(out / f"fold{k}" / "pseudo_labels.csv", require_valence=False)
            assert len(pseudo) == fold["num_selected"] and set(pseudo).isdisjoint(mer_data["names"][:120])
    assert results["rounds"][0]["round"] == 0 and len(results["rounds"]) >= 2


def test_bad_inputs_fail_with_one_line_naming_file_and_column(mer_data, tmp_path, capsys):
    bad = tmp_path / "bad-label.csv"
    bad.write_text("name,emotion,valence\nsample_00000000,happy,1\n")
    args = base_args(mer_data, tmp_path / "out")
    args[args.index("--labels") + 1] = str(bad)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(bad) in err and "missing column 'discrete'" in err

    config = tmp_path / "cfg.yaml"
    config.write_text("epochs: 3\nlearning_rate: 0.1\n")
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(config) in err and "unknown setting 'learning_rate'" in err
    config.write_text("epochs: ten\n")
    assert main(["--config", str(config)]) == 2
    assert "setting 'epochs' is 'ten'; expected int" in capsys.readouterr().err


def test_yaml_config_with_command_line_override(mer_data, tmp_path, capsys):
    root = mer_data["root"]
    config = tmp_path / "cfg.yaml"
    config.write_text(
        f"labels: {root / 'train-label.csv'}\nfeatures:\n  - audio={root / 'audio'}\nout_dir: {tmp_path / 'yaml'}\n"
        "head: attention\nepochs: 50\nfolds: 2\nlr: 3e-3\ntensorboard: false\nprogress: false\nthreads: 1\n"
    )
    assert main(["--config", str(config), "--epochs", "2"]) == 0  # unimodal run: the same code with one branch
    results = json.loads((tmp_path / "yaml" / "results.json").read_text())
    assert results["config"]["epochs"] == 2 and results["config"]["head"] == "attention" and results["config"]["lr"] == 0.003
    assert list(results["feature_dims"]) == ["audio"] and len(results["folds"]) == 2
    assert "metric" in capsys.readouterr().out


@pytest.mark.parametrize("path", sorted((REPO / "finetune" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    from expmae.finetune.config import FinetuneConfig, load_config

    cfg = FinetuneConfig(**load_config(path))
    assert cfg.labels and cfg.features and cfg.head in ("attention", "mfb", "concat")
