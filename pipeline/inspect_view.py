"""One cached training view, replayed: the exact pixels the teacher saw, its parameters, the teacher's top-K.

The view is re-rendered with `views.render` from its stored parameters and its mix partner's (read from the
same shard), under the view recipe stored in the cache itself, at the cache's teacher size; its digest is
compared with the stored one, so the user knows whether the picture is the teacher's input bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import cache, views
from pipeline.manifest import ViewsCfg, from_dict
from pipeline.reader import read_shard
from pipeline.shards import ShardList


@dataclass(frozen=True, slots=True)
class InspectedView:
    epoch: int
    shard: int
    pos: int
    key: str
    label: str  # class name of the sample's own label
    params: dict  # views.describe of the stored parameters
    partner_key: str | None  # the mix partner's key (None when the view is not mixed)
    teacher_view: np.ndarray  # uint8 [teacher size, teacher size, 3]
    student_view: np.ndarray | None  # the same view at the student's size, when that differs
    stored_digest: int
    replayed_digest: int
    topk: list[tuple[int, str, float, float]]  # (class id, class name, log-probability, probability)

    @property
    def digest_matches(self) -> bool:
        return self.stored_digest == self.replayed_digest


def cached_recipe(root) -> ViewsCfg:
    """The view recipe the cache was filled under (from its attributes, not from any manifest)."""
    return from_dict({"views": root.attrs["recipe"]["config"]}).views


def check_shard(root, shardlist: ShardList, shard: int) -> None:
    """The shard list must hold, at index `shard`, the very shard the cache was built from."""
    cached = root.attrs["shards"]["train"]
    if not 0 <= shard < len(cached):
        raise IndexError(f"shard {shard} is outside the cache's {len(cached)} train shards (0..{len(cached) - 1})")
    have = shardlist.shards[shard] if shard < len(shardlist.shards) else None
    if have is None or [Path(have.url).name, have.samples, have.sha256] != list(cached[shard]):
        found = ("nothing" if have is None else
                 f"{Path(have.url).name} ({have.samples} samples, sha256 {have.sha256[:12]})")
        raise cache.CacheError(
            f"train shard {shard} of {shardlist.path} is {found}, but the cache was built from {cached[shard][0]} "
            f"({cached[shard][1]} samples, sha256 {cached[shard][2][:12]}): pass the manifest whose data.train the "
            f"cache was built from")


def inspect(root, shardlist: ShardList, epoch: int, shard: int, pos: int,
            student_size: int | None = None) -> InspectedView:
    """Replay the view of (cache epoch, shard, position) and collect what the teacher said about it."""
    layout = cache.layout_of(root, "train")
    if not 0 <= epoch < layout.epochs:
        raise IndexError(f"epoch {epoch} is outside the cache's {layout.epochs} epochs (0..{layout.epochs - 1})")
    check_shard(root, shardlist, shard)
    samples_in_shard = shardlist.shards[shard].samples
    if not 0 <= pos < samples_in_shard:
        raise IndexError(f"position {pos} is outside train shard {shard} ({samples_in_shard} samples, "
                         f"positions 0..{samples_in_shard - 1})")
    slab = cache.read_slab(root, "train", epoch, shard)
    if slab["digest"][pos] == 0:
        raise cache.CacheError(f"cache epoch {epoch}, shard {shard}, position {pos} holds no view: the sample was "
                               f"skipped as bad when the cache was filled (data.on_error=skip); pick another position")
    cfg = cached_recipe(root)
    params = slab["view"][pos]
    partner, _ = views.mix_target(params)
    samples = {s.pos: s for s in read_shard(shardlist, shard, start=min(pos, partner), stop=max(pos, partner) + 1)
               if s.pos in (pos, partner)}
    if partner not in samples:
        partner = pos  # skipped partner: stage 1 mixed the view with itself

    def render(size: int) -> np.ndarray:
        return views.render(samples[pos].image, params, size, cfg, partner_image=samples[partner].image,
                            partner_params=slab["view"][partner])

    teacher_size = int(root.attrs["teacher_size"])
    teacher_view = render(teacher_size)
    classes = root.attrs["classes"]
    topk = [(int(i), classes[int(i)], float(lp), float(np.exp(np.float32(lp))))
            for i, lp in zip(slab["topk_ids"][pos], slab["topk_logprobs"][pos])]
    return InspectedView(
        epoch=epoch, shard=shard, pos=pos, key=samples[pos].key, label=classes[samples[pos].label],
        params=views.describe(params), partner_key=samples[partner].key if partner != pos else None,
        teacher_view=teacher_view,
        student_view=render(student_size) if student_size not in (None, teacher_size) else None,
        stored_digest=int(slab["digest"][pos]), replayed_digest=views.view_digest(teacher_view) or 1,
        topk=topk)


def write_pngs(view: InspectedView, out_dir: str | Path) -> list[Path]:
    """The view's exact pixels as PNG (lossless): at the teacher's size, and at the student's if rendered."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"view-e{view.epoch}-s{view.shard}-p{view.pos}"
    paths = []
    for who, pixels in (("teacher", view.teacher_view), ("student", view.student_view)):
        if pixels is None:
            continue
        path = out_dir / f"{stem}-{who}-{pixels.shape[0]}px.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths
