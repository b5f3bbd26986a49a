"""The `distill` command line: one click group; each subcommand lives in its stage module under `stages/`
and is imported only when it runs, so `distill --help` stays instant."""

from __future__ import annotations

import functools
import importlib

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
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


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
        from pipeline.manifest import ManifestError, load

        try:
            m = load(manifest_path, overrides)
        except ManifestError as e:
            raise click.UsageError(str(e)) from None
        try:
            return fn(m=m, **kwargs)
        except user_errors() as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions whose message already says what is wrong and what to do."""
    from pipeline.cache import CacheError
    from pipeline.lock import WriterLockError
    from pipeline.manifest import ManifestError
    from pipeline.reader import ShardError
    from pipeline.teacher import TeacherError
    from pipeline.train import NonFiniteLossError

    return CacheError, WriterLockError, ManifestError, ShardError, TeacherError, NonFiniteLossError
