"""The student's data path: replayed views, the teacher's answers attached, equal steps per rank, resumable
positions, no random numbers drawn, the digest check and the cache checks.

The tiny cache comes from tests/tiny.py (the `tiny_cache` fixture)."""

import random
import shutil

import numpy as np
import pytest
import torch

from pipeline import cache, views
from pipeline.manifest import ManifestError
from pipeline.student_data import (RESOLUTION_GAP_SHARE, ViewDriftError, _down, _erased, check_complete,
                                   check_student_resolution, open_train_set, round_robin_resume, shuffle_buffer_order,
                                   student_views, verify_views)
from tiny import BAD, TRAIN_SHARDS

torch.set_num_threads(1)  # two busy cores: a second intra-op thread only spins


def _epoch(data, epoch, rank=0, skip=0):
    return list(data.loader(epoch, rank, skip))


# --------------------------------------------------------------------------------------------- replay


def test_replayed_views_are_the_views_the_teacher_saw(tiny_cache):
    m = tiny_cache.manifest()
    root = tiny_cache.open()
    data = open_train_set(m, root)
    assert m.student.img_size == m.teacher.img_size  # so the student's views can be compared by digest
    batches = _epoch(data, 0)
    assert len(batches) == data.steps_per_epoch
    train = {name: arr[...] for name, arr in root["train"].arrays()}
    seen = 0
    for batch in batches:
        for i, (shard, pos) in enumerate(zip(batch["shard"].tolist(), batch["pos"].tolist())):
            assert (shard, pos) != BAD
            view = batch["views"][i].numpy()
            assert (views.view_digest(view) or 1) == int(train["digest"][0, shard, pos])
            topk, log_m = cache.decode_answers(train["topk_logratios"][0, shard, pos], train["leftover_logit"][0, shard, pos])
            np.testing.assert_array_equal(batch["topk_logprobs"][i].numpy(), topk)  # the stored form, decoded
            np.testing.assert_array_equal(batch["topk_ids"][i].numpy(), train["topk_ids"][0, shard, pos])
            assert batch["log_leftover"][i].item() == log_m
            assert batch["labels"][i].item() == train["labels"][shard, pos]
            partner, lam = views.mix_target(views.decode_params(train["view"][0, shard, pos]))
            partner = pos if (shard, partner) == BAD else partner
            assert batch["partner_labels"][i].item() == train["labels"][shard, partner]
            assert batch["lam"][i].item() == lam
            seen += 1
    assert seen == data.steps_per_epoch * m.student.batch_size


def test_student_epochs_cycle_through_the_cached_epochs(tiny_cache):
    data = open_train_set(tiny_cache.manifest("student.epochs=3"), tiny_cache.open())
    assert data.cache_epochs == 2
    digest = tiny_cache.open()["train"]["digest"][...]
    batch = _epoch(data, 2)[0]  # student epoch 2 replays cache epoch 0
    for view, shard, pos in zip(batch["views"], batch["shard"].tolist(), batch["pos"].tolist()):
        assert (views.view_digest(view.numpy()) or 1) == int(digest[0, shard, pos])


def test_student_resolution_differs_from_the_teachers(tiny_cache):
    m = tiny_cache.manifest("student.img_size=8", "student.patch_size=4")
    data = open_train_set(m, tiny_cache.open(), teacher_size=m.teacher.img_size)
    batch = _epoch(data, 0)[0]
    assert batch["views"].shape[1:] == (8, 8, 3)
    assert batch["teacher_views"].shape[1:] == (16, 16, 3)
    digest = tiny_cache.open()["train"]["digest"][...]
    for view, shard, pos in zip(batch["teacher_views"], batch["shard"].tolist(), batch["pos"].tolist()):
        assert (views.view_digest(view.numpy()) or 1) == int(digest[0, shard, pos])


def test_replay_draws_no_random_numbers(tiny_cache):
    data = open_train_set(tiny_cache.manifest(), tiny_cache.open())
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    _epoch(data, 1)
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    assert random.getstate() == py_state


