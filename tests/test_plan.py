"""`distill plan` against a cache the test writes: the predicted bytes on disk (per split and in all, every
chunk file's allocated blocks as `du` counts them) within 10%, and the views, forwards and epochs exact."""

from pathlib import Path

from click.testing import CliRunner

from fault_script import tiny_overrides
from pipeline.cli import main
from pipeline.manifest_loader import load
from pipeline.plan import format_plan, make_plan
from pipeline.shards import load_shardlist
from pipeline.teacher_cache import run as fill_cache

TINY = "manifests/tiny.yaml"


def _disk(path: Path) -> int:
    """Allocated bytes of the cache's chunk files (metadata and directories are not planned)."""
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file() and "/c/" in str(f))


def test_plan_predicts_the_cache_a_run_writes(tmp_path):
    overrides = tiny_overrides(tmp_path) + [f"cache.path={tmp_path / 'cache'}", "cache.top_k=4",
                                            "cache.shards_per_unit=2"]
    m = load(TINY, overrides)
    plan = make_plan(m, time_teacher=False)
    samples = {split: sum(s.samples for s in load_shardlist(path).shards)
               for split, path in (("train", m.data.train), ("val", m.data.val))}
    assert plan.train_views == m.cache.epochs * samples["train"] and plan.val_views == samples["val"]
    assert plan.teacher_forwards == plan.train_views + plan.val_views
    fill_cache(m, progress=False)
    written = _disk(tmp_path / "cache")
    assert abs(plan.total_bytes / written - 1) < 0.10, (plan.total_bytes, written)
    for split in ("train", "val"):
        planned = sum(v for k, v in plan.bytes_by_array.items() if k.startswith(f"{split}/"))
        assert abs(planned / _disk(tmp_path / "cache" / split) - 1) < 0.10, split
    text = format_plan(m, plan)
    assert f"views to cache: {plan.train_views:,} train (2 epoch(s)), {plan.val_views:,} val" in text
    assert "student: 2 epoch(s) over 2 cached: 1.00 student epochs per cached epoch" in text


def test_plan_command_times_the_teacher_and_prints_the_budget(tmp_path):
    sets = [a for o in tiny_overrides(tmp_path) + [f"cache.path={tmp_path / 'cache'}"] for a in ("--set", o)]
    result = CliRunner().invoke(main, ["plan", "--manifest", TINY, *sets])
    assert result.exit_code == 0, result.output
    assert "teacher-hours" in result.output and "ms per view on cpu (measured" in result.output
    assert "train/topk_logratios" in result.output and "total" in result.output
    assert not (tmp_path / "cache").exists()  # nothing computed, nothing written


def test_plan_names_the_shards_per_unit_that_stops_small_chunks_wasting_blocks(tmp_path):
    m = load(TINY, tiny_overrides(tmp_path) + [f"cache.path={tmp_path / 'cache'}", "cache.shards_per_unit=1"])
    plan = make_plan(m, time_teacher=False)
    assert 1 - plan.compressed_bytes / plan.total_bytes > 0.2  # tiny shards: every chunk is far under a block
    text = format_plan(m, plan)
    if plan.better_shards_per_unit is None:
        assert "use bigger shards" in text
    else:
        assert f"set cache.shards_per_unit={plan.better_shards_per_unit}" in text
        better = make_plan(load(TINY, tiny_overrides(tmp_path) + [f"cache.path={tmp_path / 'cache'}",
                                 f"cache.shards_per_unit={plan.better_shards_per_unit}"]), time_teacher=False)
        assert better.total_bytes < plan.total_bytes
