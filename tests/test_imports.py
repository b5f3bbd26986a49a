"""The library's data flow runs one way: shards -> views -> teacher -> cache -> student. Read from the source of
every `pipeline/*.py` (module-level, function-level and TYPE_CHECKING imports alike), no two modules import each
other through any path, the run spec's dataclasses need none of the modules they configure, and nothing of
stage 2 reaches the stage that fills the cache."""

import ast
from pathlib import Path

import pytest

PIPELINE = Path(__file__).resolve().parent.parent / "pipeline"
MODULES = sorted(p.stem for p in PIPELINE.glob("*.py") if p.stem != "__init__")

# stage 2 and what reads its runs: the student trains from the cache alone
STAGE_2 = ("train", "student_data", "student", "evaluate", "checkpoint", "run_log", "sweep", "heldout", "stats")


def imports_in(source: str) -> set[str]:
    """The pipeline modules that `source` imports anywhere: at module level, in functions, under TYPE_CHECKING."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pipeline.")}
        elif isinstance(node, ast.ImportFrom):
            if (node.level, node.module) in ((0, "pipeline"), (1, None)):
                found |= {a.name for a in node.names}  # from pipeline import cache, views
            elif node.level == 0 and (node.module or "").startswith("pipeline."):
                found.add(node.module.split(".")[1])
            elif node.level == 1:
                found.add(node.module.split(".")[0])
    return found & set(MODULES)


GRAPH = {module: imports_in((PIPELINE / f"{module}.py").read_text()) - {module} for module in MODULES}


def reachable(start: str) -> dict[str, list[str]]:
    """Every module `start` imports directly or through others, with the shortest import path to it."""
    paths, frontier = {}, [[start]]
    while frontier:
        path = frontier.pop(0)
        for nxt in sorted(GRAPH[path[-1]]):
            if nxt not in paths:
                paths[nxt] = path + [nxt]
                frontier.append(path + [nxt])
    return paths


def test_every_kind_of_import_is_seen():
    source = """
from __future__ import annotations
import json
from typing import TYPE_CHECKING
import pipeline.cache
from pipeline import views, not_a_module
from pipeline.reader import read_shard
from .shards import load_shardlist
if TYPE_CHECKING:
    from pipeline.manifest import Manifest
def later():
    from pipeline import storage
    import pipeline.teacher_cache as tc
"""
    assert imports_in(source) == {"cache", "views", "reader", "shards", "manifest", "storage", "teacher_cache"}
    assert "cache" in GRAPH["train"] and "views" in GRAPH["cache"]


def test_no_two_modules_import_each_other():
    circles = sorted({frozenset(path): " -> ".join(path) for m in MODULES if (path := reachable(m).get(m))}.values())
    assert not circles, "import circles (break them so the data flows one way):\n" + "\n".join(circles)


def test_the_run_spec_dataclasses_need_none_of_the_modules_they_configure():
    assert GRAPH["manifest"] == set(), f"pipeline/manifest.py imports {sorted(GRAPH['manifest'])}"


@pytest.mark.parametrize("module", STAGE_2)
def test_stage_2_never_reaches_the_stage_that_fills_the_cache(module):
    path = reachable(module).get("teacher_cache")
    assert path is None, f"{' -> '.join(path)}: stage 2 must depend on the cache format (pipeline.cache), not on stage 1"


def test_scanning_and_reading_a_shard_sit_below_the_shard_lists():
    assert "shards" not in reachable("reader") and "reader" in GRAPH["shards"]