# --------------------------------------------------------------------------------------------- ranks, shuffle, resume


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_rank_takes_the_same_number_of_steps(tiny_cache, world_size):
    m = tiny_cache.manifest()
    data = open_train_set(m, tiny_cache.open(), world_size=world_size)
    b = m.student.batch_size
    valid = {tuple(p) for p in np.argwhere(data.valid)}
    assert BAD not in valid and len(valid) == sum(TRAIN_SHARDS) - 1
    per_rank = []
    for rank in range(world_size):
        keys = [k for batch in _epoch(data, 0, rank) for k in zip(batch["shard"].tolist(), batch["pos"].tolist())]
        assert len(keys) == data.steps_per_epoch * b
        assert set(keys) <= valid
        per_rank.append(keys)
        # the steps are the fewest any rank can make: this rank's plan holds at least that many
        assert sum(p.batches for p in data.plan(0, rank)) >= data.steps_per_epoch
    if world_size == 1:
        assert len(set(per_rank[0])) == len(per_rank[0])  # each view at most once per epoch
    # ranks read disjoint shares: a view seen by two ranks can only be a padding repeat of the epoch's start
    share = len(valid) // world_size
    assert min(len(set(k)) for k in per_rank) >= share - b - m.views.mix.window
    assert data.steps_per_epoch == min(min(data._batches_per_rank(e)) for e in range(m.student.epochs))


def test_a_batch_larger_than_a_workers_share_is_refused(tiny_cache):
    data = open_train_set(tiny_cache.manifest("student.batch_size=50", "student.workers=3"), tiny_cache.open())
    with pytest.raises(ManifestError, match=r"student.batch_size=50 leaves some rank without a full batch in an "
                                            r"epoch \(98 train samples over 1 ranks x 3 loader workers, each batching "
                                            r"its own share\): lower student.batch_size or student.workers"):
        data.steps_per_epoch


def test_shuffle_buffer_order():
    n, size = 50, 8
    order, ready = shuffle_buffer_order(n, size, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(n))
    assert order.tolist() != list(range(n))
    assert np.all(order < ready)  # an item leaves the buffer only after it arrived
    assert np.all(np.diff(ready) >= 0)
    assert np.all(ready - (np.arange(n) + 1) <= size)  # after each output, at most `size` items held
    identity, _ = shuffle_buffer_order(n, 1, np.random.default_rng(0))
    assert identity.tolist() == list(range(n))
    again, _ = shuffle_buffer_order(n, size, np.random.default_rng(0))
    assert np.array_equal(order, again)


def test_round_robin_resume():
    # batches of workers with 1, 3 and 2 batches come as w0 w1 w2 | w1 w2 | w1
    assert round_robin_resume([1, 3, 2], 0) == ([0, 0, 0], 0)
    assert round_robin_resume([1, 3, 2], 2) == ([1, 1, 0], 2)
    assert round_robin_resume([1, 3, 2], 3) == ([1, 1, 1], 1)
    assert round_robin_resume([1, 3, 2], 4) == ([1, 2, 1], 2)
    assert round_robin_resume([1, 3, 2], 5) == ([1, 2, 2], 1)
    with pytest.raises(ValueError, match="cannot skip 7 batches of an epoch that has 6"):
        round_robin_resume([1, 3, 2], 7)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_loader_resumes_inside_an_epoch_with_workers(tiny_cache):
    # three workers of 4, 5 and 3 batches: the last drops out first, the middle one runs alone at the end
    data = open_train_set(tiny_cache.manifest("student.workers=3", "student.shuffle_buffer=32",
                                              "student.epochs=1"), tiny_cache.open())
    assert [p.batches for p in data.plan(0, 0)] == [4, 5, 3]
    full = _epoch(data, 0)
    assert len(full) == data.steps_per_epoch == 12
    for skip in (1, 5, 10):
        tail = _epoch(data, 0, skip=skip)
        assert len(tail) == len(full) - skip
        for a, b in zip(full[skip:], tail):
            for name in ("shard", "pos", "views", "topk_logprobs", "lam"):
                assert torch.equal(a[name], b[name]), (skip, name)


