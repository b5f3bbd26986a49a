"""`distill inspect-view`: the exact view the teacher saw, as PNG and as a figure, with its parameters and top-K."""

import json
from pathlib import Path

import click

from pipeline.cli import manifest_options
from stages.stats import default_out


@click.command("inspect-view")
@manifest_options
@click.option("--cache", "cache_path", default=None,
              help="Teacher cache directory [default: the manifest's cache.path].")
@click.option("--epoch", type=int, required=True, help="Cache epoch.")
@click.option("--shard", type=int, required=True, help="Train shard index in the shard list.")
@click.option("--pos", type=int, required=True, help="Position of the sample in the shard.")
@click.option("--student-size", type=int, default=None,
              help="Also render at this size [default: the manifest's student.img_size].")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Output directory [default: <cache>-views, next to the cache].")
def inspect_view(m, cache_path, epoch, shard, pos, student_size, out):
    """Replay one cached training view with the stored parameters, write it as PNG (teacher size, and the
    student size if different) and as a figure a person can read (source and partner with their crop boxes,
    erasing and cutmix boxes, the views enlarged, the RandAugment ops, the teacher's top-K), print the
    parameters and the teacher's top-K, and check its digest.
    The shards come from the manifest's data.train; the view recipe from the cache itself."""
    from pipeline import cache
    from pipeline.inspect_view import inspect, write_figure, write_pngs
    from pipeline.shards import data_shardlist

    cache_path = cache_path or m.cache.path
    try:
        root = cache.open_cache(cache_path)
        view = inspect(root, data_shardlist(m, "train"), epoch, shard, pos, student_size or m.student.img_size)
    except (cache.CacheError, IndexError) as e:
        raise click.ClickException(str(e)) from None
    out = Path(out) if out else default_out(cache_path, "views")
    paths = write_pngs(view, out) + [write_figure(view, out, cache_path)]
    partner = f", mixed with {view.partner_key!r}" if view.partner_key else ""
    click.echo(f"view of cache epoch {epoch}, shard {shard}, position {pos}: sample {view.key!r} "
               f"(label {view.label}{partner})")
    click.echo("parameters (boxes are [x0, y0, x1, y1] as fractions of the source image, of the view for erase/mix):")
    for part, value in view.params.items():
        click.echo(f"  {part}: {json.dumps(value)}")
    click.echo(f"teacher top-{len(view.topk)} (log-probability and probability):")
    for rank, (class_id, name, log_p, prob) in enumerate(view.topk, 1):
        click.echo(f"  {rank:2d}. class {class_id:5d} {name[:30]:30} log p {log_p:9.4f}  p {prob:.4f}")
    click.echo(f"  top-{len(view.topk)} mass {sum(p for *_, p in view.topk):.4f}")
    for path in paths:
        click.echo(f"wrote {path}")
    if not view.digest_matches:
        raise click.ClickException(
            f"the replayed view's digest {view.replayed_digest:#018x} differs from the stored "
            f"{view.stored_digest:#018x}: "
            f"the PNG is NOT the view the teacher saw (the view recipe code or the torch/torchvision/timm/Pillow/numpy "
            f"versions changed since the cache was filled; the cache's versions: {root.attrs.get('versions')})")
    click.echo(f"digest {view.stored_digest:#018x} matches the stored one: this is exactly the view the teacher saw")
