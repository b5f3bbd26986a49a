"""Teacher agreement statistics and their plots, against independent computations.

The numbers are checked on a synthetic cache written with known values (K < C, an incomplete unit, a skipped
sample, a padded shard, mixed views), recomputed here in plain numpy from the arrays read back through zarr
directly. A student run is checked on the shared tiny cache: its per-sample predictions, evaluated here from
its checkpoint, must give the accuracies that training wrote to result.json."""

import io
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from matplotlib.figure import Figure
from PIL import Image

from terminal import Terminal
from pipeline import cache, plots, views
from pipeline.stats import HEADS, StatsError, compute, format_table
from pipeline.train import train
from stages.stats import stats as stats_command

torch.set_num_threads(1)

C, K, E = 5, 3, 2
TRAIN_COUNTS = (6, 6, 4)  # shard 2 is short: positions 4 and 5 are padding
P = max(TRAIN_COUNTS)
VAL_COUNTS = (8,)
SKIPPED = (0, 2)  # (shard, position) of a sample skipped as bad: no label, no view
MISSING_UNIT = (0, 1)  # (epoch, group) never written: shard 1's labels are unknown, also at epoch 1
CLASSES = [f"class {c}" for c in range(C)]


def _params(partner: int, lam: float) -> np.ndarray:
    values = dict.fromkeys(views.PARAM_FIELDS, 0.0)
    values |= {f"ra{i}_op": -1.0 for i in range(views.MAX_RA_OPS)}
    values |= {"mix_mode": 1.0 if lam < 1 else 0.0, "mix_partner": float(partner), "mix_lam": lam, "grid": 8.0}
    return views.quantise_params(np.array([values[f] for f in views.PARAM_FIELDS], np.float32))


def _answers(rng, n):
    """Sorted top-K float16 log-probabilities, their ids and the log leftover of a full random logit vector."""
    full = rng.normal(0, 1.5, size=(n, C))
    ids = np.argsort(-full, axis=1, kind="stable")[:, :K]
    log_p = full - np.log(np.exp(full).sum(1, keepdims=True))
    logits = np.take_along_axis(log_p, ids, 1).astype(np.float16)
    rest = np.exp(log_p).sum(1) - np.exp(np.take_along_axis(log_p, ids, 1)).sum(1)
    return logits, ids.astype(np.uint16), np.log(rest).astype(np.float32)


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("synthetic") / "cache")
    rng = np.random.default_rng(0)
    common = dict(top_k=K, num_classes=C, shards_per_unit=1)
    layouts = {"train": cache.CacheLayout(shards=len(TRAIN_COUNTS), positions=P, n_params=views.N_PARAMS,
                                          epochs=E, **common),
               "val": cache.CacheLayout(shards=1, positions=max(VAL_COUNTS), n_params=0, epochs=None, **common)}
    attrs = {"classes": CLASSES, "teacher": {"model": "synthetic"}, "top_k": K, "teacher_size": 8,
             "param_fields": list(views.PARAM_FIELDS), "fingerprint": "f" * 16,
             "shards": {"train": [[f"t{s}.tar", n, "0" * 64] for s, n in enumerate(TRAIN_COUNTS)],
                        "val": [["v0.tar", VAL_COUNTS[0], "0" * 64]]}}
    root = cache.create(path, layouts, attrs)
    labels = rng.integers(0, C, size=(len(TRAIN_COUNTS), P)).astype(np.int32)
    for shard, n in enumerate(TRAIN_COUNTS):
        labels[shard, n:] = -1
    labels[SKIPPED] = -1
    for epoch in range(E):
        for shard, n in enumerate(TRAIN_COUNTS):
            if (epoch, shard) == MISSING_UNIT:
                continue
            logits, ids, lse = _answers(rng, P)
            params = np.stack([_params(pos, 1.0) for pos in range(P)])
            for pos in range(n):
                params[pos] = _params(int(rng.integers(n)), float(rng.choice([0.3, 0.5, 0.7, 1.0])))
            if shard == SKIPPED[0]:  # mostly the skipped partner's: stage 1 mixed the view with itself instead
                params[0] = _params(SKIPPED[1], 0.3)
            digest = np.where(labels[shard] >= 0, rng.integers(1, 2**32, size=P), 0).astype(np.uint32)
            cache.write_unit(root, "train", epoch, shard, {
                "topk_logprobs": logits[None], "topk_ids": ids[None], "log_leftover": lse[None], "digest": digest[None],
                "view": params[None], "labels": labels[shard][None]})
    logits, ids, lse = _answers(rng, VAL_COUNTS[0])
    val_labels = np.array([[0, 0, 1, 2, 2, 3, 4, 4]], np.int32)
    cache.write_unit(root, "val", None, 0, {"topk_logprobs": logits[None], "topk_ids": ids[None],
                                            "log_leftover": lse[None], "digest": np.ones((1, VAL_COUNTS[0]), np.uint32),
                                            "labels": val_labels})
    return path


