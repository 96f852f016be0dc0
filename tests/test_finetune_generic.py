"""Any labelled set through expmae-finetune: arbitrary class names, the set's own folds (split column, split files,
train/test lists), WAR / UAR / F1 / CCC checked against scikit-learn on the written predictions, the features and
the end-to-end backends; the heads comparison (svm, transformer) and its table."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, mean_squared_error, recall_score

from expmae.finetune.cli import main

CLASSES = ["zz-anger", "Calm", "joy"]  # sorted: "Calm" < "joy" < "zz-anger"


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def ccc(t, p):
    t, p = np.asarray(t, float), np.asarray(p, float)
    return 2 * np.cov(t, p, bias=True)[0, 1] / (t.var() + p.var() + (t.mean() - p.mean()) ** 2)


@pytest.fixture(scope="module")
def three_class(tmp_path_factory):
    """60 samples of 3 classes with arbitrary names, a fixed 3-value split column and an arousal column; one
    visual feature folder; 6 unlabeled-test names."""
    root = tmp_path_factory.mktemp("generic")
    rng = np.random.default_rng(1)
    means = rng.normal(size=(3, 6)) * 1.5
    (root / "visual").mkdir()
    names = [f"clip{i:03d}" for i in range(66)]
    label = np.arange(66) % 3
    for n, c in zip(names, label):
        np.save(root / "visual" / f"{n}.npy", (means[c] + rng.normal(size=6)).astype(np.float32))
    fold = ["ABC"[(i // 3) % 3] for i in range(60)]  # a fixed split: blocks of three samples (one per class) per fold
    rows = [[n, CLASSES[c], f"{c - 1 + 0.2 * rng.normal():.3f}", fold[i]] for i, (n, c) in enumerate(zip(names[:60], label))]
    write_csv(root / "labels.csv", ["name", "label", "arousal", "fold"], rows)
    write_csv(root / "test.csv", ["name", "label"], [[n, CLASSES[c]] for n, c in zip(names[60:], label[60:])])
    return {"root": root, "names": names, "label": label, "fold": fold}


def common_args(root, out, *extra):
    return ["--labels", str(root / "labels.csv"), "--out", str(out), "--epochs", "8", "--lr", "0.01", "--hidden-dim",
            "16", "--no-progress", "--no-tensorboard", "--threads", "1", *extra]


def assert_scores_match_sklearn(results, out, classes, folds):
    """UAR / WAR / F1 in results.json = sklearn on predictions_cv.csv, pooled and per fold."""
    rows = read_csv(out / "predictions_cv.csv")
    y_true = {r["name"]: r["label"] for r in read_csv(results["config"]["labels"])}
    t = [y_true[r["name"]] for r in rows]
    p = [r["label"] for r in rows]
    pooled = results["cv_pooled"]
    assert pooled["war"] == pytest.approx(accuracy_score(t, p))
    assert pooled["uar"] == pytest.approx(balanced_accuracy_score(t, p))
    assert pooled["weighted_f1"] == pytest.approx(f1_score(t, p, average="weighted"))
    assert pooled["macro_f1"] == pytest.approx(f1_score(t, p, average="macro"))
    for c, r in zip(classes, recall_score(t, p, labels=classes, average=None)):
        assert pooled[f"recall/{c}"] == pytest.approx(r)
    for k, name in enumerate(results["fold_names"]):
        fold_t = [a for a, r in zip(t, rows) if r["fold"] == name]
        fold_p = [b for b, r in zip(p, rows) if r["fold"] == name]
        assert results["folds"][k]["uar"] == pytest.approx(balanced_accuracy_score(fold_t, fold_p))
        assert results["folds"][k]["war"] == pytest.approx(accuracy_score(fold_t, fold_p))
    assert results["cv"]["uar"] == pytest.approx(np.mean([f["uar"] for f in results["folds"]]))
    assert len(results["folds"]) == folds
    return rows


def test_three_arbitrary_classes_with_a_fixed_split_column(three_class, tmp_path, capsys):
    root = three_class["root"]
    out = tmp_path / "run"
    assert main(common_args(root, out, "--features", f"visual={root / 'visual'}", "--split-column", "fold",
                            "--test", str(root / "test.csv"), "--head", "concat")) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "csv" and results["classes"] == sorted(CLASSES) and results["metric"] == "uar"
    assert results["targets"] == ["arousal"] and results["fold_names"] == ["fold=A", "fold=B", "fold=C"]
    assert printed.startswith(f"uar {results['cv']['uar']:.4f} (war ")
    rows = assert_scores_match_sklearn(results, out, sorted(CLASSES), folds=3)
    # the folds are the column's: every sample held out exactly in the fold its column names
    column = {r["name"]: r["fold"] for r in read_csv(root / "labels.csv")}
    assert sorted(r["name"] for r in rows) == sorted(column)
    assert all(r["fold"] == f"fold={column[r['name']]}" for r in rows)
    # regression column: MSE and CCC against sklearn / the formula on the same written predictions
    truth = {r["name"]: float(r["arousal"]) for r in read_csv(root / "labels.csv")}
    t, p = [truth[r["name"]] for r in rows], [float(r["arousal"]) for r in rows]
    assert results["cv_pooled"]["mse/arousal"] == pytest.approx(mean_squared_error(t, p), abs=1e-3)
    assert results["cv_pooled"]["ccc/arousal"] == pytest.approx(ccc(t, p), abs=1e-3)
    assert results["cv_pooled"]["uar"] > 0.6  # the classes are learnable: the pipeline learns
    test = results["tests"]["test"]
    pred = read_csv(test["predictions_csv"])
    y = [r["label"] for r in read_csv(root / "test.csv")]
    assert test["metrics"]["uar"] == pytest.approx(balanced_accuracy_score(y, [r["label"] for r in pred]))
    assert test["metrics"]["mse/arousal"] is None  # the test file has no arousal: n/a, not 0


def test_class_order_split_files_and_train_test_lists(three_class, tmp_path):
    root = three_class["root"]
    rows = read_csv(root / "labels.csv")
    order = "joy,zz-anger,Calm"
    (root / "held_A.txt").write_text("\n".join(r["name"] for r in rows if r["fold"] == "A") + "\n")
    write_csv(root / "train_B.csv", ["name"], [[r["name"]] for r in rows if r["fold"] == "A"])
    write_csv(root / "test_B.csv", ["name"], [[r["name"]] for r in rows if r["fold"] == "B"])
    out = tmp_path / "files"
    assert main(common_args(root, out, "--features", str(root / "visual"), "--classes", order, "--targets", "none",
                            "--split-files", str(root / "held_A.txt"), f"{root / 'train_B.csv'}:{root / 'test_B.csv'}",
                            "--metric", "war", "--head", "transformer", "--head-layers", "2")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["classes"] == order.split(",") and results["targets"] == [] and results["metric"] == "war"
    size = {k: sum(r["fold"] == k for r in rows) for k in "ABC"}
    assert [f["num_val"] for f in results["folds"]] == [size["A"], size["B"]]
    # HELD_OUT: every other sample trains; TRAIN:HELD_OUT: the training list only
    assert [f["num_train"] for f in results["folds"]] == [60 - size["A"], size["A"]]
    best = json.loads((out / "fold0" / "round0" / "result.json").read_text())
    assert best["war"] == max(h["war"] for h in best["history"])  # --metric war picked the epoch
    assert_scores_match_sklearn(results, out, order.split(","), folds=2)

    # An official train / test split as a column: 'train' rows always train, one fold scored on 'test'.
    split = root / "official.csv"
    write_csv(split, ["name", "label", "set"], [[r["name"], r["label"], "test" if r["fold"] == "C" else "train"] for r in rows])
    out2 = tmp_path / "official"
    args = common_args(root, out2, "--features", str(root / "visual"), "--split-column", "set")
    args[1] = str(split)
    assert main(args) == 0
    official = json.loads((out2 / "results.json").read_text())
    assert official["fold_names"] == ["set=test"] and official["folds"][0]["num_val"] == size["C"]
    assert official["num_train"] == 60 and len(read_csv(out2 / "predictions_cv.csv")) == size["C"]


def test_bad_split_settings_fail_with_one_line(three_class, tmp_path, capsys):
    root = three_class["root"]
    (root / "stranger.txt").write_text("clip000\nnobody\n")
    cases = [(["--split-files", str(root / "stranger.txt")], "stranger.txt: 1 of 2 names are not in the label CSV"),
             (["--split-column", "fold", "--split-files", str(root / "stranger.txt")], "not both"),
             (["--split-column", "session"], "no split column 'session'"),
             (["--classes", "Calm,joy"], "'zz-anger' for 'clip000' is not one of ['Calm', 'joy']"),
             (["--metric", "metric"], "metric='metric': expected 'auto' or one of"),
             (["--head", "svm", "--pseudo-label", "reliable"], "head 'svm' gives no class confidences")]
    for extra, message in cases:
        assert main(common_args(root, tmp_path / "bad", "--features", str(root / "visual"), *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, (extra, err)


def test_three_classes_end_to_end_from_videos_with_a_split_column(tmp_path, make_video):
    """The --videos backend on the same kind of set: a tiny exported encoder, 9 clips of 3 arbitrary classes."""
    import torch

    from expmae.export import save_encoder
    from expmae.model import create_model

    torch.manual_seed(0)
    encoder = save_encoder(create_model("tiny", img_size=32, num_frames=4, depth=2), tmp_path / "encoder",
                           sample_stride=2, model_name="tiny")
    names = [f"v{i}" for i in range(9)]
    for i, n in enumerate(names):
        make_video(f"videos/{n}.mp4", num_frames=16, size=64, seed=i)
    write_csv(tmp_path / "labels.csv", ["name", "label", "fold"],
              [[n, CLASSES[i % 3], "1" if i < 3 else ("2" if i < 6 else "train")] for i, n in enumerate(names)])
    out = tmp_path / "e2e"
    assert main(["--labels", str(tmp_path / "labels.csv"), "--videos", str(tmp_path / "videos"), "--encoder", str(encoder),
                 "--split-column", "fold", "--out", str(out), "--epochs", "2", "--batch-size", "3", "--warmup-epochs", "1",
                 "--lr", "1e-3", "--no-progress", "--no-tensorboard", "--threads", "1", "--hidden-dim", "16"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["classes"] == sorted(CLASSES) and results["fold_names"] == ["fold=1", "fold=2"]
    assert results["feature_dims"] == {"visual": 192} and results["targets"] == []
    assert_scores_match_sklearn(results, out, sorted(CLASSES), folds=2)
    assert len(list(out.glob("fold*/round0/encoder/config.json"))) == 2


# ------------------------------------------------------------------------------------------------------ compare
def test_compare_writes_one_row_per_head_and_the_svm_row_is_sklearns_svc(tmp_path):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    from expmae.labels import MER_CLASSES, read_label_csv
    from expmae.finetune.featureset import load_features, parse_feature_specs

    rng = np.random.default_rng(0)
    (tmp_path / "audio").mkdir(), (tmp_path / "visual").mkdir()
    names = [f"sample_{i:08d}" for i in range(84)]
    classes = np.arange(84) % 6
    ma, mv = rng.normal(size=(6, 5)), rng.normal(size=(6, 7))
    for n, c in zip(names, classes):
        np.save(tmp_path / "audio" / f"{n}.npy", (ma[c] + 0.8 * rng.normal(size=5)).astype(np.float32))
        np.save(tmp_path / "visual" / f"{n}.npy", (mv[c] + 0.8 * rng.normal(size=(3, 7))).astype(np.float32))
    for path, part in (("train-label.csv", slice(0, 72)), ("test1-label.csv", slice(72, 84))):
        write_csv(tmp_path / path, ["name", "discrete", "valence"],
                  [[n, MER_CLASSES[c], f"{c - 2.5:.2f}"] for n, c in zip(names[part], classes[part])])
    out = tmp_path / "cmp"
    specs = "svm,transformer:3,transformer:6,attention,mfb"
    assert main(["--labels", str(tmp_path / "train-label.csv"), "--features", f"audio={tmp_path / 'audio'}",
                 f"visual={tmp_path / 'visual'}", "--test", str(tmp_path / "test1-label.csv"), "--compare", specs,
                 "--folds", "3", "--epochs", "3", "--hidden-dim", "16", "--out", str(out), "--no-progress",
                 "--no-tensorboard", "--threads", "1"]) == 0
    table = json.loads((out / "compare.json").read_text())
    assert [r["head"] for r in table["rows"]] == specs.split(",") and table["metric"] == "metric"
    assert table["columns"][:3] == ["metric", "metric_e", "metric_v"] and table["tests"] == ["test1-label"]
    markdown = (out / "compare.md").read_text().splitlines()
    assert len(markdown) == 2 + 5 and markdown[0].startswith("| head | CV metric | CV metric_e |")
    assert all(line.startswith(f"| {s} |") for line, s in zip(markdown[2:], specs.split(",")))
    svm = table["rows"][0]
    assert svm["cv"]["metric"] is None and svm["cv"]["metric_v"] is None and svm["cv"]["metric_e"] > 0  # no valence
    for row in table["rows"][1:]:
        assert row["cv"]["metric"] is not None
    depth = {s: len(json.loads((out / s.replace(":", "-") / "results.json").read_text())["config"]["head_layers"] * [0])
             for s in ("transformer:3", "transformer:6")}
    assert depth == {"transformer:3": 3, "transformer:6": 6}
    from safetensors.torch import load_file
    six = load_file(out / "transformer-6" / "fold0" / "round0" / "head.safetensors")
    assert any(k.startswith("blocks.layers.5.") for k in six) and not any(k.startswith("blocks.layers.6.") for k in six)

    # Oracle: the SVM row's fold 0 = an sklearn SVC fitted directly on fold 0's training samples.
    svm_results = json.loads((out / "svm" / "results.json").read_text())
    rows = read_csv(out / "svm" / "predictions_cv.csv")
    held = [r["name"] for r in rows if r["fold"] == "fold0"]
    labels = read_label_csv(tmp_path / "train-label.csv")
    train = [n for n in labels if n not in set(held)]
    feats = load_features(parse_feature_specs([f"audio={tmp_path / 'audio'}", f"visual={tmp_path / 'visual'}"]),
                          list(labels), progress=False)
    x = dict(zip(feats.names, np.concatenate([feats.arrays["audio"], feats.arrays["visual"]], axis=1)))
    svc = make_pipeline(StandardScaler(), SVC()).fit([x[n] for n in train], [labels[n].emotion for n in train])
    direct = svc.predict([x[n] for n in held])
    ours = [MER_CLASSES.index(r["discrete"]) for r in rows if r["fold"] == "fold0"]
    np.testing.assert_array_equal(ours, direct)
    truth = [labels[n].emotion for n in held]
    assert svm_results["folds"][0]["metric_e"] == pytest.approx(f1_score(truth, direct, average="weighted"))
    assert svm_results["folds"][0]["uar"] == pytest.approx(balanced_accuracy_score(truth, direct))
    assert all(r["valence"] == "nan" for r in rows)  # the SVM predicts no valence, and says so


def test_the_old_entry_point_and_python_m_run_the_cli(capsys):
    """Console scripts installed before the entry point moved (expmae.finetune:main) and `python -m` still work."""
    from expmae.finetune import main as old_main

    with pytest.raises(SystemExit) as exit_info:
        old_main(["--help"])
    assert exit_info.value.code == 0 and "--split-column" in capsys.readouterr().out
    proc = subprocess.run([sys.executable, "-m", "expmae.finetune", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--compare" in proc.stdout


def test_split_sources_unit(tmp_path):
    from expmae.finetune.config import FinetuneConfig, load_config
    from expmae.finetune.splits import column_folds, file_folds

    names, splits = column_folds(["10", "2", "train", "2", "10", "1"], "fold")
    assert names == ["fold=1", "fold=2", "fold=10"]  # numeric values in numeric order
    assert [held.tolist() for _, held in splits] == [[5], [1, 3], [0, 4]]
    assert [train.tolist() for train, _ in splits][0] == [0, 1, 2, 3, 4]  # 'train' rows always train
    with pytest.raises(ValueError, match="2 samples have no value"):
        column_folds(["1", "", ""], "fold")
    with pytest.raises(ValueError, match="nothing to hold out"):
        column_folds(["train", "train"], "set")

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("x\ny\n"), b.write_text("y\nz\n")
    with pytest.raises(ValueError, match="1 samples are in both lists"):
        file_folds([f"{a}:{b}"], ["x", "y", "z"], {"x", "y", "z"})
    _, [(train, held)] = file_folds([str(b)], ["x", "z"], {"x", "y", "z"})  # y labelled but dropped: skipped
    assert train.tolist() == [0] and held.tolist() == [1]

    config = tmp_path / "c.yaml"  # comma-separated settings may be YAML lists
    config.write_text("classes: [joy, Calm]\ncompare: [svm, transformer:6]\nsplit_files: held.txt\n")
    cfg = FinetuneConfig(**load_config(config))
    assert (cfg.classes, cfg.compare, cfg.split_files) == ("joy,Calm", "svm,transformer:6", ["held.txt"])
