"""One cached training view, replayed: the exact pixels the teacher saw, its parameters, the teacher's top-K.

The view is re-rendered with `views.render` from its stored parameters and its mix partner's (read from the
same shard), under the view recipe stored in the cache itself, at the cache's teacher size; its digest is
compared with the stored one, so the user knows whether the picture is the teacher's input bit for bit.
`write_pngs` writes those exact pixels; `figure` draws what a person can read: the source images with their
crop boxes, the erasing and cutmix boxes, the views enlarged without smoothing, the RandAugment ops and the
teacher's top-K probabilities. Parameters are read through `views.describe`, never by field index.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from pipeline import cache, views
from pipeline.manifest import ViewsCfg
from pipeline.manifest_loader import from_dict
from pipeline.reader import ShardList, read_shard


@dataclass(frozen=True, slots=True)
class InspectedView:
    epoch: int
    shard: int
    pos: int
    key: str
    label: str  # class name of the sample's own label
    label_id: int
    partner_label_id: int | None
    params: dict  # views.describe of the stored parameters
    partner_key: str | None  # the mix partner's key (None when the view is not mixed)
    teacher_view: np.ndarray  # uint8 [teacher size, teacher size, 3]
    student_view: np.ndarray | None  # the same view at the student's size, when that differs
    stored_digest: int
    replayed_digest: int
    topk: list[tuple[int, str, float, float]]  # (class id, class name, log-probability, probability)
    source: np.ndarray | None = None  # uint8 [H, W, 3]: the sample's decoded image
    partner_source: np.ndarray | None = None  # the mix partner's decoded image (None when not mixed)
    partner_params: dict | None = None  # views.describe of the partner's own view parameters
    num_classes: int = 0

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
    mixed = partner != pos

    def rgb(image: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(image, dtype=np.uint8)

    return InspectedView(
        epoch=epoch, shard=shard, pos=pos, key=samples[pos].key, label=classes[samples[pos].label],
        label_id=int(samples[pos].label), partner_label_id=int(samples[partner].label) if mixed else None,
        params=views.describe(params), partner_key=samples[partner].key if mixed else None,
        teacher_view=teacher_view,
        student_view=render(student_size) if student_size not in (None, teacher_size) else None,
        stored_digest=int(slab["digest"][pos]), replayed_digest=views.view_digest(teacher_view) or 1,
        topk=topk, source=rgb(samples[pos].image), partner_source=rgb(samples[partner].image) if mixed else None,
        partner_params=views.describe(slab["view"][partner]) if mixed else None, num_classes=len(classes))


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


# --------------------------------------------------------------------------------------------- the figure

CROP, ERASE, CUTMIX, OWN, PARTNER, REST = "#ffd400", "#ff2d2d", "#00e5ff", "#2ca02c", "#ff7f0e", "#9a9a9a"


def _box(ax, box: list[int], scale: float, color: str, style: str = "-", label: str | None = None):
    """Outline a [x0, y0, x1, y1] pixel box drawn `scale` times enlarged (a box of the teacher's view on a view
    of another size; pixel edges sit at -0.5 in imshow's coordinates)."""
    x0, y0, x1, y1 = (v * scale for v in box)
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0,
                           fill=False, edgecolor=color, linewidth=2, linestyle=style, label=label))


def _image(ax, pixels: np.ndarray, title: str) -> None:
    ax.imshow(pixels, interpolation="nearest")  # enlarged pixel for pixel: no smoothing
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _view_panel(ax, pixels: np.ndarray, who: str, params: dict, partner_params: dict | None) -> None:
    size = pixels.shape[0]
    scale = size / params["grid"]  # erasing and cutmix boxes are in pixels of the teacher's view
    _image(ax, pixels, f"{who} view, {size}x{size} px (enlarged, no smoothing)")
    if params["erase"]:
        _box(ax, params["erase"]["box"], scale, ERASE, "--", "erasing box")
    if partner_params and partner_params["erase"]:
        _box(ax, partner_params["erase"]["box"], scale, PARTNER, "--", "the partner's erasing box")
    mix = params["mix"]
    if mix and mix["mode"] == "cutmix":
        _box(ax, mix["box"], scale, CUTMIX, ":", "cutmix box (partner's pixels)")
    if ax.patches:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.01), fontsize=7, frameon=False)