# --------------------------------------------------------------------------------------------- checks


def test_digest_check_passes_on_an_intact_cache(tiny_cache):
    m = tiny_cache.manifest()
    data = open_train_set(m, tiny_cache.open())
    checked = verify_views(m, tiny_cache.open(), data.shardlist, 1.0)
    assert checked == sum(TRAIN_SHARDS) - 1
    assert verify_views(m, tiny_cache.open(), data.shardlist, 0.0) == 0


@pytest.fixture
def cache_copy(tiny_cache, tmp_path):
    shutil.copytree(tiny_cache.cache_path, tmp_path / "cache")
    return tmp_path / "cache"


def test_digest_mismatch_names_the_view_and_the_drifted_versions(tiny_cache, cache_copy):
    root = cache.open_cache(str(cache_copy), mode="r+")
    root["train"]["digest"][0, 2, 5] = 12345
    versions = dict(root.attrs["versions"])
    m = tiny_cache.manifest(f"cache.path={cache_copy}")
    shardlist = open_train_set(m, root).shardlist
    with pytest.raises(ViewDriftError, match=r"cache epoch 0, shard 2 \(.*part-000002.tar\), position 5 .*the view "
                                             r"recipe or the library versions drifted \(torch, torchvision, timm, "
                                             r"pillow and numpy match"):
        verify_views(m, root, shardlist, 1.0)
    root.attrs["versions"] = {**versions, "pillow": "1.0.0"}
    with pytest.raises(ViewDriftError, match=rf"installed versions differ from the cache's: pillow "
                                             rf"{versions['pillow']} \(cache: 1.0.0\)"):
        verify_views(m, root, shardlist, 1.0)


def test_drifted_versions_with_identical_views_are_only_logged(tiny_cache, cache_copy, caplog):
    root = cache.open_cache(str(cache_copy), mode="r+")
    root.attrs["versions"] = {**root.attrs["versions"], "numpy": "1.0.0"}
    m = tiny_cache.manifest(f"cache.path={cache_copy}")
    with caplog.at_level("INFO", logger="pipeline.student_data"):
        verify_views(m, root, open_train_set(m, root).shardlist, 0.2)
    assert "numpy" in caplog.text and "still identical" in caplog.text


def test_a_labelled_position_without_a_view_stops_the_loader(tiny_cache, cache_copy):
    root = cache.open_cache(str(cache_copy), mode="r+")
    root["train"]["digest"][0, 0, 7] = 0
    data = open_train_set(tiny_cache.manifest(f"cache.path={cache_copy}"), root)
    with pytest.raises(cache.CacheError, match=r"cache epoch 0, shard 0 \(.*part-000000.tar\) position 7 has a label "
                                               r"but no view \(digest 0\): .*rebuild the cache"):
        _epoch(data, 0)


def test_incomplete_cache_is_refused(tiny_cache, cache_copy):
    root = cache.open_cache(str(cache_copy), mode="r+")
    root["train"]["done"][1, 2] = 0
    with pytest.raises(cache.CacheError, match=r"train unit \(epoch 1, shard group 2\) is not complete: resume "
                                               r"`make teacher-cache`"):
        check_complete(root, str(cache_copy), epochs=3)
    check_complete(root, str(cache_copy), epochs=1)  # epoch 1 is not used by a one-epoch run
    root["val"]["done"][0] = 0
    with pytest.raises(cache.CacheError, match=r"val unit \(shard group 0\) is not complete"):
        check_complete(root, str(cache_copy), epochs=1)