# --------------------------------------------------------------------------------------------- independent numbers


def _entropy(log_p, code):
    """Closed form: the top-K probabilities plus the leftover (read from its stored logit code as the README
    says) spread evenly over the C - K other classes, renormalised as the loss does."""
    p = np.exp(log_p.astype(np.float64))
    rest = 1.0 / (1.0 + math.exp(-(16.0 - float(code) / 1024))) if code != 65535 else 0.0
    p, rest = p / (p.sum() + rest), rest / (p.sum() + rest)
    h = -sum(x * math.log(x) for x in p if x > 0)
    return h - (rest * math.log(rest / (C - K)) if rest > 0 else 0.0)


def _expected_train(path):
    raw = zarr.open_group(path, mode="r")
    arrays = {name: raw["train"][name][...] for name in ("topk_logratios", "topk_ids", "leftover_logit", "digest",
                                                         "view", "done")}
    labels = raw["train"]["labels"][...]
    labelled = arrays["done"][0]  # the epoch-0 units write the labels
    out = {}
    for epoch in range(E):
        mass, entropy, hits = [], [], []
        for shard in range(len(TRAIN_COUNTS)):
            if not arrays["done"][epoch, shard]:
                continue
            for pos in range(P):
                if arrays["digest"][epoch, shard, pos] == 0:
                    continue
                code = arrays["leftover_logit"][epoch, shard, pos]
                z, _ = cache.decode_answers(arrays["topk_logratios"][epoch, shard, pos], code)
                mass.append(np.exp(z.astype(np.float64)).sum())
                entropy.append(_entropy(z, code))
                if not labelled[shard]:
                    continue
                partner, lam = views.mix_target(views.decode_params(arrays["view"][epoch, shard, pos]))
                if labels[shard, partner] < 0:
                    partner = pos
                target = labels[shard, pos] if lam >= 0.5 else labels[shard, partner]
                hits.append(arrays["topk_ids"][epoch, shard, pos, 0] == target)
        out[epoch] = (np.array(mass), np.array(entropy), np.array(hits))
    return out


def test_train_statistics_equal_an_independent_computation(synthetic_cache):
    got = compute(synthetic_cache)
    expected = _expected_train(synthetic_cache)
    assert got["cache"]["units"] == {"train": {"done": 5, "total": 6}, "val": {"done": 1, "total": 1}}
    assert [e["epoch"] for e in got["train"]["by_epoch"]] == [0, 1]
    for row in got["train"]["by_epoch"]:
        mass, entropy, hits = expected[row["epoch"]]
        assert (row["views"], row["labelled_views"]) == (len(mass), len(hits))
        assert row["teacher_top1"] == pytest.approx(hits.mean())
        np.testing.assert_allclose(list(row["mass"]["quantiles"].values()),
                                   np.quantile(mass, [float(q) for q in row["mass"]["quantiles"]]), rtol=1e-5)
        assert row["mass"]["below_threshold"] == pytest.approx((mass < 0.9).mean())
        assert row["mass"]["histogram"]["counts"] == np.histogram(mass, bins=50, range=(0, 1))[0].tolist()
        assert row["entropy"]["mean"] == pytest.approx(entropy.mean(), rel=1e-5)
        assert row["entropy"]["max"] == pytest.approx(entropy.max(), rel=1e-5)
    assert expected[0][0].size == expected[0][2].size == TRAIN_COUNTS[0] - 1 + TRAIN_COUNTS[2]  # no skipped sample,
    assert expected[1][0].size == sum(TRAIN_COUNTS) - 1  # no incomplete unit,
    assert expected[1][2].size == TRAIN_COUNTS[0] - 1 + TRAIN_COUNTS[2]  # no view without a label
    every = [np.concatenate([expected[e][i] for e in range(E)]) for i in range(3)]
    assert got["train"]["views"] == len(every[0])
    assert got["train"]["teacher_top1"] == pytest.approx(every[2].mean())
    assert got["train"]["mass"]["quantiles"]["0.5"] == pytest.approx(np.median(every[0]), rel=1e-5)
    low = (every[0] < 0.9).mean()
    assert low > 0.05  # the fixture's K=3 of 5 loses mass: the verdict must say so
    assert got["k"]["enough"] is False
    assert got["k"]["below_threshold"] == pytest.approx(low)
    assert f"{100 * low:.1f}% of views keep less than 0.9" in got["k"]["message"]
    assert "consider a larger cache.top_k" in got["k"]["message"]


