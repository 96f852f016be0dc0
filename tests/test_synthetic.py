"""Synthetic talking-face videos: deterministic, varied, decodable, and detected by the real MTCNN."""
import numpy as np
import pytest

from expmae.synthetic import make_face_videos, make_noface_video, render_face_clip


@pytest.fixture(scope="module")
def mtcnn():
    from facenet_pytorch import MTCNN

    from expmae.facetrack import torch_threads

    with torch_threads(1):
        yield MTCNN(keep_all=True)


def _best_match(boxes, probs, center):
    """Probability and centre of the detected box nearest to ``center`` (or (0, None) if none)."""
    if boxes is None:
        return 0.0, None
    boxes = np.asarray(boxes, np.float64)
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2
    j = int(np.argmin(np.linalg.norm(centers - center, axis=1)))
    return float(probs[j]), centers[j]


def test_render_is_deterministic_varied_and_moving():
    a, truth = render_face_clip(12, 96, seed=3)
    b, _ = render_face_clip(12, 96, seed=3)
    c, _ = render_face_clip(12, 96, seed=4)
    assert a.shape == (12, 96, 96, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c).mean() > 10  # another seed: another person, background
    assert truth["center"].shape == (12, 2) and truth["face_width"].shape == (12,)
    assert np.ptp(truth["center"], axis=0).max() > 0.2  # the head drifts
    assert not np.array_equal(a[0], a[5])  # frames change (motion, mouth)


def test_mtcnn_detects_synthetic_faces_where_they_are_drawn(mtcnn):
    hits, total = 0, 0
    for seed in range(6):
        frames, truth = render_face_clip(16, 128, seed=seed, distractor=seed % 3 == 0)
        boxes, probs = mtcnn.detect(frames[::2])
        for b, p, center, width in zip(boxes, probs, truth["center"][::2], truth["face_width"][::2]):
            prob, found = _best_match(b, p, center)
            total += 1
            hits += prob > 0.9 and np.linalg.norm(found - center) < 0.25 * width
    assert hits / total >= 0.95, f"MTCNN found the drawn face (p > 0.9) in only {hits}/{total} frames"


def test_noface_clip_has_no_confident_detection(mtcnn):
    frames, _ = render_face_clip(8, 128, seed=1, face=False)
    _, probs = mtcnn.detect(frames)
    best = max((max(p) for p in probs if p[0] is not None), default=0.0)
    assert best < 0.9


def test_make_face_videos_decode_to_the_rendered_frames(tmp_path):
    from expmae.video import open_video, read_frames

    paths = make_face_videos(tmp_path, n=2, num_frames=20, size=96, fps=25, seed=5)
    assert [p.name for p in paths] == ["face_000.mp4", "face_001.mp4"]
    for i, path in enumerate(paths):
        reader = open_video(path)
        assert len(reader) == 20 and reader.get_avg_fps() == pytest.approx(25)
        decoded = read_frames(reader, range(20), path)
        expected, _ = render_face_clip(20, 96, seed=5 * 1000 + i)
        assert np.abs(decoded.astype(int) - expected).mean() < 4  # lossy H.264, crf 18
    noface = make_noface_video(tmp_path / "bg.mp4", num_frames=10, size=64)
    assert len(open_video(noface)) == 10


@pytest.mark.parametrize("size", [48, 31, 72])
def test_sizes_decord_cannot_read_are_refused(tmp_path, size):
    with pytest.raises(ValueError, match=f"size={size}"):
        make_face_videos(tmp_path, n=1, size=size)


# ------------------------------------------------------------------------------ the labelled expression benchmark

from expmae.synthetic import (DYNAMIC_CLASSES, STATIC_CLASSES, expression_benchmark, render_expression_clip,
                              write_expression_benchmark)


def test_benchmark_is_seeded_balanced_and_its_test_identities_are_disjoint():
    clips = expression_benchmark("static", identities=10, test_identities=3, clips_per_identity=8, seed=1)
    assert clips == expression_benchmark("static", identities=10, test_identities=3, clips_per_identity=8, seed=1)
    assert clips != expression_benchmark("static", identities=10, test_identities=3, clips_per_identity=8, seed=2)
    train = {c.identity for c in clips if c.split == "train"}
    test = {c.identity for c in clips if c.split == "test"}
    assert train == set(range(7)) and test == {7, 8, 9}
    for identity in range(10):  # every person shows every class equally often
        labels = [c.label for c in clips if c.identity == identity]
        assert sorted(labels) == sorted(list(STATIC_CLASSES) * 2)
    assert len({c.name for c in clips}) == len(clips)
    with pytest.raises(ValueError, match="test_identities"):
        expression_benchmark("static", identities=3, test_identities=3)
    with pytest.raises(ValueError, match="task"):
        expression_benchmark("speech")


def test_static_label_is_in_every_frame_and_dynamic_label_only_in_frame_order():
    static = expression_benchmark("static", identities=2, test_identities=1, clips_per_identity=4)
    frames = {c.label: render_expression_clip(c, 8, 64) for c in static if c.identity == 0}
    assert set(frames) == set(STATIC_CLASSES)
    # the same person, another held expression: the mouth/brow region differs in every frame
    assert all(np.abs(frames["happy"][i].astype(int) - frames["neutral"][i]).max() > 60 for i in range(8))

    dynamic = expression_benchmark("dynamic", identities=2, test_identities=1, clips_per_identity=2)
    onset, offset = (c for c in dynamic if c.identity == 0)
    assert {DYNAMIC_CLASSES[onset.label], DYNAMIC_CLASSES[offset.label]} == {"onset", "offset"}
    # an offset clip is its own onset rendering reversed: the set of frames carries no label, their order does
    import dataclasses

    as_onset = dataclasses.replace(offset, label=next(k for k, v in DYNAMIC_CLASSES.items() if v == "onset"))
    np.testing.assert_array_equal(render_expression_clip(offset, 12, 64), render_expression_clip(as_onset, 12, 64)[::-1])
    a = render_expression_clip(onset if DYNAMIC_CLASSES[onset.label] == "onset" else as_onset, 12, 64)
    mouth = (slice(36, 50), slice(20, 44))  # the mouth widens as the smile appears
    assert np.abs(a[-1][mouth].astype(int) - a[0][mouth]).mean() > 2


def test_written_benchmark_keeps_held_out_identities_out_of_the_training_labels(tmp_path):
    import csv

    paths = write_expression_benchmark(tmp_path, "dynamic", num_frames=4, size=32, identities=4, test_identities=1,
                                       clips_per_identity=2)
    rows = {split: list(csv.DictReader(open(paths[split]))) for split in ("train", "test")}
    clips = {r["name"]: r for r in csv.DictReader(open(paths["clips"]))}
    assert {r["name"] for r in rows["train"]} == {n for n, r in clips.items() if r["split"] == "train"}
    assert {clips[r["name"]]["identity"] for r in rows["test"]} == {"3"}
    assert sorted(p.name for p in (paths["videos"] / "test").glob("*.mp4")) == sorted(f"{r['name']}.mp4" for r in rows["test"])
    assert list(rows["train"][0]) == ["name", "discrete", "valence"]  # MER2023's label layout