def test_a_student_at_another_resolution_is_announced_and_its_renders_checked(tiny_cache, caplog, monkeypatch):
    m = tiny_cache.manifest("student.img_size=8", "student.patch_size=4")
    root = tiny_cache.open()
    shardlist = open_train_set(m, root).shardlist
    with caplog.at_level("WARNING", logger="pipeline.student_data"):
        assert verify_views(m, root, shardlist, 1.0) == sum(TRAIN_SHARDS) - 1
    assert "student.img_size=8 differs from teacher.img_size=16" in caplog.text and "drawn again at 8 px" in caplog.text
    relation = student_views(m, 16)
    assert relation["same_pixels"] is False and (relation["student_size"], relation["teacher_size"]) == (8, 16)
    assert student_views(tiny_cache.manifest(), 16)["same_pixels"] is True
    # a student path that paired each view with the next position's parameters is caught
    real = views.ShardViews

    class Shifted(real):
        def view(self, pos):
            return super().view(pos if self.size != 8 or pos + 1 not in self.images else pos + 1)

    monkeypatch.setattr(views, "ShardViews", Shifted)
    with pytest.raises(ViewDriftError, match=r"student's 8 px renders do not look like the teacher's views"):
        verify_views(m, root, shardlist, 1.0)


def test_resolution_check_agrees_with_renders_made_here():
    """check_student_resolution on views rendered directly by views.render at 32 and 16 px passes; with the
    16 px renders rolled by one view it stops."""
    from PIL import Image

    from pipeline.manifest import Manifest

    m = Manifest()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((40, 36), Image.Resampling.BICUBIC)
              for _ in range(16)]
    params = [views.sample_params(m.views, 0, 0, p, 16, images[p].size, size=32) for p in range(16)]
    big = views.ShardViews(dict(enumerate(images)), params, 32, m.views)
    small = views.ShardViews(dict(enumerate(images)), params, 16, m.views)
    pairs = []
    for p in range(16):
        keep = ~_erased(params[p], 16)
        pairs.append((_down(big.view(p), 16)[keep], _down(small.view(p), 16), keep))
    assert check_student_resolution(m, pairs) < RESOLUTION_GAP_SHARE
    rolled = [(t, pairs[(i + 1) % 16][1], k) for i, (t, _, k) in enumerate(pairs)]
    with pytest.raises(ViewDriftError):
        check_student_resolution(m, rolled)


# --------------------------------------------------------------------------------------------- repeated augmentation


def _plan_items(data, epoch):
    """(shard, pos, copy) rows in the order the shuffle buffer hands them out, all workers of rank 0."""
    return [plan.items[plan.order] for plan in data.plan(epoch, 0)]


def test_repeated_augmentation_replays_like_deits_rasampler(tiny_cache):
    from collections import Counter

    from timm.data.distributed_sampler import RepeatAugSampler

    r = 2
    m = tiny_cache.manifest(f"views.repeats={r}", "student.workers=2")
    root = tiny_cache.open()
    data = open_train_set(m, root)
    valid = {(s, p) for s, p in zip(*np.nonzero(data.valid))}
    n = len(valid)
    group = []
    for epoch in range(r):  # the r epochs of group 0 replay cache epochs 0 and 1
        assert data.cache_epochs_of(epoch) == [0, 1]
        rows = np.concatenate(_plan_items(data, epoch))
        images = Counter(map(tuple, rows[:, :2].tolist()))
        # RASampler (one replica): about N / r distinct images per epoch, each num_repeats times, side by side
        sampler = RepeatAugSampler(range(n), num_replicas=1, rank=0, num_repeats=r, selected_round=0)
        sampler.set_epoch(epoch)
        theirs = list(sampler)
        assert abs(len(rows) - len(theirs)) <= r * len(TRAIN_SHARDS)  # each shard's part rounds on its own
        assert set(images.values()) == {r} and set(Counter(theirs).values()) <= {r, r - 1}
        assert all(theirs[i] == theirs[i + 1] for i in range(0, len(theirs) - 1, r))
        for worker_rows in _plan_items(data, epoch):
            pairs = worker_rows.reshape(-1, r, 3)  # consecutive copies of one image, copies 0..r-1
            assert (pairs[:, :, :2] == pairs[:, :1, :2]).all() and (pairs[:, :, 2] == np.arange(r)).all()
        group.append(set(images))
    # over a group every image is trained on once, in r distinct views
    assert set.union(*group) == valid and sum(map(len, group)) == n
    next_group = set(map(tuple, np.concatenate(_plan_items(data, r))[:, :2].tolist()))
    assert data.cache_epochs_of(r) == [0, 1] and next_group != group[0]  # the next group draws a new partition
    # the batches carry the view of the copy's cache epoch: the teacher saw it (digest), and copies differ
    digest = root["train"]["digest"][...]
    seen = {}
    for batch in _epoch(data, 0):
        for view, shard, pos, epoch in zip(batch["views"], batch["shard"].tolist(), batch["pos"].tolist(),
                                           batch["cache_epoch"].tolist()):
            assert (views.view_digest(view.numpy()) or 1) == int(digest[epoch, shard, pos])
            seen.setdefault((shard, pos), set()).add(epoch)
    assert sum(len(e) == r for e in seen.values()) > 0.8 * len(seen)  # both views of most images (buffer edges drop a few)


