"""The learning benchmark: nuisance like real face crops, an unlabelled pool of other people, identity splits."""
import csv
import dataclasses

import numpy as np
import pytest

from expmae.learning_benchmark import (POOL_FIRST_IDENTITY, LearningBenchmarkSize, labelled_clips, pool_clips,
                                       read_labels, write_learning_benchmark)
from expmae.nuisance import Nuisance, degrade
from expmae.synthetic import expression_benchmark, render_expression_clip


def test_zero_nuisance_draws_nothing_and_changes_no_pixel():
    nz = Nuisance.draw(seed=5, strength=0.0)
    assert (nz.scale, nz.shift, nz.roll, nz.gain, nz.gradient[0], nz.cast) == (1.0, (0.0, 0.0), 0.0, 1.0, 0.0, (1.0, 1.0, 1.0))
    assert (nz.occluder, nz.blur, nz.jpeg_quality, nz.noise, nz.talk) == (None, 0.0, 0, 0.0, 0.0)
    frame = np.random.default_rng(0).uniform(0, 255, (32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(degrade(frame, nz, (16, 16), np.random.default_rng(0)), frame.astype(np.uint8))
    clip = expression_benchmark("static", identities=2, test_identities=1, clips_per_identity=2)[0]
    np.testing.assert_array_equal(render_expression_clip(clip, 4, 64, nuisance=0.0), render_expression_clip(clip, 4, 64))


def test_nuisance_is_seeded_strong_and_leaves_the_expression_draws_alone():
    clips = expression_benchmark("static", identities=2, test_identities=1, clips_per_identity=4)
    clean = render_expression_clip(clips[0], 4, 64)
    a = render_expression_clip(clips[0], 4, 64, nuisance=1.0)
    np.testing.assert_array_equal(a, render_expression_clip(clips[0], 4, 64, nuisance=1.0))  # deterministic
    assert a.shape == clean.shape and a.dtype == np.uint8
    assert np.abs(a.astype(int) - clean).mean() > 10  # framing, light, roll: a different picture
    draws = [Nuisance.draw(c.seed, 1.0) for c in clips]
    assert len({d.roll for d in draws}) == len(draws) and max(abs(d.roll) for d in draws) <= 20
    with pytest.raises(ValueError, match="nuisance"):
        render_expression_clip(clips[0], 4, 64, nuisance=3.0)


def test_pool_is_other_people_and_labelled_sets_split_by_identity():
    size = LearningBenchmarkSize()
    pool = pool_clips(size)
    assert len(pool) == size.pool_identities * size.pool_clips_per_identity
    assert {c.task for c in pool} == {"static", "dynamic"} and all(c.split == "pool" for c in pool)
    assert min(c.identity for c in pool) >= POOL_FIRST_IDENTITY
    for task in ("static", "dynamic"):
        clips = labelled_clips(task, size)
        test = [c for c in clips if c.split == "test"]
        assert {c.identity for c in test}.isdisjoint(c.identity for c in clips if c.split == "train")
        assert max(c.identity for c in clips) < POOL_FIRST_IDENTITY
        # enough held-out clips for a 95% interval of at most +-0.05 at the worst case, accuracy 0.5
        assert 1.96 * np.sqrt(0.25 / len(test)) <= 0.0501
    assert len(pool) >= 4 * sum(c.split == "train" for c in labelled_clips("static", size))  # pool >> labelled


def test_written_benchmark_layout_and_resume(tmp_path):
    size = dataclasses.replace(LearningBenchmarkSize.quick(), pool_identities=4, identities=4, test_identities=1,
                               clips_per_identity=4)
    paths = write_learning_benchmark(tmp_path, size, progress=False)
    pool = sorted(p.stem for p in paths["pool"].glob("*.npy"))
    assert pool == sorted(c.name for c in pool_clips(size))
    clip = np.load(paths["pool"] / f"{pool[0]}.npy")
    assert clip.shape == (size.num_frames, size.size, size.size, 3) and clip.dtype == np.uint8
    rows = read_labels(paths["labelled"], "static")
    assert list(rows[0])[:6] == ["name", "discrete", "valence", "identity", "split", "task"]
    assert {r["task"] for r in read_labels(paths["labelled"])} == {"static", "dynamic"}
    assert {r["split"] for r in rows} == {"train", "test"} and all(np.load(r["path"]).shape == clip.shape for r in rows)
    with open(paths["pool_labels"]) as f:
        assert {r["name"] for r in csv.DictReader(f)} == set(pool)
    stamp = (paths["pool"] / f"{pool[0]}.npy").stat().st_mtime_ns
    (paths["pool"] / f"{pool[1]}.npy").unlink()  # a clip lost: the rerun renders it, and only it
    write_learning_benchmark(tmp_path, size, progress=False)
    assert (paths["pool"] / f"{pool[0]}.npy").stat().st_mtime_ns == stamp and (paths["pool"] / f"{pool[1]}.npy").is_file()
