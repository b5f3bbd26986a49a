"""`distill shards` (build WebDataset shards) and `distill shardlist` (list shards made by any tool)."""

from pathlib import Path

import click

from pipeline.manifest import ManifestError
from pipeline.manifest_loader import load

# pipeline.shards and pipeline.reader (webdataset, so torch) are imported inside the commands: --help stays instant


def _summary(path: Path) -> str:
    from pipeline.shards import load_shardlist

    shardlist = load_shardlist(path)
    count = len(shardlist.shards)
    return (f"{shardlist.num_samples} samples in {count} shard{'s' * (count != 1)}, "
            f"{len(shardlist.classes)} classes -> {path}")


@click.command()
@click.option("--manifest", default="manifests/demo.yaml", show_default=True,
              help="Run spec; without --src its data section says what to build (data.builtin, data.shard_size).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a manifest key.")
@click.option("--src", type=click.Path(exists=True, file_okay=False),
              help="An ImageFolder tree (src/<class>/<image>) to shard instead of the built-in data.")
@click.option("--out", type=click.Path(file_okay=False), help="Output directory for --src.")
@click.option("--shard-size", type=click.IntRange(min=1), default=None,
              help="Samples per shard [default: 1000 with --src, else data.shard_size].")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the global shuffle (--src) or of the built-in train/val split.")
@click.option("--class-map", type=click.Path(exists=True, dir_okay=False),
              help='With --src: JSON class names ({"classes": [...]}) giving the ids, for a tree holding some of them.')
@click.option("--if-missing", is_flag=True,
              help="Only make sure data.train and data.val exist: build the built-in data if they do not, say how "
                   "to list your own shards otherwise (the Makefile's prerequisite step).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="A progress bar on a terminal.")
def shards(manifest, overrides, src, out, shard_size, seed, class_map, if_missing, progress):
    """Build WebDataset shards, a shard list and a class map."""
    from pipeline.builtin_data import write_builtin
    from pipeline.cli import with_make_args
    from pipeline.fashion_mnist import FashionMNISTError
    from pipeline.reader import ShardError
    from pipeline.shards import load_class_map, write_imagefolder

    try:
        if if_missing and src is None:
            spec = load(manifest, overrides)
            missing = [f"data.{key}={path}" for key, path in (("train", spec.data.train), ("val", spec.data.val))
                       if not Path(path).is_file()]
            if not missing:
                click.echo(f"shards: {spec.data.train} and {spec.data.val} exist")
                return
            if spec.data.builtin == "none":
                raise click.ClickException(with_make_args(
                    f"{' and '.join(missing)} do not exist and data.builtin is none: build them with "
                    f"`make shards SRC=/imagefolder OUT=dir` or list shards made elsewhere with "
                    f"`make shardlist SHARDS='dir/*.tar'`, then point data.train/data.val at the shardlist.json "
                    f"files", manifest, overrides))
        if src is not None:
            if out is None:
                raise click.UsageError("--src needs --out: the directory to write the shards to")
            classes = load_class_map(class_map) if class_map else None
            click.echo(_summary(write_imagefolder(src, out, shard_size or 1000, seed, classes, progress)))
            return
        spec = load(manifest, overrides)
        if spec.data.builtin == "none":
            raise click.UsageError(f"{manifest}: data.builtin is {spec.data.builtin!r}, so there is nothing built in "
                                   f"to build: pass --src/--out, or list your own shards with `distill shardlist`")
        for path in write_builtin(spec.data, shard_size, seed):
            click.echo(_summary(path))
    except (ShardError, ManifestError, FashionMNISTError, ValueError) as e:
        raise click.ClickException(with_make_args(str(e), manifest, overrides)) from None


@click.command()
@click.argument("patterns", nargs=-1, required=True)
@click.option("--out", type=click.Path(dir_okay=False),
              help="Where to write the list [default: shardlist.json in the shards' common directory].")
@click.option("--class-map", type=click.Path(exists=True, dir_okay=False),
              help='JSON class names ({"classes": [...]}); default: "0".."<largest cls>".')
def shardlist(patterns, out, class_map):
    """Scan shards made by any tool (paths, globs, brace ranges) into a shard list."""
    from pipeline.reader import ShardError
    from pipeline.shards import SHARDLIST_NAME, build_shardlist, expand_shard_paths, load_class_map

    try:
        paths = expand_shard_paths(patterns)
        if out is None:
            parents = {str(Path(p).resolve().parent) for p in paths}
            if len(parents) > 1:
                raise click.UsageError("the shards lie in several directories: say where the list goes with --out")
            out = Path(parents.pop()) / SHARDLIST_NAME
        build_shardlist(paths, out, load_class_map(class_map) if class_map else None)
        click.echo(_summary(Path(out)))
    except ShardError as e:
        raise click.ClickException(str(e)) from None
