"""Pretraining loader and video reading: which frames, which crop, determinism, sharding, failures, errors.

Clips whose frame t is a flat grey of level ``LEVEL * t`` make the frame selection observable after any crop,
flip or resize: the mean of an output frame says which source frame it came from.
"""
import json

import numpy as np
import pytest
import torch

from expmae.data import (IMAGENET_MEAN, IMAGENET_STD, VideoClipDataset, batch_to_device, collate_samples,
                         crop_resize_frames, multi_scale_crop_box, normalize_clips, sample_frame_indices)
from expmae.data_batches import EpochBatchSampler
from expmae.data_resample import augment_on_device
from expmae.video import VideoError, list_videos, open_video, read_frames, write_video

LEVEL = 3  # grey step per frame: 80 frames fit in uint8, and H.264 (crf 18) keeps flat greys within +-1


def grey_clip(num_frames: int, size: int = 64, offset: int = 0) -> np.ndarray:
    levels = (offset + LEVEL * np.arange(num_frames)).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (num_frames, size, size, 3)).copy()


def frame_ids(clip: torch.Tensor, offset: int = 0) -> list[int]:
    """Which source frame each output frame (3, T, H, W) came from, read off its grey level."""
    return [round((float(clip[:, t].float().mean()) - offset) / LEVEL) for t in range(clip.shape[1])]


# ------------------------------------------------------------------------------------------- sampling


def test_sample_frame_indices_windows_and_short_clips():
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(200):
        idx = sample_frame_indices(100, 16, 4, rng)
        assert np.array_equal(np.diff(idx), np.full(15, 4)) and idx[0] >= 0 and idx[-1] < 100
        starts.add(int(idx[0]))
    assert min(starts) == 0 and max(starts) == 100 - 61  # every window can be drawn
    assert list(sample_frame_indices(100, 16, 4)) == list(range(19, 80, 4))  # centre window without rng
    assert list(sample_frame_indices(15, 6, 4, short_clip="pad")) == [0, 4, 8, 12, 14, 14]
    assert list(sample_frame_indices(15, 6, 4, short_clip="loop")) == [0, 4, 8, 12, 1, 5]
    assert list(sample_frame_indices(1, 3, 4)) == [0, 0, 0]
    with pytest.raises(ValueError, match="short_clip"):
        sample_frame_indices(5, 6, 4, short_clip="wrap")
    with pytest.raises(ValueError, match="0 frames"):
        sample_frame_indices(0, 6, 4)


def test_multi_scale_crop_follows_videomae_grid():
    rng = np.random.default_rng(0)
    sizes = [224, 196, 168, 147]  # int(224 * s) for VideoMAE's scales (1, .875, .75, .66)
    seen = set()
    for _ in range(2000):
        top, left, h, w = multi_scale_crop_box(224, 224, 224, rng)
        assert h in sizes and w in sizes and abs(sizes.index(h) - sizes.index(w)) <= 1  # max_distort=1
        assert 0 <= top <= 224 - h and 0 <= left <= 224 - w
        hs, ws = (224 - h) // 4, (224 - w) // 4
        assert (hs == 0 or top % hs == 0) and (ws == 0 or left % ws == 0)  # one of the fixed offsets
        seen.add((h, w, top, left))
    # 10 size pairs; the 13 fixed offsets each turn up (for a crop that leaves room on both axes)
    assert len({(h, w) for h, w, _, _ in seen}) == 10
    assert len({(t, l) for h, w, t, l in seen if (h, w) == (147, 168)}) == 13
    # a crop size within 3 px of the input size snaps to it (no needless 1-2 px resize)
    assert multi_scale_crop_box(226, 226, 224, np.random.default_rng(1), scales=(1.0,))[2:] == (224, 224)


# ------------------------------------------------------------------------------------------- the dataset


@pytest.fixture
def grey_sources(tmp_path):
    """Two mp4 and two .npy grey clips (80 frames, different offsets so clips are told apart)."""
    paths = []
    for i in range(4):
        frames = grey_clip(80, 64, offset=i)
        if i % 2:
            path = tmp_path / f"clip{i}.npy"
            np.save(path, frames)
        else:
            path = write_video(tmp_path / f"clip{i}.mp4", frames)
        paths.append(path)
    return paths


@pytest.mark.parametrize("train", [False, True])
def test_dataset_returns_the_sampled_frames(grey_sources, train):
    ds = VideoClipDataset(grey_sources, num_frames=16, sample_stride=4, input_size=32, train=train, seed=0)
    assert len(ds) == 4 and ds.names == ["clip0", "clip1", "clip2", "clip3"]
    for i in range(4):
        clip = ds[i]
        assert clip.shape == (3, 16, 32, 32) and clip.dtype == torch.uint8
        ids = frame_ids(clip, offset=i)
        if train:
            assert np.array_equal(np.diff(ids), np.full(15, 4)) and 0 <= ids[0] <= 80 - 61
        else:
            assert ids == list(range(9, 70, 4))  # the centre window of 80 frames


def test_short_clip_is_padded_with_its_last_frame(tmp_path):
    path = tmp_path / "short.npy"
    np.save(path, grey_clip(15))  # shorter than 16 frames (like marlin cropped04)
    clip = VideoClipDataset([path], num_frames=16, sample_stride=4, input_size=32, train=True)[0]
    assert frame_ids(clip) == [0, 4, 8, 12] + [14] * 12


def test_crop_and_flip_are_the_same_for_every_frame(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 150, (1, 64, 64, 3))
    path = tmp_path / "pattern.npy"
    np.save(path, (base + 3 * np.arange(16)[:, None, None, None]).astype(np.uint8))
    # Scale 1.0 and input size = stored size: the output must be the frames themselves, or all of them mirrored.
    ds = VideoClipDataset([path], num_frames=16, sample_stride=1, input_size=64, train=True, scales=(1.0,))
    flips = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        out = ds[0].permute(1, 2, 3, 0).numpy().astype(int)
        expected = base + 3 * np.arange(16)[:, None, None, None]
        flipped = bool(np.array_equal(out, expected[:, :, ::-1]))
        assert flipped or np.array_equal(out, expected)
        flips.add(flipped)
    assert flips == {True, False}
    # Multi-scale crops: resized crops of a linear ramp stay a ramp, so frame t - frame 0 is 3 t everywhere.
    ds = VideoClipDataset([path], num_frames=16, sample_stride=1, input_size=48, train=True)
    for epoch in range(4):
        ds.set_epoch(epoch)
        out = ds[0].numpy().astype(int)
        assert np.abs(out - out[:, :1] - 3 * np.arange(16)[None, :, None, None]).max() <= 1


def test_augmentation_is_deterministic_in_seed_epoch_index(grey_sources):
    make = lambda seed=0: VideoClipDataset(grey_sources, num_frames=8, sample_stride=2, input_size=32, seed=seed)  # noqa: E731
    ds = make()
    first = [ds[i] for i in range(4)]
    backwards = [make()[i] for i in reversed(range(4))][::-1]  # fresh object, other call order
    assert all(torch.equal(a, b) for a, b in zip(first, backwards))
    ds.set_epoch(1)
    assert any(not torch.equal(a, ds[i]) for i, a in enumerate(first))  # a new epoch, new crops/windows
    ds.set_epoch(0)
    assert all(torch.equal(a, ds[i]) for i, a in enumerate(first))  # resume: epoch 0 again is epoch 0
    assert any(not torch.equal(a, make(seed=1)[i]) for i, a in enumerate(first))
    # DataLoader workers do not change what a sample is
    loader = torch.utils.data.DataLoader(make(), batch_size=2, num_workers=2)
    assert torch.equal(torch.cat(list(loader)), torch.stack(first))
    # normalize=True: the same clips as float, normalised on the CPU
    as_float = VideoClipDataset(grey_sources, num_frames=8, sample_stride=2, input_size=32, normalize=True)
    assert torch.equal(as_float[2], normalize_clips(first[2]))