def test_val_statistics_equal_an_independent_computation(synthetic_cache):
    got = compute(synthetic_cache)
    raw = zarr.open_group(synthetic_cache, mode="r")
    top1, labels = raw["val"]["topk_ids"][0, :, 0].astype(int), raw["val"]["labels"][0]
    assert got["val"]["samples"] == 8
    assert got["val"]["teacher_top1"] == pytest.approx(np.mean(top1 == labels))
    per_class = [np.mean(top1[labels == c] == c) for c in range(C)]
    assert got["val"]["per_class"]["samples"] == [2, 1, 2, 1, 2]
    assert got["val"]["per_class"]["teacher_top1"] == pytest.approx(per_class)
    table = got["disagreement"]
    assert table["labels"] == ["ground truth", "teacher"]
    assert table["matrix"][0][1] == table["matrix"][1][0] == pytest.approx(np.mean(top1 != labels))


def _predictions_run(path, synthetic_cache, seed=1):
    """A run directory with a val_predictions.npz of random predictions; returns them."""
    rng = np.random.default_rng(seed)
    preds = {head: rng.integers(0, C, size=(1, VAL_COUNTS[0])) for head in HEADS}
    path.mkdir(parents=True)
    np.savez(path / "val_predictions.npz", **preds)
    return preds


def test_runs_per_class_agreement_and_table_4(synthetic_cache, tmp_path):
    a = _predictions_run(tmp_path / "a", synthetic_cache, seed=1)
    b = _predictions_run(tmp_path / "b", synthetic_cache, seed=2)
    got = compute(synthetic_cache, [tmp_path / "a", tmp_path / "b"])
    raw = zarr.open_group(synthetic_cache, mode="r")
    teacher, labels = raw["val"]["topk_ids"][0, :, 0].astype(int), raw["val"]["labels"][0]
    named = {"ground truth": labels, "teacher": teacher}
    for name, preds in (("a", a), ("b", b)):
        run = got["runs"][name]
        assert run["source"] == "val_predictions.npz" and run["samples"] == 8
        for head in HEADS:
            p = preds[head][0]
            named[f"{name} {head}"] = p
            assert run["top1"][head] == pytest.approx(np.mean(p == labels))
            assert run["agree"][head] == pytest.approx(np.mean(p == teacher))
            assert run["per_class_agree"][head] == pytest.approx([np.mean(p[labels == c] == teacher[labels == c])
                                                                   for c in range(C)])
    table = got["disagreement"]
    assert table["labels"] == list(named)
    expected = [[np.mean(named[r] != named[c]) for c in named] for r in named]
    np.testing.assert_allclose(table["matrix"], expected)
    text = format_table(got)
    assert "run 1: a" in text and "run 2: b" in text and "DeiT Table 4" in text
    assert "complete units used: train 5/6, val 1/1" in text


def test_a_sweep_directory_stands_for_its_runs(synthetic_cache, tmp_path):
    for name in ("x", "y"):
        _predictions_run(tmp_path / "sweep" / name, synthetic_cache)
        (tmp_path / "sweep" / name / "result.json").write_text(json.dumps({"cache_fingerprint": "f" * 16}))
    assert list(compute(synthetic_cache, [tmp_path / "sweep"])["runs"]) == ["x", "y"]