def test_repeats_leave_the_cache_alone_and_must_divide_its_epochs(tiny_cache):
    assert views.recipe(tiny_cache.manifest("views.repeats=2").views) == views.recipe(tiny_cache.manifest().views)
    with pytest.raises(ManifestError, match=r"views.repeats=3 .* cache.epochs=2 must be a multiple of 3: set "
                                            r"cache.epochs to 3$"):
        tiny_cache.manifest("views.repeats=3")


def test_a_cache_of_the_previous_recipe_version_is_refused_naming_the_field(tiny_cache, cache_copy):
    from pipeline.student_data import check_fingerprint

    root = cache.open_cache(str(cache_copy), mode="r+")
    expected = dict(root.attrs)
    assert expected["recipe"]["version"] == views.RECIPE_VERSION == "views/4"
    root.attrs["recipe"] = {**expected["recipe"], "version": "views/1"}  # a cache filled before this recipe
    with pytest.raises(cache.CacheError, match=r"built with a different recipe: at recipe.version the cache has "
                                               r"\"views/1\", the run spec has \"views/4\".*set views back"):
        check_fingerprint(root, expected, str(cache_copy))


def test_loader_with_repeats_resumes_inside_an_epoch_and_ignores_the_worker_count(tiny_cache):
    def batches(workers, skip=0):
        m = tiny_cache.manifest("views.repeats=2", f"student.workers={workers}", "student.shuffle_buffer=16",
                                "student.epochs=2", "student.batch_size=4")
        return open_train_set(m, tiny_cache.open()), _epoch(open_train_set(m, tiny_cache.open()), 1, skip=skip)

    data, full = batches(3)
    for skip in (2, 7):
        tail = batches(3, skip)[1]
        assert len(tail) == len(full) - skip
        for a, b in zip(full[skip:], tail):
            for name in ("shard", "pos", "cache_epoch", "views", "topk_logprobs", "lam"):
                assert torch.equal(a[name], b[name]), (skip, name)
    # the views a worker count yields are the same (shard, pos, cache epoch) -> the same pixels and answers
    one = batches(1)[1]

    def by_key(batch_list):
        return {(s, p, e): (v.numpy().tobytes(), t.numpy().tobytes()) for b in batch_list
                for s, p, e, v, t in zip(b["shard"].tolist(), b["pos"].tolist(), b["cache_epoch"].tolist(),
                                         b["views"], b["topk_logprobs"])}

    a, b = by_key(full), by_key(one)
    common = set(a) & set(b)
    assert len(common) > 0.8 * min(len(a), len(b)) and all(a[k] == b[k] for k in common)