def test_distributed_ranks_see_disjoint_clips(tmp_path):
    paths = []
    for i in range(10):
        paths.append(tmp_path / f"c{i}.npy")
        np.save(paths[-1], grey_clip(8, 32, offset=i * 40 % 250))
    ds = VideoClipDataset(paths, num_frames=2, sample_stride=1, input_size=32)
    seen = []
    for rank in range(2):
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=7)
        sampler.set_epoch(3)
        ds.set_epoch(3)
        loader = torch.utils.data.DataLoader(ds, batch_size=5, sampler=sampler, num_workers=0)
        batches = torch.cat(list(loader))
        indices = list(sampler)
        assert torch.equal(batches, torch.stack([ds[i] for i in indices]))
        seen.append(set(indices))
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(10))


def test_bad_clips_are_skipped_logged_and_counted(tmp_path, grey_sources, caplog, monkeypatch):
    from expmae.shards import JsonlShards

    monkeypatch.delenv("RANK", raising=False)
    bad_video = tmp_path / "corrupt.mp4"
    bad_video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)
    bad_array = tmp_path / "wrong.npy"
    np.save(bad_array, np.zeros((4, 8, 8), np.float32))
    log = tmp_path / "loader_failures"  # a folder: one JSON-lines file per process
    ds = VideoClipDataset([grey_sources[0], bad_video, bad_array], num_frames=4, sample_stride=2, input_size=32,
                          failure_log=log)
    with caplog.at_level("WARNING"):
        a = ds[1]
    assert a.shape == (3, 4, 32, 32) and ds.num_failed >= 1
    assert "corrupt.mp4" in caplog.text
    assert torch.equal(a, ds[1])  # the stand-in is deterministic
    assert [p.name for p in log.iterdir()] == ["rank0-main.jsonl"]
    records = JsonlShards(log).read()
    assert records[0]["key"] == "corrupt" and "cannot open" in records[0]["reason"] and "\n" not in records[0]["reason"]
    with pytest.raises(RuntimeError, match="failed to load"):
        VideoClipDataset([bad_video, bad_array], num_frames=4, max_retries=3)[0]


def test_dataset_sources_manifest_folder_and_labels(tmp_path):
    from expmae.labels import MerLabel

    clips = tmp_path / "crops"
    (clips / "clips").mkdir(parents=True)
    for i, name in enumerate(["sample_a", "sample_b", "sample_c"]):
        np.save(clips / "clips" / f"{name}.npy", grey_clip(10, 32, offset=i))
    with open(clips / "manifest.jsonl", "w") as f:  # in the order parallel crop workers happened to finish
        for name in ["sample_c", "sample_a", "sample_b"]:
            f.write(json.dumps({"key": name, "path": f"clips/{name}.npy", "frames": 10}) + "\n")
    ds = VideoClipDataset(clips, num_frames=4, sample_stride=2, input_size=32)
    assert ds.names == ["sample_a", "sample_b", "sample_c"] and len(ds) == 3  # sorted: the same clips, the same run
    assert ds.paths[0].endswith("sample_a.npy")
    # a folder without a manifest: its videos and .npy clips, named by path
    assert VideoClipDataset(clips / "clips", num_frames=4).names == ["sample_a", "sample_b", "sample_c"]
    # MER2023 layout: a label CSV keeps the labelled clips and returns (clip, label)
    csv = tmp_path / "train-label.csv"
    csv.write_text("name,discrete,valence\nsample_a,happy,2.5\nsample_c,sad,-1\n")
    labelled = VideoClipDataset(clips, num_frames=4, sample_stride=2, input_size=32, labels=csv, train=False)
    assert labelled.names == ["sample_a", "sample_c"]
    clip, label = labelled[1]
    assert label == MerLabel(3, -1.0) and frame_ids(clip, offset=2) == [1, 3, 5, 7]  # centre window of 10 frames
    batch = next(iter(torch.utils.data.DataLoader(labelled, batch_size=2)))
    assert batch[0].shape == (2, 3, 4, 32, 32) and batch[1].emotion.tolist() == [2, 3]
    mapped = VideoClipDataset(clips, num_frames=4, labels={"sample_b": 7})
    assert mapped.names == ["sample_b"] and mapped[0][1] == 7
    with pytest.raises(ValueError, match="no clips found"):
        VideoClipDataset(clips, labels={"other": 1})
    (tmp_path / "bad.jsonl").write_text('{"key": "x"}\n')
    with pytest.raises(ValueError, match="'key' and 'path'"):
        VideoClipDataset(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError):
        VideoClipDataset(tmp_path / "missing")


