"""MER2023 label CSVs and feature folders: the official layout, and one-line errors on anything else."""
import math

import numpy as np
import pytest

from expmae.labels import MER_CLASSES, labels_to_arrays, read_label_csv, read_name_list, write_prediction_csv
from expmae.finetune.featureset import describe_missing, load_features, parse_feature_specs


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_class_order_is_the_organisers():
    # MERTools toolkit/globals.py emos_mer: indices must match their released predictions.
    assert MER_CLASSES == ("neutral", "angry", "happy", "sad", "worried", "surprise")


def test_read_label_csv_official_layout(tmp_path):
    path = write(tmp_path / "train-label.csv",
                 "name,discrete,valence\nsample_00000003,worried,-2.5\nsample_00000001,happy,3\nsample_00000002,Neutral,0.0\n")
    labels = read_label_csv(path)
    assert list(labels) == ["sample_00000003", "sample_00000001", "sample_00000002"]  # file order kept
    assert labels["sample_00000003"] == (MER_CLASSES.index("worried"), -2.5)
    assert labels["sample_00000002"].emotion == 0
    emotion, valence = labels_to_arrays(labels, ["sample_00000001", "sample_00000003"])
    np.testing.assert_array_equal(emotion, [2, 4])
    np.testing.assert_allclose(valence, [3.0, -2.5])


def test_read_label_csv_tolerates_bom_and_missing_valence_when_allowed(tmp_path):
    path = tmp_path / "test3-label.csv"
    path.write_bytes("\ufeffname,discrete\nsample_1,sad\n".encode("utf-8"))
    labels = read_label_csv(path, require_valence=False)
    assert labels["sample_1"].emotion == 3 and math.isnan(labels["sample_1"].valence)
    with pytest.raises(ValueError, match=r"test3-label\.csv: missing column 'valence'"):
        read_label_csv(path)