def test_the_shuffle_buffer_holds_encoded_samples_and_renders_views_when_their_batch_leaves(tiny_cache, monkeypatch):
    """With a buffer as large as the epoch, the first batch renders only its own views and their mix partners
    (at most two per view), not the buffer; over the epoch every unmixed view is rendered at most once per
    window, and the views are still the ones the teacher saw (by digest)."""
    m = tiny_cache.manifest("student.shuffle_buffer=4096")
    data = open_train_set(m, tiny_cache.open())
    rendered = []
    original = views.render_unmixed

    def counting(image, params, size, cfg):
        rendered.append(1)
        return original(image, params, size, cfg)

    monkeypatch.setattr(views, "render_unmixed", counting)
    batches = data.loader(0, 0)
    first = next(batches)
    b = m.student.batch_size
    assert len(first["views"]) == b and len(rendered) <= 2 * b
    assert len(rendered) < int(data.valid.sum()) // 2  # far from the whole epoch the buffer has read
    rest = list(batches)
    total = (1 + len(rest)) * b
    assert len(rendered) <= 2 * total
    digest = tiny_cache.open()["train"]["digest"][0]
    for batch in [first, *rest]:
        for view, shard, pos in zip(batch["views"], batch["shard"].tolist(), batch["pos"].tolist()):
            assert (views.view_digest(view.numpy()) or 1) == int(digest[shard, pos])


# --------------------------------------------------------------------------------------------- persistent workers


def _assert_same_batches(got, want, label=""):
    assert len(got) == len(want), label
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.keys() == b.keys(), (label, i)
        for name in a:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), (label, i, name)


def test_worker_shares_add_up_to_the_epochs_steps(tiny_cache):
    """Each loader worker derives its part of an epoch from (epoch, rank, skip) alone; the parts add up to the
    epoch's steps (no batch made that the epoch does not use), from counts that equal the plans'."""
    for world_size, workers in ((1, 3), (2, 2), (3, 1)):
        data = open_train_set(tiny_cache.manifest(f"student.workers={workers}", "student.epochs=3"), tiny_cache.open(),
                              world_size=world_size)
        steps = data.steps_per_epoch
        for epoch in range(3):
            for rank in range(world_size):
                assert data._worker_batches(epoch)[rank] == [p.batches for p in data.plan(epoch, rank)]
                for skip in (0, 1, steps - 1, steps):
                    parts = [data.share(epoch, rank, skip, w) for w in range(workers)]
                    assert sum(stop - start for _, start, stop in parts) == steps - skip
                    assert all(0 <= start <= stop <= plan.batches for plan, start, stop in parts)



def _round_robin(plans, steps):
    """(shard, pos) of each view of the first `steps` batches when every plan runs whole and the loader takes
    one batch per worker in turn, a finished worker dropping out (the loader before workers stopped short)."""
    queues = [[plan.items[plan.order[k * plan.batch_size:(k + 1) * plan.batch_size], :2].tolist()
               for k in range(plan.batches)] for plan in plans]
    out, worker = [], 0
    while len(out) < steps:
        if queues[worker]:
            out.append(queues[worker].pop(0))
        worker = (worker + 1) % len(queues)
    return out


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_workers_that_stop_short_keep_the_order_of_workers_run_whole(tiny_cache):
    data = open_train_set(tiny_cache.manifest("student.workers=2", "student.epochs=2"), tiny_cache.open(), world_size=2)
    assert data._worker_batches(0)[0] == [4, 3] and data.steps_per_epoch == 6  # rank 0 stops a batch short
    for rank in range(2):
        got = [torch.stack([b["shard"], b["pos"]], 1).tolist() for b in _epoch(data, 0, rank)]
        assert got == _round_robin(data.plan(0, rank), data.steps_per_epoch)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("world_size,workers", [(1, 3), (2, 2)])