# --------------------------------------------------------------------------------------------- a trained run


def test_run_predictions_from_its_checkpoint_give_its_result(tiny_cache, tmp_path):
    """Predictions evaluated here from the checkpoint reproduce what training measured (pipeline.evaluate)."""
    result = train(tiny_cache.manifest("student.epochs=1", "student.verify_sample=0", run_dir=tmp_path / "run"),
                   progress=False)
    got = compute(str(tiny_cache.cache_path), [tmp_path / "run"])
    run = got["runs"]["run"]
    assert run["source"] == "last.pth" and run["samples"] == result["samples"] == 20
    for head in HEADS:
        assert run["top1"][head] == pytest.approx(result[f"top1_{head}"])
        assert run["agree"][head] == pytest.approx(result[f"agree_{head}"])
    assert got["val"]["teacher_top1"] == pytest.approx(result["teacher_top1"])
    table = dict(zip(got["disagreement"]["labels"], got["disagreement"]["matrix"]))
    assert table["ground truth"][1] == pytest.approx(1 - result["teacher_top1"])
    assert table["ground truth"][4] == pytest.approx(1 - result["top1_joint"])
    assert table["teacher"][2] == pytest.approx(1 - result["agree_class"])
    assert got["train"]["views"] == 2 * (98 - 1)  # two cached epochs of the tiny shards, less the bad sample


# --------------------------------------------------------------------------------------------- errors


