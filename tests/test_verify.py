"""verify-cache against the teacher, version drift, and corruption: a flipped byte, a deleted chunk, a unit not
complete. A tiny cache (manifests/tiny.yaml on tiny shards, untrained teacher) is built once; tests that
damage it work on a copy."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fault_script import tiny_overrides
from pipeline import cache, verify, views
from pipeline.cli import main
from pipeline.manifest_loader import load
from pipeline.reader import read_shard
from pipeline.shards import load_shardlist
from pipeline.losses import sparse_teacher_answers
from pipeline.teacher import load_teacher, normalize
from pipeline.teacher_cache import run as fill_cache

TINY = "manifests/tiny.yaml"


class Built:
    def __init__(self, work: Path):
        self.overrides = tiny_overrides(work)
        self.path = str(work / "cache")
        fill_cache(self.manifest(), progress=False)

    def manifest(self, *extra):
        return load(TINY, self.overrides + [f"cache.path={self.path}", *extra])

    def copy(self, tmp_path) -> str:
        shutil.copytree(self.path, tmp_path / "cache")
        return str(tmp_path / "cache")

    def cli(self, path, *args):
        sets = [a for o in self.overrides for a in ("--set", o)]
        return CliRunner().invoke(main, ["verify-cache", "--manifest", TINY, *sets, "--cache", path, *args])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return Built(tmp_path_factory.mktemp("verify"))


def _flip_byte(path: str, offset: int = 20) -> None:
    data = bytearray(Path(path).read_bytes())
    data[offset % len(data)] ^= 0x10
    Path(path).write_bytes(bytes(data))


def _sampled(built, split, share=0.3, seed=0):
    root = cache.open_cache(built.path)
    return verify.sample_positions(cache.read_labels(root, split), share, seed, split)


# --------------------------------------------------------------------------------------------- verify


def test_clean_cache_passes_and_agrees_with_a_direct_recomputation(built):
    m = built.manifest()
    report = verify.verify_cache(m, built.path, share=0.3)
    assert report.passed, report.failures
    root = cache.open_cache(built.path)
    epochs = cache.layout_of(root, "train").epochs
    # every sampled position is checked in every cached epoch; every view's pixels are the teacher's
    for split, per_epoch in (("train", epochs), ("val", 1)):
        sr = report.splits[split]
        assert sr.views == per_epoch * sum(len(p) for p in _sampled(built, split).values()) > 0
        assert sr.digest_matches == sr.views == sr.topk_set_agree == sr.topk_order_agree == sr.top1_agree
    # the same numbers from a direct computation: render, run the teacher in one batch, compare
    teacher = load_teacher(m.teacher, 10)
    shardlist = load_shardlist(m.data.train)
    worst = 0.0
    for shard, positions in _sampled(built, "train").items():
        samples = {s.pos: s for s in read_shard(shardlist, shard)}
        for epoch in range(epochs):
            stored_views = views.decode_params(root["train"]["view"][epoch, shard])
            x = []
            for pos in positions:
                partner, _ = views.mix_target(stored_views[pos])
                x.append(views.render(samples[pos].image, stored_views[pos], m.teacher.img_size, m.views,
                                      samples[partner].image, stored_views[partner]))
                assert views.view_digest(x[-1]) == int(root["train"]["digest"][epoch, shard, pos])
            with torch.no_grad():
                logits = teacher.model(normalize(torch.from_numpy(np.stack(x)), teacher.mean, teacher.std))
            ids = root["train"]["topk_ids"][epoch, shard][positions].astype(np.int64)
            cached = np.exp(cache.decode_answers(root["train"]["topk_logratios"][epoch, shard][positions],
                                                 root["train"]["leftover_logit"][epoch, shard][positions])[0].astype(np.float64))
            p = torch.softmax(logits.double(), dim=1).numpy()
            worst = max(worst, float(np.abs(cached - np.take_along_axis(p, ids, 1)).max()))
    assert report.splits["train"].max_prob_error == pytest.approx(worst, abs=1e-6)
    assert worst < verify.Thresholds().max_prob_error / 10  # float16 log-probabilities pass comfortably
    assert report.splits["train"].max_kl < verify.Thresholds().max_kl / 100


def test_every_complete_unit_is_sampled_even_at_a_tiny_share(built):
    report = verify.verify_cache(built.manifest(), built.path, share=1e-9, scan=False)
    root = cache.open_cache(built.path)
    train = cache.layout_of(root, "train")
    assert report.splits["train"].views == train.epochs * train.shards  # one view per shard and epoch
    assert report.splits["val"].views == cache.layout_of(root, "val").shards
    assert report.passed


def test_sample_is_seeded_and_at_least_one_view_per_shard():
    labels = np.full((3, 10), -1)
    labels[0, :10] = 1
    labels[1, 2:5] = 1  # a shard with skipped samples
    a = verify.sample_positions(labels, 0.5, seed=7, split="train")
    assert a.keys() == {0, 1}  # shard 2 holds no view
    assert len(a[0]) == 5 and len(a[1]) == 2 and set(a[1]) <= {2, 3, 4}
    assert all(np.array_equal(a[k], verify.sample_positions(labels, 0.5, 7, "train")[k]) for k in a)
    assert len(verify.sample_positions(labels, 1e-9, 7, "train")[1]) == 1


def test_a_wrong_cached_probability_fails_and_names_the_view(built, tmp_path):
    path = built.copy(tmp_path)
    shard, positions = next(iter(_sampled(built, "train").items()))
    pos = int(positions[0])
    arr = cache.open_cache(path, mode="r+")["train"]["topk_logratios"]
    arr[1, shard, pos, 1] = arr[1, shard, pos, 1] + np.float16(0.5)  # rank 3, rewritten through zarr: the checksum holds
    report = verify.verify_cache(built.manifest(), path, share=0.3)
    assert not report.passed
    sr = report.splits["train"]
    assert len(sr.violations) == 1
    assert sr.violations[0].startswith(f"train epoch 1, shard {shard} position {pos} (key ")
    assert re.search(r"train: 1 views have cached probabilities off by more than 0\.002 per class, 0\.002 in "
                     r"leftover mass or 0\.001 nats of KL \(--max-prob-error/--max-leftover-error/--max-kl\)",
                     report.failures[0])
    # wider limits let the same cache pass: the thresholds are options
    loose = verify.Thresholds(max_prob_error=1.0, max_kl=1.0)
    assert verify.verify_cache(built.manifest(), path, share=0.3, thresholds=loose).passed


def test_wrong_val_answers_are_caught(built, tmp_path):
    path = built.copy(tmp_path)
    shard, positions = next(iter(_sampled(built, "val").items()))
    pos = int(positions[-1])
    val = cache.open_cache(path, mode="r+")["val"]
    val["topk_logratios"][shard, pos] = val["topk_logratios"][shard, pos] - np.float16(0.3)
    report = verify.verify_cache(built.manifest(), path, share=0.3)
    assert not report.passed and report.splits["train"].violations == []
    assert report.splits["val"].violations[0].startswith(f"val shard {shard} position {pos}")
    assert any(f.startswith("val: 1 views have cached probabilities off") for f in report.failures)


def _confident_logits(rng, n=512, classes=1000):
    """ImageNet-like teacher outputs of mixed confidence: a N(0, 1.5^2) bulk, the top class 2-20 above it."""
    z = rng.normal(0.0, 1.5, (n, classes))
    z[np.arange(n), rng.integers(classes, size=n)] += rng.uniform(2.0, 20.0, n)
    return z


def _check(stored, logits):
    report = verify.SplitReport("train")
    where = [f"view {i}" for i in range(len(logits))]
    verify.compare_answers(report, stored, logits.astype(np.float32), where, verify.Thresholds())
    return report


def test_stored_tail_draws_are_checked_against_the_recomputed_teacher():
    rng = np.random.default_rng(1)
    z = _confident_logits(rng, n=256)
    z[:, :50] += 3.0  # a heavier tail, so the drawn classes carry visible mass
    uniforms = torch.from_numpy(rng.random((len(z), 16)))
    stored = {name: value.numpy() for name, value in
              sparse_teacher_answers(torch.from_numpy(z).float(), 10, uniforms).items()}
    assert not _check(stored, z).violations
    moved = {**stored, "tail_ids": (stored["tail_ids"] + 1) % 1000}  # each draw now names its neighbour class
    assert len(_check(moved, z).violations) > len(z) // 4  # the views whose draws carry more than 2e-3


@pytest.mark.parametrize("k", [10, 1000])
def test_probability_thresholds_pass_float16_and_fail_a_perturbed_teacher_or_a_swapped_class(k):
    rng = np.random.default_rng(0)
    z = _confident_logits(rng)
    stored = {name: value.numpy() for name, value in sparse_teacher_answers(torch.from_numpy(z).float(), k).items()}
    clean = _check(stored, z)
    t = verify.Thresholds()
    assert not clean.violations and clean.top1_agree == len(z)
    # comfortably: ten times below the limits (four for the leftover, stored to a relative 4.9e-4 of up to 0.8)
    assert clean.max_prob_error < t.max_prob_error / 10 and clean.max_kl < t.max_kl / 10
    assert clean.max_leftover_error < t.max_leftover_error / 4
    # a teacher whose logits moved by 1% of each view's logit range
    spread = z.max(1, keepdims=True) - z.min(1, keepdims=True)
    moved = _check(stored, z + 0.01 * spread * rng.standard_normal(z.shape))
    assert len(moved.violations) > len(z) // 10
    # one pair of classes swapped in every view's stored ids
    swapped = {**stored, "topk_ids": stored["topk_ids"][:, [1, 0, *range(2, k)]]}
    assert len(_check(swapped, z).violations) > len(z) // 2


def test_top1_disagreement_beyond_the_share_fails(built, tmp_path):
    path = built.copy(tmp_path)
    shard, positions = next(iter(_sampled(built, "train").items()))
    pos = int(positions[0])
    ids = cache.open_cache(path, mode="r+")["train"]["topk_ids"]
    row = ids[0, shard, pos]
    ids[0, shard, pos] = np.concatenate([row[-1:], row[:-1]])  # the weakest class now claims top-1
    no_logit_gate = verify.Thresholds(max_prob_error=1e6, max_kl=1e6)  # leave only the top-1 gate
    report = verify.verify_cache(built.manifest(), path, share=0.3, thresholds=no_logit_gate)
    sr = report.splits["train"]
    assert sr.top1_agree == sr.compared - 1
    assert sr.topk_set_agree == sr.compared and sr.topk_order_agree == sr.compared - 1
    assert sr.top1_disagreements == [] and report.passed  # within the (huge) tolerance: counted as a near-tie
    strict = verify.Thresholds(max_prob_error=0.0, max_top1_disagreement=0.0)
    report = verify.verify_cache(built.manifest(), path, share=0.3, thresholds=strict)
    assert any(re.match(rf"train: the teacher's top-1 now differs on 1 of \d+ views \(more than 0\.00%\); first: "
                        rf"train epoch 0, shard {shard} position {pos}", f) for f in report.failures)


def test_digest_mismatch_fails_on_the_command_line_with_table_and_json(built, tmp_path):
    path = built.copy(tmp_path)
    shard, positions = next(iter(_sampled(built, "train").items()))
    pos = int(positions[0])
    digest = cache.open_cache(path, mode="r+")["train"]["digest"]
    digest[0, shard, pos] = digest[0, shard, pos] ^ np.uint32(1)
    out = tmp_path / "report.json"
    result = built.cli(path, "--sample", "0.3", "--json", str(out))
    assert result.exit_code == 1, result.output
    assert re.search(r"digest matches +\d+/\d+ \(\d+\.\d%\)", result.output)
    assert "FAILED" in result.output
    assert "re-rendered views differ from the views the teacher saw (the library versions match the cache's" \
        in result.output
    saved = json.loads(out.read_text())
    assert saved["passed"] is False
    assert saved["splits"]["train"]["digest_mismatches"][0].startswith(f"train epoch 0, shard {shard} position {pos}")
    # the view is not compared further: its pixels are not the teacher's
    assert saved["splits"]["train"]["digest_matches"] == saved["splits"]["train"]["views"] - 1
    result = built.cli(path, "--sample", "0.3", "--max-digest-mismatches", "1")
    assert result.exit_code == 0 and "PASSED" in result.output


def test_version_drift_is_named_and_the_digests_decide(built, tmp_path, monkeypatch):
    installed = dict(cache.open_cache(built.path).attrs["versions"], torch="9.9.9", pillow="1.0")
    monkeypatch.setattr(verify, "library_versions", lambda: installed)
    report = verify.verify_cache(built.manifest(), built.path, share=0.3)
    cached = cache.open_cache(built.path).attrs["versions"]
    assert report.versions == {"torch": {"cache": cached["torch"], "installed": "9.9.9"},
                               "pillow": {"cache": cached["pillow"], "installed": "1.0"}}
    assert report.passed  # the views still render identically: the drift does not matter
    assert ("library versions differ from the cache's (the digests above decide whether that matters): "
            f"torch 9.9.9 (cache: {cached['torch']}), pillow 1.0 (cache: {cached['pillow']})") in verify.format_report(report)
    # when a digest differs too, the failure names the drifted libraries as the likely cause
    path = built.copy(tmp_path)
    shard, positions = next(iter(_sampled(built, "val").items()))
    digest = cache.open_cache(path, mode="r+")["val"]["digest"]
    digest[shard, positions[0]] = np.uint32(12345)
    report = verify.verify_cache(built.manifest(), path, share=0.3)
    assert any(f"(the installed versions differ from the cache's: torch 9.9.9 (cache: {cached['torch']}), pillow 1.0"
               in f for f in report.failures)


def test_a_cache_of_another_teacher_is_refused_naming_the_field(built, tmp_path):
    other = tmp_path / "other.pt"
    state = torch.load(built.manifest().teacher.checkpoint, weights_only=True)
    state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, other)
    with pytest.raises(cache.CacheError, match=r"was built with a different teacher: at teacher\.sha256 the cache has"):
        verify.verify_cache(built.manifest(f"teacher.checkpoint={other}"), built.path)
    result = built.cli(built.path, "--set", f"teacher.checkpoint={other}")
    assert result.exit_code == 1 and "Error: cache" in result.output and "different teacher" in result.output


# --------------------------------------------------------------------------------------------- corruption


def _chunk(path, split, name, coords):
    root = cache.open_cache(path)
    return cache.chunk_location(root, root[split][name], coords)


def test_a_flipped_byte_is_named_with_array_chunk_and_unit(built, tmp_path):
    path = built.copy(tmp_path)
    _flip_byte(_chunk(path, "train", "topk_logratios", (1, 2, 0, 0)))
    root = cache.open_cache(path)
    message = (r"train/topk_logratios chunk \(1, 2, 0, 0\) \(.*/train/topk_logratios/c/1/2/0/0\) is corrupt \(Stored and "
               r"computed checksum do not match.*\); it belongs to train unit \(epoch 1, shard group 2, shards \[2\]\)\. "
               r"Nothing was read from it: restore the cache from a copy, or delete .*/train/done/c/1/2 \(the unit's "
               r"done flag\) and resume `make teacher-cache` to recompute the unit")
    with pytest.raises(cache.CacheError, match=message):
        cache.read_slab(root, "train", 1, 2)
    cache.read_slab(root, "train", 0, 2)  # the other units read as before
    report = verify.verify_cache(built.manifest(), path, share=1e-9)
    assert not report.passed and len(report.damaged) == 1 and re.search(message, report.damaged[0])
    result = built.cli(path, "--no-scan")  # found by the sampled read as well
    assert result.exit_code == 1 and "1 damaged chunk(s) in complete units" in result.output


def test_flipped_bytes_in_labels_and_done_flags_are_named(built, tmp_path):
    path = built.copy(tmp_path)
    _flip_byte(_chunk(path, "train", "labels", (3, 0)))
    _flip_byte(_chunk(path, "val", "done", (1,)), offset=0)
    root = cache.open_cache(path)
    with pytest.raises(cache.CacheError, match=r"train/labels chunk \(3, 0\) .* is corrupt .*; it belongs to the labels "
                                               r"of shard group 3, written by train unit \(epoch 0, shard group 3"):
        cache.read_labels(root, "train")
    with pytest.raises(cache.CacheError, match=r"val/done chunk \(1,\) .* is corrupt .*val unit \(shard group 1, shards "
                                               r"\[1\]\).* delete .*/val/done/c/1 \(the unit's done flag\)"):
        cache.done_units(root, "val")


def test_a_deleted_chunk_of_a_complete_unit_is_an_error_not_zeros(built, tmp_path):
    path = built.copy(tmp_path)
    Path(_chunk(path, "train", "leftover_logit", (0, 1, 0))).unlink()
    root = cache.open_cache(path)
    assert (root["train"]["leftover_logit"][0, 1] == 0).all()  # what zarr alone would hand out
    with pytest.raises(cache.CacheError, match=r"train/leftover_logit chunk \(0, 1, 0\) \(.*/train/leftover_logit/c/0/1/0\) of train unit "
                                               r"\(epoch 0, shard group 1, shards \[1\]\), which is marked complete, is "
                                               r"missing; zarr would read it as zeros"):
        cache.read_slab(root, "train", 0, 1)
    Path(_chunk(path, "train", "labels", (4, 0))).unlink()
    with pytest.raises(cache.CacheError, match=r"train/labels chunk \(4, 0\) .* is missing"):
        cache.read_labels(root, "train")
    report = verify.verify_cache(built.manifest(), path, share=1e-9)
    assert sum("is missing" in d for d in report.damaged) == 2 and not report.passed


def test_a_unit_not_complete_is_reported_and_never_read(built, tmp_path):
    path = built.copy(tmp_path)
    # a partly written unit: its done flag never came, one data chunk half written, a leftover temporary file
    Path(_chunk(path, "train", "done", (1, 4))).unlink()
    Path(_chunk(path, "train", "view", (1, 4, 0, 0))).write_bytes(b"half a chunk")
    Path(_chunk(path, "train", "leftover_logit", (1, 4, 0))).with_suffix(".0a1b.partial").write_bytes(b"x")
    root = cache.open_cache(path)
    with pytest.raises(cache.CacheError, match=r"train unit \(epoch 1, shard group 4, shards \[4\]\) is not complete: "
                                               r"resume `make teacher-cache` to finish it"):
        cache.read_slab(root, "train", 1, 4)
    report = verify.verify_cache(built.manifest(), path, share=0.3)
    assert report.passed, report.failures  # the complete units verify; the incomplete one is listed
    assert report.splits["train"].incomplete == ["train epoch 1, shard group 4"]
    assert report.splits["train"].units_done == report.splits["train"].units_total - 1
    assert ("train: 1 unit(s) not complete, not verified (first: train epoch 1, shard group 4): resume "
            "`make teacher-cache` to finish them") in verify.format_report(report)
    # the val unit whose labels are not written yet reads as "no sample", never as class 0
    Path(_chunk(path, "val", "done", (0,))).unlink()
    labels = cache.read_labels(cache.open_cache(path), "val")
    assert (labels[0] == -1).all() and (labels[1] >= 0).any()


def test_sample_share_must_be_positive(built):
    with pytest.raises(ValueError, match=r"--sample=0 must lie in \(0, 1\]"):
        verify.verify_cache(built.manifest(), built.path, share=0)