def test_persistent_workers_give_the_batches_of_workers_started_each_epoch(tiny_cache, world_size, workers):
    """One loader for the run (workers started once, each epoch handed to them, the next epoch's first batch
    begun ahead) yields bit for bit the batches of a loader started anew each epoch, over several epochs, for
    every rank, including epochs whose ranks make more batches than the steps taken; resumed mid-epoch, it
    continues exactly, and an epoch asked for out of turn is still right."""
    import multiprocessing

    epochs = 4
    m = tiny_cache.manifest(f"student.workers={workers}", f"student.epochs={epochs}", "student.shuffle_buffer=24")
    data = open_train_set(m, tiny_cache.open(), world_size=world_size)
    steps = data.steps_per_epoch
    if world_size == 2:  # some rank makes more batches than the steps in some epoch: its workers stop short
        assert any(n > steps for e in range(epochs) for n in data._batches_per_rank(e))
    for rank in range(world_size):
        fresh = [_epoch(data, epoch, rank) for epoch in range(epochs)]
        with data.open_loader(rank) as loader:
            pids = []
            for epoch in range(epochs):
                _assert_same_batches(list(loader.epoch(epoch)), fresh[epoch], (rank, epoch))
                pids.append({p.pid for p in multiprocessing.active_children()})
            assert len(pids[0]) == workers and all(p == pids[0] for p in pids)  # the same workers every epoch
        assert not multiprocessing.active_children()  # and they stopped with the loader
        # a resumed run: its first epoch skips the batches done, the next ones start whole; out of turn too
        skip = steps // 2 + 1
        with data.open_loader(rank) as loader:
            _assert_same_batches(list(loader.epoch(1, skip)), fresh[1][skip:], (rank, "resumed"))
            _assert_same_batches(list(loader.epoch(2)), fresh[2], (rank, "after the resumed epoch"))
            _assert_same_batches(list(loader.epoch(0)), fresh[0], (rank, "out of turn"))
            assert list(loader.epoch(3, steps)) == []


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_the_next_epoch_is_begun_ahead_in_a_worker_and_handed_over(tiny_cache):
    """In a worker, the next epoch's first batch is made in a thread once the current epoch's reading is done
    (or at its last batches) and handed over when that epoch is asked for; another epoch asked for instead gets
    its own batches. Run here in process, as one worker runs it."""
    from pipeline import student_data

    m = tiny_cache.manifest("student.epochs=3", "student.shuffle_buffer=16")
    data = open_train_set(m, tiny_cache.open())
    fresh = [_epoch(data, epoch) for epoch in range(3)]
    where = torch.zeros(2, dtype=torch.int64)
    views_ = student_data.StudentViews(data, 0, where, ahead=True)
    taken = []
    take = student_data._Ahead.take
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(student_data._Ahead, "take", lambda self: taken.append(self.key) or take(self))
        _assert_same_batches(list(views_), fresh[0], "epoch 0")
        assert views_._next is not None and views_._next.key == (1, 0, 0)
        where[0] = 1
        _assert_same_batches(list(views_), fresh[1], "epoch 1, begun ahead")
        assert taken == [(1, 0, 0)] and views_._next.key == (2, 0, 0)
        where[0] = 0  # not the epoch begun: it is dropped and epoch 0 made from its start
        _assert_same_batches(list(views_), fresh[0], "epoch 0 again")
        assert taken == [(1, 0, 0)]
        where[0] = 2
        batches = list(views_)
        assert views_._next is None  # no epoch after the last
    _assert_same_batches(batches, fresh[2], "epoch 2")


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_an_error_in_a_persistent_worker_stops_the_epoch_and_the_workers_stop(tiny_cache, cache_copy):
    import multiprocessing

    root = cache.open_cache(str(cache_copy), mode="r+")
    root["train"]["digest"][0, 0, 7] = 0
    data = open_train_set(tiny_cache.manifest(f"cache.path={cache_copy}", "student.workers=2"), root)
    with pytest.raises(cache.CacheError, match=r"shard 0 \(.*part-000000.tar\) position 7 has a label but no view"):
        with data.open_loader(0) as loader:
            for epoch in range(2):
                list(loader.epoch(epoch))
    assert not multiprocessing.active_children()