def _parameter_text(view: InspectedView) -> str:
    p = view.params
    crop = p["crop"]
    h, w = view.source.shape[:2]
    lines = [f"crop: box {_fmt(crop['box'])} of the {w}x{h} px source, {crop['interpolation']}",
             f"flip: {'yes (after the crop)' if p['flip'] else 'no'}",
             "RandAugment: " + ("none" if not p["randaugment"] else "")]
    lines += [f"  {op['op']}  magnitude {op['magnitude']:.3g}{'  (negated)' if op['sign'] < 0 else ''}"
              for op in p["randaugment"]]
    erase = p["erase"]
    lines.append(f"erasing: box {_fmt(erase['box'])} of the {p['grid']} px teacher view, noise seed {erase['seed']}" if erase
                 else "erasing: no")
    mix = p["mix"]
    if mix:
        lines.append(f"mix: {mix['mode']} with position {mix['partner']} ({view.partner_key!r}), lam {mix['lam']:.4f}"
                     + (f", box {_fmt(mix['box'])}" if mix["mode"] == "cutmix" else ""))
        lines.append(f"label: {mix['lam']:.3f} x {view.label!r} + {1 - mix['lam']:.3f} x partner's")
    else:
        lines.append(f"mix: no    label: {view.label!r}")
    lines.append("boxes: [x0, y0, x1, y1] as fractions")
    match = "matches the stored digest" if view.digest_matches else "DIFFERS from the stored digest"
    lines.append(f"replayed view {match}")
    return "\n".join(lines)


def _fmt(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in box) + "]"


def _topk_bars(ax, view: InspectedView) -> None:
    ids = [class_id for class_id, *_ in view.topk]
    names = [f"{name} ({class_id})" if name != str(class_id) else name for class_id, name, *_ in view.topk]
    probs = [p for *_, p in view.topk]
    others = view.num_classes - len(probs)
    colors = [OWN if i == view.label_id else PARTNER if i == view.partner_label_id else "#4c72b0" for i in ids]
    if others:  # the leftover mass, spread by the student's loss over the classes outside the top-K
        names.append(f"other {others} classes")
        probs.append(max(0.0, 1.0 - sum(probs)))
        colors.append(REST)
    y = np.arange(len(probs))
    ax.barh(y, probs, color=colors)
    ax.set_yticks(y, [n[:28] for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.08)
    for yi, p in zip(y, probs):
        ax.text(p + 0.01, yi, f"{p:.3f}", va="center", fontsize=7)
    ax.set_xlabel("teacher probability")
    legend = [Rectangle((0, 0), 1, 1, color=OWN, label="the sample's label")]
    if view.partner_label_id is not None:
        legend.append(Rectangle((0, 0), 1, 1, color=PARTNER, label="the partner's label"))
    if others:
        legend.append(Rectangle((0, 0), 1, 1, color=REST, label="mass outside the top-K"))
    ax.legend(handles=legend, fontsize=7, loc="lower right")
    ax.set_title(f"teacher's top-{len(view.topk)} of {view.num_classes} classes (cached)"
                 + (" and the leftover mass" if others else ": every class"), fontsize=9)


def figure(view: InspectedView, cache_name: str) -> Figure:
    """The view explained on one page (see the module docstring)."""
    fig = Figure(figsize=(15, 8.5), layout="constrained")
    grid = fig.add_gridspec(2, 4, height_ratios=[1, 0.9])
    h, w = view.source.shape[:2]
    ax = fig.add_subplot(grid[0, 0])
    _image(ax, view.source, f"source {view.key!r} ({w}x{h} px) and its crop box")
    _box(ax, view.params["crop"]["box"], 1.0, CROP)
    ax = fig.add_subplot(grid[0, 1])
    if view.partner_source is not None:
        ph, pw = view.partner_source.shape[:2]
        _image(ax, view.partner_source, f"mix partner {view.partner_key!r} and its crop box")
        _box(ax, view.partner_params["crop"]["box"], 1.0, CROP)
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "no mix partner\n(this view is not mixed)", ha="center", va="center", fontsize=10)
    _view_panel(fig.add_subplot(grid[0, 2]), view.teacher_view, "teacher", view.params, view.partner_params)
    ax = fig.add_subplot(grid[0, 3])
    if view.student_view is not None:
        _view_panel(ax, view.student_view, "student", view.params, view.partner_params)
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "the student sees the view\nat the teacher's size", ha="center", va="center", fontsize=10)
    ax = fig.add_subplot(grid[1, :2])
    ax.axis("off")
    ax.text(0.0, 1.0, _parameter_text(view), va="top", ha="left", family="monospace", fontsize=9,
            transform=ax.transAxes)
    _topk_bars(fig.add_subplot(grid[1, 2:]), view)
    fig.suptitle(f"cache {cache_name}: epoch {view.epoch}, shard {view.shard}, position {view.pos}, key {view.key!r}"
                 f" (label {view.label!r})", fontsize=11)
    return fig


def write_figure(view: InspectedView, out_dir: str | Path, cache_name: str) -> Path:
    """`figure` as `<out_dir>/view-e<epoch>-s<shard>-p<pos>-figure.png`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"view-e{view.epoch}-s{view.shard}-p{view.pos}-figure.png"
    figure(view, cache_name).savefig(path, dpi=100)
    return path
