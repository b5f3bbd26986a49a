"""The `distill` command line: its help is instant because neither the group's nor any subcommand's `--help`
imports torch (checked in a fresh interpreter), and what the help shows agrees with the code behind it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import click
from click.testing import CliRunner

from pipeline.cli import COMMANDS, SUMMARIES, main

ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter: the group's help, then each subcommand's, noting after each whether torch (or
# anything heavy) got imported and what was printed.
PROBE = """
import json, sys
from click.testing import CliRunner
from pipeline.cli import COMMANDS, main
report = {}
for argv in [["--help"]] + [[name, "--help"] for name in sorted(COMMANDS)]:
    result = CliRunner().invoke(main, argv)
    report[" ".join(argv)] = {"exit_code": result.exit_code, "output": result.output,
                              "heavy": sorted(m for m in ("torch", "timm", "zarr", "webdataset") if m in sys.modules)}
print(json.dumps(report))
"""


def _probe() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def test_help_of_the_group_and_every_subcommand_imports_no_torch():
    report = _probe()
    assert set(report) == {"--help"} | {f"{name} --help" for name in COMMANDS}
    for argv, got in report.items():
        assert got["exit_code"] == 0, (argv, got["output"])
        assert got["heavy"] == [], f"`distill {argv}` imported {got['heavy']}: import them inside the command"
        assert got["output"].startswith("Usage: "), argv
    group = report["--help"]["output"]
    for name in COMMANDS:  # every command is listed with its summary, read without importing its module
        assert f"  {name}" in group
        assert " ".join(SUMMARIES[name].split()[:3]) in group
    assert "--manifest" in report["train-student --help"]["output"]
    assert "--max-top1-disagreement" in report["verify-cache --help"]["output"]


def test_every_command_has_a_summary_and_each_names_its_command():
    assert set(SUMMARIES) == set(COMMANDS)
    for name, target in COMMANDS.items():
        command = main.get_command(click.Context(main), name)
        assert isinstance(command, click.Command) and command.name == name, target
        assert SUMMARIES[name].endswith(".") and len(SUMMARIES[name]) <= 70


def test_defaults_spelled_out_for_a_fast_help_equal_the_libraries():
    from benchmarks import run as bench
    from pipeline import verify
    from stages import bench as bench_stage
    from stages.verify_cache import verify_cache

    assert bench_stage.SECTIONS == bench.SECTIONS
    thresholds = verify.Thresholds()
    lazy = [p for p in verify_cache.params if callable(p.default)]
    assert {p.name for p in lazy} == {"max_digest_mismatches", "max_top1_disagreement", "max_prob_error",
                                       "max_leftover_error", "max_kl"}
    for param in lazy:
        assert param.default() == getattr(thresholds, param.name)
        assert float(param.show_default) == getattr(thresholds, param.name), param.name


def test_python_dash_m_runs_the_cli():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True)
    assert "teacher-cache" in out.stdout


def test_the_readmes_fault_script_command_needs_no_work_directory(monkeypatch, tmp_path, capsys):
    """`python tests/fault_script.py --kills 20` (README): the scratch directory defaults to a new temporary one.
    The faults themselves are tested in test_faults.py; here only what the command line hands them."""
    import fault_script

    monkeypatch.setattr(fault_script.tempfile, "tempdir", str(tmp_path))
    seen = {}
    monkeypatch.setattr(fault_script, "run_faults", lambda *args: seen.setdefault("args", args) and {"ok": True})
    assert fault_script.main(["--kills", "20"]) == 0
    manifest, overrides, work, kills = seen["args"][:4]
    assert work.parent == tmp_path and work.name.startswith("fault-script-") and work.is_dir()
    assert kills == 20 and f"data.train={work}" in " ".join(overrides)
    assert f"scratch directory: {work}" in capsys.readouterr().err


def test_suggested_make_commands_keep_the_users_manifest_and_overrides():
    from pipeline.cli import with_make_args

    message = "no teacher cache at x: run `make teacher-cache` first (or `make shardlist SHARDS=a`)"
    assert with_make_args(message, "manifests/demo.yaml") == message  # the Makefile's default: nothing to add
    assert with_make_args(message, "mine.yaml", ("cache.path=c", "cache.top_k=5")) == (
        "no teacher cache at x: run `make teacher-cache MANIFEST=mine.yaml SET='cache.path=c cache.top_k=5'` first "
        "(or `make shardlist SHARDS=a MANIFEST=mine.yaml SET='cache.path=c cache.top_k=5'`)")
    already = "run `make teacher-cache MANIFEST=x.yaml`"
    assert with_make_args(already, "mine.yaml") == already
    result = CliRunner().invoke(main, ["stats", "--manifest", "manifests/tiny.yaml", "--set", "cache.path=/nowhere"])
    assert result.exit_code == 1
    assert "run `make teacher-cache MANIFEST=manifests/tiny.yaml SET=cache.path=/nowhere` first" in result.output