def test_run_errors_name_the_directory_and_the_fix(synthetic_cache, tmp_path):
    with pytest.raises(StatsError, match=r"run directory .*nowhere does not exist: pass --run with a student run_dir"):
        compute(synthetic_cache, [tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(StatsError, match=r"empty holds no result.json \(and no run directories with one\): finish "
                                         r"the run with `distill train-student`"):
        compute(synthetic_cache, [tmp_path / "empty"])
    other = tmp_path / "other"
    other.mkdir()
    (other / "result.json").write_text(json.dumps({"cache_fingerprint": "0123456789abcdef"}))
    with pytest.raises(StatsError, match=r"other was trained from a cache with fingerprint 0123456789abcdef, not from "
                                         r".*cache \(fingerprint ffffffffffffffff\): pass the run's own cache"):
        compute(synthetic_cache, [other])
    (other / "result.json").write_text(json.dumps({"cache_fingerprint": "f" * 16}))
    with pytest.raises(StatsError, match=r"other has a result.json but no last.pth to evaluate"):
        compute(synthetic_cache, [other])
    (other / "result.json").write_text(json.dumps({"cache_fingerprint": "f" * 16, "config": {"bogus": 1}}))
    (other / "last.pth").write_bytes(b"")
    with pytest.raises(StatsError, match=r"result.json: its config is not a valid run spec any more \(unknown key "
                                         r"bogus.*\); write the run's val_predictions.npz"):
        compute(synthetic_cache, [other])
    bad = tmp_path / "bad"
    bad.mkdir()
    np.savez(bad / "val_predictions.npz", **{h: np.zeros((1, 5), int) for h in HEADS})
    with pytest.raises(StatsError, match=r"val_predictions.npz: array 'class' has shape \(1, 5\) but the cache .* has "
                                         r"\(1, 8\) val \(shards, positions\)"):
        compute(synthetic_cache, [bad])
    np.savez(bad / "val_predictions.npz", cls=np.zeros((1, 8), int))
    with pytest.raises(StatsError, match=r"val_predictions.npz lacks the arrays \['class', 'dist', 'joint'\]"):
        compute(synthetic_cache, [bad])


def test_cli_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(stats_command, ["--cache", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert "no teacher cache at" in result.output and "run `make teacher-cache` first" in result.output
    result = runner.invoke(stats_command, ["--cache", "s3://bucket/cache"])
    assert result.exit_code == 2 and "is not a local directory: pass --out" in result.output
    result = runner.invoke(stats_command, ["--manifest", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "missing.yaml does not exist" in result.output


# --------------------------------------------------------------------------------------------- output and plots


def test_cli_writes_json_and_readable_pngs(synthetic_cache, tmp_path):
    _predictions_run(tmp_path / "run", synthetic_cache)
    out = tmp_path / "out"
    result = CliRunner().invoke(stats_command, ["--cache", synthetic_cache, "--run", str(tmp_path / "run"),
                                                "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "teacher on cached views" in result.output and "disagreement on val" in result.output
    written = json.loads((out / "stats.json").read_text())
    assert written == json.loads(json.dumps(compute(synthetic_cache, [tmp_path / "run"])))
    for name in plots.PLOTS:
        with Image.open(out / f"{name}.png") as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 200


def test_every_plot_has_a_title_and_labelled_axes(synthetic_cache, tmp_path):
    _predictions_run(tmp_path / "run", synthetic_cache)
    stats = compute(synthetic_cache, [tmp_path / "run"])
    many = json.loads(json.dumps(stats))  # the per-class plot switches to a histogram for many classes
    many["cache"]["classes"] = [str(c) for c in range(60)]
    many["val"]["per_class"]["teacher_top1"] = np.linspace(0, 1, 60).tolist()
    many["runs"]["run"]["per_class_agree"]["joint"] = [None] + np.linspace(1, 0, 59).tolist()
    figures = [draw(stats) for draw in plots.PLOTS.values()] + [plots.per_class(many)]
    for fig in figures:
        assert isinstance(fig, Figure)
        ax = fig.axes[0]
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    assert "by epoch" in figures[0].axes[0].get_title() and "mass" in figures[0].axes[0].get_title()
    assert "entropy" in figures[1].axes[0].get_title().lower()
    assert "Table 4" in figures[3].axes[0].get_title()
    assert [t.get_text() for t in figures[3].axes[0].get_yticklabels()] == stats["disagreement"]["labels"]


def test_incomplete_val_is_left_out(synthetic_cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(synthetic_cache, copy)
    zarr.open_group(str(copy), mode="r+")["val"]["done"][0] = 0
    got = compute(str(copy))
    assert got["cache"]["units"]["val"] == {"done": 0, "total": 1}
    assert got["val"]["samples"] == 0 and got["val"]["teacher_top1"] is None
    assert "val 0/1" in format_table(got)


def _files(root):
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def test_outputs_go_next_to_the_cache_and_leave_its_size_alone(synthetic_cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(synthetic_cache, copy)
    before, size = _files(copy), cache.disk_usage(str(copy))
    result = CliRunner().invoke(stats_command, ["--cache", str(copy)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cache-stats" / "stats.json").is_file() and (tmp_path / "cache-stats" / "mass.png").is_file()
    assert f"in {tmp_path / 'cache-stats'}" in result.output
    assert _files(copy) == before and cache.disk_usage(str(copy)) == size


class _Planted:
    """Unpickling this touches a marker file: what an attacker's checkpoint would do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def test_a_pickle_planted_as_a_checkpoint_is_not_executed(tiny_cache, tmp_path):
    from pipeline.manifest import to_dict

    run = tmp_path / "run"
    run.mkdir()
    m = tiny_cache.manifest(run_dir=run)
    (run / "result.json").write_text(json.dumps({"cache_fingerprint": tiny_cache.open().attrs["fingerprint"],
                                                 "config": to_dict(m)}))
    marker = tmp_path / "pwned"
    torch.save({"model": _Planted(marker)}, run / "last.pth")
    with pytest.raises(StatsError, match=r"last.pth holds more than tensors and plain data, so it was not loaded"):
        compute(str(tiny_cache.cache_path), [run])
    assert not marker.exists()
    torch.load(run / "last.pth", weights_only=False)  # the plant is real: a plain load runs it
    assert marker.exists()


def test_a_bar_over_the_complete_units_on_a_terminal_only(synthetic_cache, monkeypatch):
    for stream, progress, shown in ((Terminal(), True, True), (Terminal(), False, False), (io.StringIO(), True, False)):
        monkeypatch.setattr(sys, "stderr", stream)
        compute(synthetic_cache, progress=progress)
        assert ("stats: 100%" in stream.getvalue() and "6/6" in stream.getvalue()) is shown  # 5 train + 1 val units