def test_normalize_clips_matches_torchvision():
    from torchvision.transforms.functional import normalize

    x = torch.randint(0, 256, (2, 3, 4, 8, 8), dtype=torch.uint8)
    frames = x.permute(0, 2, 1, 3, 4).float() / 255  # (B, T, 3, H, W) for torchvision
    oracle = normalize(frames.reshape(-1, 3, 8, 8), IMAGENET_MEAN, IMAGENET_STD).reshape(2, 4, 3, 8, 8).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(normalize_clips(x), oracle, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(normalize_clips(x[0]), oracle[0], atol=1e-5, rtol=1e-5)
    half = normalize_clips(x, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and (half.float() - oracle).abs().max() < 0.02
    with pytest.raises(TypeError, match="uint8"):
        normalize_clips(x.float())
    with pytest.raises(ValueError, match="3, T, H, W"):
        normalize_clips(x[:, :2])


# ------------------------------------------------------------------- repeated sampling, device augmentation


def reference_samples(frames: np.ndarray, k: int, seed: int, epoch: int, index: int, *, num_frames: int,
                      stride: int, size: int) -> list[torch.Tensor]:
    """The documented contract, written out: rng((seed, epoch, index, 0)) draws k windows, then a (crop, flip)
    per sample; each sample is its window's frames, cropped, resized (PIL) and flipped."""
    rng = np.random.default_rng((seed, epoch, index, 0))
    windows = [sample_frame_indices(len(frames), num_frames, stride, rng) for _ in range(k)]
    out = []
    for w in windows:
        box = multi_scale_crop_box(*frames.shape[1:3], size, rng)
        out.append(crop_resize_frames(frames[w], box, size, flip=bool(rng.random() < 0.5)))
    return out


def test_one_repeated_sample_is_todays_sample_bit_for_bit(grey_sources):
    ds = VideoClipDataset(grey_sources, num_frames=8, sample_stride=2, input_size=32, seed=3, repeated_samples=1)
    ds.set_epoch(2)
    for i, path in enumerate(grey_sources):
        frames = np.load(path) if path.suffix == ".npy" else read_frames(open_video(path), range(80), path)
        (expected,) = reference_samples(frames, 1, 3, 2, i, num_frames=8, stride=2, size=32)
        assert torch.equal(ds[i], expected)
    # batches through collate_samples are the default collate's
    loader = lambda **kw: torch.utils.data.DataLoader(ds, batch_size=2, num_workers=0, **kw)  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(loader(), loader(collate_fn=collate_samples)))


def test_four_repeated_samples_of_a_clip_differ_in_window_and_crop(tmp_path, grey_sources):
    ds = VideoClipDataset(grey_sources, num_frames=8, sample_stride=2, input_size=32, seed=0, repeated_samples=4)
    clips = ds[1]  # a .npy grey clip (offset 1)
    assert clips.shape == (4, 3, 8, 32, 32) and clips.dtype == torch.uint8
    expected = reference_samples(np.load(grey_sources[1]), 4, 0, 0, 1, num_frames=8, stride=2, size=32)
    assert all(torch.equal(c, e) for c, e in zip(clips, expected))
    starts = [frame_ids(c, offset=1)[0] for c in clips]
    assert len(set(starts)) > 1  # own temporal windows (the 80-frame clip leaves room)
    for c in clips:
        assert np.array_equal(np.diff(frame_ids(c, offset=1)), np.full(7, 2))
    # own crops: a textured clip makes the four samples differ pixel-wise, and their crop boxes differ
    rng = np.random.default_rng(0)
    np.save(tmp_path / "tex.npy", rng.integers(0, 256, (40, 64, 64, 3), dtype=np.uint8))
    tex = VideoClipDataset([tmp_path / "tex.npy"], num_frames=8, sample_stride=2, input_size=32, repeated_samples=4,
                           augment_on="device")[0]
    assert len({tuple(b) for b in tex["box"].tolist()}) > 1
    samples = augment_on_device(collate_samples([tex]), 32)
    assert all(not torch.equal(samples[a], samples[b]) for a in range(4) for b in range(a))
    # a batch of samples: clips' samples adjacent, batch size = clips x k
    batch = collate_samples([ds[0], ds[1]])
    assert batch.shape == (8, 3, 8, 32, 32) and torch.equal(batch[4:], clips)
    # own masks: the model draws them per sample of the batch, so a clip's k samples never share one
    from expmae.model import random_masking, tube_masking

    for masking in (random_masking(len(batch), 196, 0.75), tube_masking(len(batch), 8, 196, 0.9)):  # ViT-B 16x224
        assert all(not torch.equal(masking.mask[a], masking.mask[b]) for a in range(4, 8) for b in range(4, a))
    with pytest.raises(ValueError, match="labels"):
        VideoClipDataset(grey_sources, repeated_samples=2, labels={"clip0": 1})


@pytest.mark.parametrize("k", [1, 3])
def test_device_augmentation_gives_the_cpu_paths_bytes(make_video, tmp_path, k):
    """Same (seed, epoch, index): the device path (PIL's weights in batched matmuls) equals the CPU path (PIL)
    exactly, for down- and up-scaling crops, flips, and repeated samples."""
    paths = [make_video(f"v{i}.mp4", num_frames=40, size=96, seed=i) for i in range(3)]
    for size in (64, 112):  # crops of 96 px frames are shrunk to 64 and enlarged to 112
        cpu = VideoClipDataset(paths, num_frames=6, sample_stride=3, input_size=size, seed=5, repeated_samples=k)
        dev = VideoClipDataset(paths, num_frames=6, sample_stride=3, input_size=size, seed=5, repeated_samples=k,
                               augment_on="device")
        for epoch in (0, 1):
            cpu.set_epoch(epoch), dev.set_epoch(epoch)
            expected = collate_samples([cpu[i] for i in range(3)])
            items = [dev[i] for i in range(3)]
            packed = collate_samples(items)
            assert packed["frames"].shape[0] == sum(len(it["frames"]) for it in items) and packed["box"].shape == (3 * k, 4)
            got = batch_to_device(packed, "cpu", size)
            assert got.dtype == torch.uint8 and torch.equal(got, expected)
    assert dev.reference_clips(2).shape == (2, 3, 6, 112, 112)
    assert torch.equal(dev.reference_clips(2), cpu.reference_clips(2))


def test_device_augmentation_on_real_face_clips(shared_data):
    crops = sorted((shared_data / "mead-dreamtalk").glob("*.mp4"))[:2] + sorted((shared_data / "marlin").glob("cropped0[12].mp4"))
    for group in (crops[:2], crops[2:]):  # one frame size per batch: 256 px, then 224 px
        kw = dict(num_frames=16, sample_stride=4, input_size=224, seed=1, repeated_samples=2)
        cpu = collate_samples([VideoClipDataset(group, **kw)[i] for i in range(2)])
        dev = VideoClipDataset(group, augment_on="device", **kw)
        assert torch.equal(augment_on_device(collate_samples([dev[0], dev[1]]), 224), cpu)
    mixed = VideoClipDataset([crops[0], crops[2]], num_frames=4, augment_on="device")
    with pytest.raises(ValueError, match="one frame size"):
        collate_samples([mixed[0], mixed[1]])


def test_epoch_batch_sampler_spreads_a_clips_samples_over_batches_of_one_worker_and_resumes():
    from collections import Counter
    from itertools import islice

    def batches(k, rank=0, start_epoch=0, start_batch=0, n=24, workers=2, batch_size=2):
        sampler = EpochBatchSampler(24, batch_size=batch_size, batches_per_epoch=3, rank=rank, world=2, seed=7,
                                    start_epoch=start_epoch, start_batch=start_batch, repeated_samples=k, workers=workers)
        return list(islice(iter(sampler), n))

    one, four = batches(1), batches(4)
    assert all(len(b) == 2 for b in one + four)  # batch_size samples, each of a different clip
    assert all(len({i for _, i, _ in b}) == 2 for b in four)
    first = four[:12]  # a pass over this rank's 6 clips: k = 4 epochs of 3 batches
    assert [b[0][0] for b in four] == [0] * 12 + [4] * 12  # keys carry the pass's first epoch: one decode's samples
    assert Counter((i, r) for b in first for _, i, r in b) == {(i, r): 1 for i in {i for _, i in one[0] + one[1] + one[2]}
                                                                for r in range(4)}  # each clip's k samples once
    assert [i for b in first for _, i, r in b if r == 0] == [i for b in one[:3] for _, i in b]  # the (seed, pass) shuffle
    assert four[12:] != first  # the next pass is reshuffled
    # all k batches of a clip sit at positions congruent mod workers: the DataLoader hands them to one worker
    # (workers take batches in turn), also when a resumed loader starts anywhere; the last partial block aside
    for start in range(len(first)):
        tail = batches(4, start_epoch=start // 3, start_batch=start % 3, n=12 - start)
        assert tail == first[start:]  # resume = the same continuation
        owner = {}
        for pos, b in enumerate(tail[:8 - start] if start < 8 else []):  # 8 = 2 workers x 4 samples: full blocks
            for _, i, _ in b:
                assert owner.setdefault(i, pos % 2) == pos % 2
    assert not {i for b in first for _, i, _ in b} & {i for b in batches(4, rank=1)[:12] for _, i, _ in b}  # ranks disjoint
    assert len(batches(3, batch_size=4, n=1)[0]) == 4  # any batch size: no longer a multiple of k
    with pytest.raises(ValueError, match="need 8 clips per rank"):
        EpochBatchSampler(12, batch_size=4, batches_per_epoch=2, rank=0, world=2, seed=0, repeated_samples=2)


def test_repeat_spread_pools_groups_per_worker_mixes_batch_mates_and_resumes():
    """spread = 2: a worker's pool of 2 groups gives each clip's 4 samples once, in 4 rounds with fresh orders
    (batch-mates change), all on one worker (positions congruent mod workers), ~2 of its batches apart."""
    from collections import Counter, defaultdict
    from itertools import islice

    def batches(start_epoch=0, start_batch=0, n=32, spread=2):
        sampler = EpochBatchSampler(16, batch_size=2, batches_per_epoch=8, rank=0, world=1, seed=3, start_epoch=start_epoch,
                                    start_batch=start_batch, repeated_samples=4, workers=2, spread=spread)
        assert sampler.keep_decoded == 2 * spread
        return list(islice(iter(sampler), n))

    first = batches()  # one pass: 16 clips x 4 samples in 32 batches of 2
    assert Counter((i, r) for b in first for _, i, r in b) == {(i, r): 1 for i in range(16) for r in range(4)}
    assert all(len({i for _, i, _ in b}) == 2 for b in first)
    positions, mates = defaultdict(list), defaultdict(set)
    for pos, b in enumerate(first):
        for _, i, r in b:
            positions[i].append(pos)
            mates[i].add(frozenset(j for _, j, _ in b) - {i})
    assert all(len({p % 2 for p in ps}) == 1 for ps in positions.values())  # one worker per clip
    gaps = [b - a for ps in positions.values() for a, b in zip(ps, ps[1:])]  # in batches; 2 = the worker's next one
    assert min(gaps) >= 2 and np.mean(gaps) == pytest.approx(4, abs=1)  # ~spread of the worker's batches apart
    one = defaultdict(list)
    for pos, b in enumerate(batches(spread=1)):
        for _, i, _ in b:
            one[i].append(pos)
    assert {b - a for ps in one.values() for a, b in zip(ps, ps[1:])} == {2}  # spread 1: the worker's next batch
    assert sum(len(m) > 1 for m in mates.values()) >= 8  # rounds are reshuffled: most clips change batch-mates
    assert batches(n=32, spread=1) != first and sorted(map(sorted, batches(spread=1))) != sorted(map(sorted, first))
    for start in (1, 7, 13, 30):
        assert batches(start_epoch=start // 8, start_batch=start % 8, n=32 - start) == first[start:]  # exact resume
    owners = defaultdict(set)  # spread 3: a block of 6 groups, then a partial one of 2, shared 1 + 1, not 2 + 0
    for pos, b in enumerate(batches(spread=3)):
        for _, i, _ in b:
            owners[i].add(pos % 2)
    assert all(len(o) == 1 for o in owners.values())
    with pytest.raises(ValueError, match="spread=0: expected an integer >= 1"):
        batches(spread=0)


def test_a_clips_samples_are_decoded_once_per_worker_and_equal_the_whole_item(tmp_path, grey_sources):
    """dataset[i, r] is sample r of dataset[i] (CPU and device paths), and through a 2-worker DataLoader over
    EpochBatchSampler every clip is decoded once for its k samples."""
    from expmae.pretrain.loader import EpochItems

    for augment_on in ("cpu", "device"):
        ds = VideoClipDataset(grey_sources, num_frames=8, sample_stride=2, input_size=32, seed=0, repeated_samples=3,
                              augment_on=augment_on)
        ds.set_epoch(1)
        whole = batch_to_device(collate_samples([ds[2]]), "cpu", 32)
        ones = batch_to_device(collate_samples([ds[2, r] for r in range(3)]), "cpu", 32)
        assert torch.equal(ones, whole)
        if augment_on == "device":  # ships only the frames its sample uses
            assert len(ds[2, 0]["frames"]) == 8 < len(ds[2]["frames"])
    with pytest.raises(IndexError, match="sample 3 of clip 0: expected 0 <= sample < repeated_samples=3"):
        ds[0, 3]

    class Counting(VideoClipDataset):
        def _decode(self, index, attempt):
            info = torch.utils.data.get_worker_info()
            if self.epoch == 0:  # the first pass (the loader prefetches into the next)
                self.decodes[info.id if info else 0, index] += 1
            return super()._decode(index, attempt)

    paths = [np.save(tmp_path / f"c{i}.npy", np.full((20, 8, 8, 3), i, np.uint8)) or tmp_path / f"c{i}.npy" for i in range(8)]
    for spread in (1, 2):  # a worker's pool: one group of 2 clips, or two
        ds = Counting(paths, num_frames=4, sample_stride=2, input_size=8, repeated_samples=4)
        ds.decodes = torch.zeros(2, 8, dtype=torch.int64).share_memory_()
        sampler = EpochBatchSampler(8, batch_size=2, batches_per_epoch=4, rank=0, world=1, seed=0, repeated_samples=4,
                                    workers=2, spread=spread)
        ds.keep_decoded = sampler.keep_decoded
        loader = torch.utils.data.DataLoader(EpochItems(ds, 2), batch_sampler=sampler, num_workers=2,
                                             collate_fn=collate_samples)
        seen = []
        for batch, _ in zip(loader, range(16)):  # one pass: 4 epochs of 4 batches, 8 clips x 4 samples
            assert batch.shape == (2, 3, 4, 8, 8)
            seen += batch[:, 0, 0, 0, 0].tolist()  # the clip's grey value = its index
        assert sorted(seen) == sorted(list(range(8)) * 4)
        assert ds.decodes.sum(0).tolist() == [1] * 8 and ds.decodes.sum(1).tolist() == [4, 4]  # once each, evenly


@pytest.mark.parametrize("k, spread", [(1, 1), (3, 1), (3, 2)])
def test_the_training_loader_resumes_at_any_batch_with_the_same_bytes(tmp_path, k, spread):
    """make_loader, k samples per decode (pooled over `spread` batches), 2 workers, device augmentation: a loader started at any (epoch, batch)
    delivers the straight run's batches from there on, byte for byte (the decode cache changes the cost, never
    the data); k = 1 gives the clips the dataset gives."""
    from expmae.pretrain.loader import make_loader
    from expmae.pretrain.state import Plan, TrainState

    rng = np.random.default_rng(0)
    paths = [tmp_path / f"t{i}.npy" for i in range(8)]
    for p in paths:
        np.save(p, rng.integers(0, 256, (24, 20, 20, 3), dtype=np.uint8))
    ds = VideoClipDataset(paths, num_frames=4, sample_stride=2, input_size=16, seed=2, repeated_samples=k,
                          augment_on="device")
    plan = Plan(world=1, batch_size=2, grad_accum_steps=1, steps_per_epoch=3, total_steps=18, warmup_steps=0, peak_lr=1.0)

    def batches(epoch, batch, n):
        loader = make_loader(ds, plan=plan, state=TrainState(epoch=epoch, batch_in_epoch=batch), rank=0, seed=4,
                             num_workers=2, timeout=0, pin_memory=False, repeated_samples=k,
                             repeat_spread=spread)
        return [batch_to_device(b, "cpu", 16) for b, _ in zip(loader, range(n))]

    straight = batches(0, 0, 12)
    assert all(b.shape == (2, 3, 4, 16, 16) for b in straight)
    if k == 1:  # epoch 0's first batch: the first two clips of the (seed, epoch 0) shuffle, as the dataset makes them
        ds.set_epoch(0)
        first = [i for _, i in next(iter(EpochBatchSampler(8, batch_size=2, batches_per_epoch=3, rank=0, world=1, seed=4)))]
        assert torch.equal(straight[0], batch_to_device(collate_samples([ds[i] for i in first]), "cpu", 16))
    for start in (1, 4, 8):
        assert all(torch.equal(a, b) for a, b in zip(batches(start // 3, start % 3, 12 - start), straight[start:]))


# ------------------------------------------------------------------------------------------- video reading


def test_read_frames_any_order_and_clear_errors(tmp_path):
    path = write_video(tmp_path / "grey.mp4", grey_clip(20, 64))
    reader = open_video(path)
    frames = read_frames(reader, [7, 2, 7, 19], path)
    assert frames.shape == (4, 64, 64, 3)
    assert [round(float(f.mean()) / LEVEL) for f in frames] == [7, 2, 7, 19]
    with pytest.raises(VideoError, match="frame index 20 outside 0..19"):
        read_frames(reader, [3, 20], path)
    # decord 0.6.0 cannot unpack 48-pixel-wide frames: a clear error instead of garbage
    narrow = write_video(tmp_path / "narrow.mp4", grey_clip(4, 64)[:, :, :48])
    with pytest.raises(VideoError, match="narrow.mp4.*width"):
        read_frames(open_video(narrow), [0, 1], narrow)
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_text("junk")
    for name, words in [("empty.mp4", "empty file"), ("junk.mp4", "cannot open as a video"), ("nope.mp4", "no such file")]:
        with pytest.raises(VideoError, match=words) as info:
            open_video(tmp_path / name)
        assert "\n" not in str(info.value) and name in str(info.value)
    (tmp_path / ".hidden.mp4").write_text("temp file of an interrupted write")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in list_videos(tmp_path)] == ["empty.mp4", "grey.mp4", "junk.mp4", "narrow.mp4"]
