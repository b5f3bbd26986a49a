"""The `distill` command line: one click group; each subcommand lives in its stage module under `stages/`
and is imported only when it runs, so `distill --help` stays instant."""

from __future__ import annotations

import functools
import importlib
import re
import shlex

import click

# subcommand -> "module:attribute" of a click.Command
COMMANDS = {
    "shards": "stages.shards:shards",
    "shardlist": "stages.shards:shardlist",
    "teacher": "stages.teacher:teacher",
    "teacher-cache": "stages.teacher_cache:teacher_cache",
    "train-student": "stages.train_student:train_student",
    "sweep": "stages.sweep:sweep",
    "stats": "stages.stats:stats",
    "inspect-view": "stages.inspect_view:inspect_view",
    "verify-cache": "stages.verify_cache:verify_cache",
    "plan": "stages.plan:plan",
    "bench": "stages.bench:bench",
    "demo": "stages.demo:demo",
    "real-smoke": "stages.real_smoke:real_smoke",
}


# subcommand -> the one-line summary `distill --help` lists, so that listing imports no stage module (no torch)
SUMMARIES = {
    "shards": "Build WebDataset shards, a shard list and a class map.",
    "shardlist": "Scan shards made by any tool into a shard list.",
    "teacher": "Train the small demo teacher into teacher.checkpoint.",
    "plan": "Views, bytes on disk and teacher-hours of a manifest, before any work.",
    "teacher-cache": "Stage 1: fill, resume or extend the teacher cache.",
    "train-student": "Stage 2: train a distilled ViT from the cache.",
    "sweep": "Train a grid of students against one read-only cache.",
    "stats": "Teacher agreement statistics of a cache and its student runs.",
    "inspect-view": "Replay one cached view: PNGs, a figure, its parameters and top-K.",
    "verify-cache": "Recompute the teacher on a sample of cached views.",
    "bench": "Speed ratios and storage cost; writes BENCHMARKS.md.",
    "demo": "The whole pipeline on the embedded default, end to end.",
    "real-smoke": "DeiT's ImageNet recipe end to end at real sizes on the CPU.",
}


class LazyGroup(click.Group):
    """Imports a subcommand's stage module only when that subcommand runs or prints its own --help."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, SUMMARIES.get(name) or self.get_command(ctx, name).get_short_help_str())
                for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Distil DeiT students from a cached teacher: shards -> teacher -> teacher-cache -> train-student."""


def manifest_options(fn):
    """`--manifest PATH` and repeatable `--set key.path=value`; the command receives the loaded Manifest
    as `m`. Manifest errors become clean usage errors naming the key; the errors a user can fix (bad input,
    a cache that does not fit, a held lock) print their message without a traceback."""

    @click.option("--manifest", "manifest_path", default="manifests/demo.yaml", show_default=True,
                  type=click.Path(dir_okay=False), help="YAML run spec (see manifests/).")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a manifest field, e.g. --set student.alpha=0.5 (repeatable).")
    @functools.wraps(fn)
    def wrapper(manifest_path, overrides, **kwargs):
        from pipeline.manifest import ManifestError
        from pipeline.manifest_loader import load

        try:
            m = load(manifest_path, overrides)
        except ManifestError as e:
            raise click.UsageError(str(e)) from None
        try:
            return fn(m=m, **kwargs)
        except user_errors() as e:
            raise click.ClickException(with_make_args(str(e), manifest_path, overrides)) from None
        except click.ClickException as e:
            e.message = with_make_args(e.message, manifest_path, overrides)
            raise

    return wrapper


DEFAULT_MANIFEST = "manifests/demo.yaml"


def with_make_args(message: str, manifest_path: str, overrides=()) -> str:
    """Give each `make TARGET ...` the message suggests the MANIFEST= (and SET=) of this command, so the
    suggested command works on the same run spec: the library raising the error does not know them."""
    extra = [] if manifest_path == DEFAULT_MANIFEST else [f"MANIFEST={shlex.quote(str(manifest_path))}"]
    extra += [f"SET={shlex.quote(' '.join(overrides))}"] if overrides else []
    if not extra:
        return message
    return re.sub(r"`make ([a-z][a-z-]*)((?:(?!MANIFEST=)[^`])*)`", lambda g: f"`make {g[1]}{g[2]} {' '.join(extra)}`",
                  message)


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions whose message already says what is wrong and what to do."""
    from pipeline.cache import CacheError
    from pipeline.lock import WriterLockError
    from pipeline.manifest import ManifestError
    from pipeline.reader import ShardError
    from pipeline.teacher import TeacherError
    from pipeline.train import NonFiniteLossError

    return CacheError, WriterLockError, ManifestError, ShardError, TeacherError, NonFiniteLossError


if __name__ == "__main__":
    main()