@pytest.mark.parametrize(
    "body, pattern",
    [
        ("id,label,valence\ns1,sad,1\n", r"missing column 'name'"),
        ("name,discrete,valence\ns1,fear,1\n", r"row 2, column 'discrete': 'fear' for 's1' is not one of"),
        ("name,discrete,valence\ns1,sad,high\n", r"row 2, column 'valence': 'high' for 's1' is not a number"),
        ("name,discrete,valence\ns1,sad,7.5\n", r"row 2, column 'valence': 7.5 for 's1' is outside \[-5.0, 5.0\]"),
        ("name,discrete,valence\ns1,sad,1\ns1,happy,2\n", r"row 3, column 'name': duplicate sample 's1'"),
        ("name,discrete,valence\n,sad,1\n", r"row 2, column 'name': empty sample name"),
        ("name,discrete,valence\ns1,sad,\n", r"row 2, column 'valence': empty for 's1'"),
        ("name,discrete,valence\n", r"no samples"),
    ],
)
def test_read_label_csv_errors_name_file_and_column(tmp_path, body, pattern):
    path = write(tmp_path / "labels.csv", body)
    with pytest.raises(ValueError, match=pattern) as info:
        read_label_csv(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_read_label_csv_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_label_csv(tmp_path / "nope.csv")


def test_name_lists_and_prediction_csv_round_trip(tmp_path):
    assert read_name_list(write(tmp_path / "names.txt", "a\nb\n\nc\n")) == ["a", "b", "c"]
    assert read_name_list(write(tmp_path / "names.csv", "discrete,name\nsad,x\nhappy,y\n")) == ["x", "y"]
    with pytest.raises(ValueError, match="missing column 'name'"):
        read_name_list(write(tmp_path / "bad.csv", "id\nx\n"))
    out = write_prediction_csv(tmp_path / "pred.csv", ["x", "y"], np.array([5, 0]), np.array([1.25, -4.0]))
    back = read_label_csv(out)  # predictions are written in the label layout, so they read back
    assert back == {"x": (5, 1.25), "y": (0, -4.0)}
    no_valence = write_prediction_csv(tmp_path / "pseudo.csv", ["x"], np.array([4]))
    assert no_valence.read_text().splitlines() == ["name,discrete", "x,worried"]


@pytest.fixture
def feature_folders(tmp_path):
    rng = np.random.default_rng(0)
    utt, frm = tmp_path / "hubert", tmp_path / "expmae"
    utt.mkdir(), frm.mkdir()
    names = [f"s{i}" for i in range(6)]
    truth = {}
    for i, n in enumerate(names):
        a = rng.normal(size=4).astype(np.float32)
        f = rng.normal(size=(3 + i, 5)).astype(np.float32)  # frame level, varying length
        truth[n] = (a, f.mean(0))
        if n != "s2":  # s2 has no hubert feature
            np.save(utt / f"{n}.npy", a)
        np.save(frm / f"{n}.npy", f)
    np.save(frm / "s4.npy", rng.normal(size=(2, 2, 5)))  # unusable: 3-D
    np.save(utt / "s5.npy", rng.normal(size=7))  # unusable: wrong size for this folder
    return names, {"audio": [utt], "visual": [frm]}, truth


def test_load_features_pools_frames_and_reports_every_unusable_sample(feature_folders):
    names, branches, truth = feature_folders
    features = load_features(branches, names, missing="drop", progress=False)
    assert features.names == ["s0", "s1", "s3"]
    for i, n in enumerate(features.names):
        np.testing.assert_allclose(features.arrays["audio"][i], truth[n][0])
        np.testing.assert_allclose(features.arrays["visual"][i], truth[n][1], rtol=1e-6)  # mean over frames
    audio, visual = (str(branches[b][0]) for b in ("audio", "visual"))
    assert sorted(features.missing[audio]) == ["s2", "s5"] and features.missing[visual] == ["s4"]
    report = describe_missing(features, "drop")
    assert len(report) == 2 and all("dropped" in line for line in report)

    zero = load_features(branches, names, missing="zero", progress=False)
    assert zero.names == names and zero.dims == {"audio": 4, "visual": 5}
    assert not zero.arrays["audio"][2].any() and not zero.arrays["visual"][4].any()

    with pytest.raises(ValueError, match=r"hubert: 2 of 6 samples unusable \(first: s2: no .npy file\)"):
        load_features({"audio": branches["audio"]}, names, missing="error", progress=False)


def test_load_features_keeps_frames_as_nan_padded_tokens_for_a_token_head(feature_folders):
    from expmae.finetune.featureset import input_stats

    names, branches, _ = feature_folders
    zero = load_features(branches, names, missing="zero", progress=False, tokens=True)
    visual, audio = zero.arrays["visual"], zero.arrays["audio"]
    assert visual.shape == (6, 3 + 5, 5) and audio.shape == (6, 1, 4) and zero.dims == {"audio": 4, "visual": 5}
    for i, n in enumerate(names):
        if n != "s4":  # s4 is unusable: one zero token, the rest padding
            frames = np.load(branches["visual"][0] / f"{n}.npy")
            np.testing.assert_array_equal(visual[i, : 3 + i], frames)
        assert np.isnan(visual[i, 3 + i :]).all()
    assert not visual[4, 0].any() and np.isnan(visual[4, 1:]).all()
    mean, std = input_stats(visual)  # over the real tokens only
    real = np.concatenate([visual[i, : 3 + i] for i in range(6) if i != 4] + [visual[4, :1]])
    np.testing.assert_allclose(mean, real.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, real.std(0), rtol=1e-5)
    # a pool of other samples (pseudo-labelling) joins with the padding widened, not a shape error
    both = zero.subset([0]).concat(zero.subset([5]))
    assert both.arrays["visual"].shape == (2, 8, 5)
    short = load_features(branches, ["s0"], progress=False, tokens=True)
    assert short.arrays["visual"].shape == (1, 3, 5)
    np.testing.assert_array_equal(short.concat(zero.subset([5])).arrays["visual"], both.arrays["visual"])
    with pytest.raises(ValueError, match="takes one folder per branch"):
        load_features({"visual": branches["visual"] * 2}, names, progress=False, tokens=True)


def test_same_branch_folders_are_concatenated(feature_folders, tmp_path):
    names, branches, truth = feature_folders
    specs = [f"visual={branches['visual'][0]}", f"visual={branches['audio'][0]}"]
    parsed = parse_feature_specs(specs)
    assert list(parsed) == ["visual"] and len(parsed["visual"]) == 2
    features = load_features(parsed, ["s0", "s1"], progress=False)
    np.testing.assert_allclose(features.arrays["visual"][1], np.concatenate([truth["s1"][1], truth["s1"][0]]), rtol=1e-6)
    assert list(parse_feature_specs([str(branches["audio"][0])])) == ["hubert"]  # default branch name: folder name
    with pytest.raises(FileNotFoundError, match="nowhere"):
        parse_feature_specs([f"audio={tmp_path / 'nowhere'}"])


def test_feature_listing_ignores_interrupted_atomic_write_temporaries(tmp_path):
    import numpy as np

    from expmae.finetune.featureset import list_feature_names

    np.save(tmp_path / "s1.npy", np.zeros(3))
    np.save(tmp_path / ".s2.abc123.npy", np.zeros(3))  # what a killed expmae.files.atomic_path leaves behind
    assert list_feature_names(tmp_path) == ["s1"]
