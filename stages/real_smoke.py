"""`distill real-smoke`: DeiT's ImageNet recipe end to end at 224 px and 1000 classes on generated photos
(see pipeline/real_smoke.py); writes <out>/summary.json."""

import json

import click


@click.command("real-smoke")
@click.option("--out", default="runs/real-smoke", show_default=True, type=click.Path(file_okay=False),
              help="Where the photos, shards, teacher checkpoint, cache, student and summary.json go (an earlier "
                   "smoke run's are removed first).")
@click.option("--manifest", default="manifests/real_smoke.yaml", show_default=True, type=click.Path(dir_okay=False),
              help="The recipe (its data, checkpoint, cache and run paths are put under --out).")
@click.option("--progress/--no-progress", default=False, show_default=True)
def real_smoke(out, manifest, progress):
    """shards --src -> teacher-cache -> train-student -> verify-cache -> stats with regnety_160 (random weights
    in timm's checkpoint layout) and a full-size DeiT-Ti, on a few photos per class over 50 of 1000 classes."""
    from pipeline.real_smoke import SmokeError, run

    try:
        summary = run(out, manifest, progress)
    except SmokeError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(summary, indent=2))
