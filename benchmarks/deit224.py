"""The real setting: DeiT's recipe at 224 px on ImageNet-like JPEG photos, against timm's own input path.

Everything runs with the real architectures, randomly initialised (speed does not depend on the weights):
the student `deit_tiny_distilled_patch16_224`, the teacher `regnety_160` (RegNetY-16GF), and the same
number of loader workers on every side. Paired in one run, interleaved (A B C A B C ...):

- A: timm's own training input path without distillation: webdataset reads the same shards (`.shuffle` on
  the encoded samples, `.decode("pil")`), `timm.data.create_transform` with DeiT's arguments
  (RandomResizedCrop, flip, rand-m9-mstd0.5-inc1, random erasing 0.25 pixel mode) in the loader workers,
  `timm.data.Mixup` (mixup 0.8 / cutmix 1.0, label smoothing 0.1) on the batch, then the student's step
  with both heads on the mixed ground truth.
- B: the project's student from the cache (`pipeline.train.train`, hard distillation), replaying the stored
  views. The cache is filled by stage 1 with a cheap stand-in teacher (`regnety_002`): what the student
  reads from it costs the same whatever teacher wrote it.
- C: A with the teacher run online on the same mixed batch (DeiT's setting), hard distillation.

Reported: images/s of each (median per-step rate, the warm-up steps left out), B/A, (C time / B time) as a
share of the ideal (t_s + t_t) / t_s from the student's step and the teacher's forward measured on
pre-made batches in the same repetitions, replay ms per view against timm's decode + transform + Mixup per
view on the same files (one core, in process), and the project loader's first-batch time of an epoch
against its steady batch time, over consecutive epochs with persistent workers: the run's first epoch
(workers starting) and the epochs after it (the state a long run is in), beside the loader started anew
each epoch (as before persistent workers) and timm's path.

On a CPU every step is the model's: a 224 px DeiT-Ti step costs tens of milliseconds per image, so the
loops run a few steps each and the data path hides behind them; the numbers that speak for the data path
there are the per-view ones. On a GPU (`--device cuda`) the same code measures the real race.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from timm.data import Mixup, auto_augment, create_transform
from timm.optim import create_optimizer_v2

from benchmarks.markdown import met, num, table
from benchmarks.photos import mean_file_bytes, source_names, write_photo_shards
from benchmarks.timing import interleave, seconds_per_call, summary
from pipeline import teacher_cache, views
from pipeline.distributed import World
from pipeline.manifest import Manifest
from pipeline.reader import read_shard
from pipeline.shards import load_shardlist
from pipeline.student_data import EncodedImages
from pipeline.teacher import pick_device

STUDENT = "deit_tiny_distilled_patch16_224"
CLASSES = 1000
SIZE = 224


@dataclass(frozen=True, slots=True)
class Setup:
    photos: int  # the replay comparison's photos (DeiT-like sizes, ~110 KB)
    photo_shard: int
    warmup_steps: int  # untimed steps at the start of each training loop: the first steps of a loop run
                       # slower (allocations, the optimizer's state, the loader's early prefetch competing
                       # with the step for the cores) on every side alike
    loop_steps: int  # timed steps of each training loop per repetition, after the warm-up steps
    batch: int
    workers: int  # loader workers on every side
    reps: int
    model_calls: int  # calls per repetition of the pre-made-batch timings
    loader_photos: int  # one shard of them, one epoch of the loader-alone measurement
    loader_epochs: int  # consecutive epochs per loader-alone run (the first, then later ones)
    student_args: dict
    teacher: str
    teacher_args: dict
    filler: str  # the stand-in teacher that fills B's cache
    filler_args: dict

    @property
    def loop_batches(self) -> int:
        """Batches each training loop takes per repetition: its warm-up steps, then its timed steps."""
        return self.warmup_steps + self.loop_steps


FULL = Setup(photos=512, photo_shard=128, warmup_steps=3, loop_steps=5, batch=8, workers=1, reps=2, model_calls=1,
             loader_photos=128, loader_epochs=4, student_args={}, teacher="regnety_160", teacher_args={}, filler="regnety_002", filler_args={})
QUICK = Setup(photos=32, photo_shard=16, warmup_steps=1, loop_steps=2, batch=4, workers=1, reps=1, model_calls=1,
              loader_photos=32, loader_epochs=3, student_args={"depth": 1}, teacher="regnety_002", teacher_args={}, filler="regnety_002",
              filler_args={})


# --------------------------------------------------------------------------------------------- A and C: timm


def _posterize_as_older_pillow(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm maps magnitude 10 to 0 bits; Pillow >= 13 refuses 0 bits where older Pillow gave black (the
    project's renderer does the same, `views._apply_ra_op`)."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def timm_transform():
    """DeiT's training transform (deit/datasets.py build_transform -> timm create_transform), its posterize
    ops made to work on Pillow >= 13 as on older Pillow."""
    transform = create_transform(SIZE, is_training=True, color_jitter=0.3, auto_augment="rand-m9-mstd0.5-inc1",
                                 interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1)
    for t in transform.transforms:
        if isinstance(t, auto_augment.RandAugment):
            for op in t.ops:
                if op.aug_fn is auto_augment.posterize:
                    op.aug_fn = _posterize_as_older_pillow
    return transform


def timm_mixup() -> Mixup:
    return Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                 label_smoothing=0.1, num_classes=CLASSES)


def timm_loader(urls: list[str], batch: int, workers: int, shuffle: int,
                persistent: bool = False, pin: bool = False) -> torch.utils.data.DataLoader:
    """timm's input path over webdataset: shuffle the encoded samples, decode, DeiT's transform, batch (into
    pinned memory with `pin`, as timm's loader does on a GPU)."""
    dataset = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).shuffle(shuffle)
               .decode("pil").to_tuple("jpg", "cls").map_tuple(timm_transform(), int))
    return torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, drop_last=True,
                                       pin_memory=pin, persistent_workers=persistent and workers > 0,
                                       prefetch_factor=2 if workers else None)


DeitStep = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], None]


def deit_step(device: torch.device, student_args: dict | None = None, compile: bool = False) -> DeitStep:
    """step(x, target, teacher_ids or None): one plain timm/torch DeiT training step of a fresh student
    (`STUDENT` with `student_args`), the one every bench side that is not the project's own trainer takes:
    the class head on the mixed ground truth; the distillation head on it too (no teacher: A) or on the
    teacher's argmax (hard distillation: C). AdamW from timm's factory, as DeiT's main.py and the project's
    trainer build it (no decay on norms and biases); bf16 autocast on CUDA; `compile`: torch.compile."""
    torch.manual_seed(0)
    model = timm.create_model(STUDENT, num_classes=CLASSES, drop_path_rate=0.1, **(student_args or {})).to(device)
    model.set_distilled_training(True)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=5e-4, weight_decay=0.05)
    forward = torch.compile(model) if compile else model

    def step(x: torch.Tensor, target: torch.Tensor, teacher_ids: torch.Tensor | None) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            cls_logits, dist_logits = forward(x)
        base = torch.sum(-target * F.log_softmax(cls_logits.float(), 1), 1).mean()
        if teacher_ids is None:
            distill = torch.sum(-target * F.log_softmax(dist_logits.float(), 1), 1).mean()
        else:
            distill = F.cross_entropy(dist_logits.float(), teacher_ids)
        optimizer.zero_grad(set_to_none=True)
        (0.5 * base + 0.5 * distill).backward()
        optimizer.step()

    return step


class Models:
    """The student's step (`deit_step`) and the online teacher, on `device`, built once per bench run."""

    def __init__(self, setup: Setup, device: torch.device):
        self.device = device
        self.step = deit_step(device, setup.student_args)
        self.teacher = timm.create_model(setup.teacher, num_classes=CLASSES, **setup.teacher_args)
        self.teacher = self.teacher.eval().requires_grad_(False).to(device)
        self.autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    @torch.no_grad()  # not inference_mode: its ids feed the student's loss
    def teacher_ids(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(**self.autocast):
            return self.teacher(x).argmax(1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timm_loop(models: Models, urls: list[str], setup: Setup, online: bool) -> list[float]:
    """Per-step images/s of A (or C with `online`) over `setup.loop_batches` batches."""
    mixup, device, rates = timm_mixup(), models.device, []
    loader = timm_loader(urls, setup.batch, setup.workers, shuffle=setup.batch * setup.loop_batches)
    tick = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x, target = mixup(x, y)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        models.step(x, target, models.teacher_ids(x) if online else None)
        _sync(device)
        now = time.perf_counter()
        rates.append(setup.batch / (now - tick))
        tick = now
        if len(rates) == setup.loop_batches:
            break
    return rates


# --------------------------------------------------------------------------------------------- B: the project


def project_manifest(work: Path, loop_list: str, val_list: str, setup: Setup, device: str) -> Manifest:
    m = Manifest()
    filler = replace(m.teacher, model=setup.filler, model_args=dict(setup.filler_args), pretrained=False,
                     checkpoint=str(work / "filler.pt"), img_size=SIZE)
    if not Path(filler.checkpoint).is_file():
        torch.manual_seed(0)
        torch.save(timm.create_model(setup.filler, num_classes=CLASSES, **setup.filler_args).state_dict(),
                   filler.checkpoint)
    return replace(
        m, data=replace(m.data, train=loop_list, val=val_list, builtin="none", on_error="raise"), teacher=filler,
        cache=replace(m.cache, path=str(work / "cache"), epochs=1, top_k=10, batch_size=setup.batch,
                      workers=setup.workers, shards_per_unit=1, device=device),
        student=replace(m.student, model=STUDENT, model_args=dict(setup.student_args), img_size=SIZE,
                        patch_size=16, distillation="hard", epochs=1, batch_size=setup.batch,
                        workers=setup.workers, shuffle_buffer=4096, ema=None, verify_sample=0.0, ckpt_every=0,
                        eval_every=1, device=device, compile=False, run_dir=str(work / "runs" / "b"),
                        log=replace(m.student.log, every=1)),  # a rate per step, as A's (the default 50 would
                                                               # give one rate over the run, loader start included)
    ).check()


def project_loop(m: Manifest, run_dir: Path) -> list[float]:
    """Per-step images/s of B: `pipeline.train.train` from the cache, as a user runs it."""
    from pipeline.train import train

    train(replace(m, student=replace(m.student, run_dir=str(run_dir))), World(0, 1, None), progress=False)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["images_per_s"] for r in rows if r["event"] == "step"]


def _epoch_gaps(epochs: Callable[[], object]) -> list[list[float]]:
    """Per epoch of a run of consecutive epochs (`epochs` yields each epoch's batches as its turn comes):
    seconds from asking for the epoch to its first batch, then between later batches."""
    out = []
    for batches in epochs():
        start, gaps = time.perf_counter(), []
        for _batch in batches:
            now = time.perf_counter()
            gaps.append(now - start)
            start = now
        out.append(gaps)
    return out


def _stop_workers(loader: torch.utils.data.DataLoader) -> None:
    iterator, loader._iterator = loader._iterator, None
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def _loader_figures(runs: list[list[list[float]]]) -> dict:
    """From runs of consecutive epochs: the first epoch's first batch, the first batch of an epoch after the
    first (median over those epochs of a run), the steady batch (median gap after each epoch's first batch,
    every epoch of a run) and an epoch after the first (median seconds); each summarised over the runs."""
    figures = {"first_epoch1_s": [], "first_s": [], "steady_s": [], "epoch_s": []}
    for epochs in runs:
        figures["first_epoch1_s"].append(epochs[0][0])
        figures["first_s"].append(statistics.median(e[0] for e in epochs[1:]))
        figures["steady_s"].append(statistics.median(g for e in epochs for g in e[1:]))
        figures["epoch_s"].append(statistics.median(sum(e) for e in epochs[1:]))
    return {name: summary(values) for name, values in figures.items()} | {"batches": len(runs[0][0])}


def first_batch(m: Manifest, urls: list[str], reps: int, epochs: int) -> dict:
    """The loaders alone (no model), interleaved, each over `epochs` consecutive epochs: seconds to the first
    batch of an epoch and between later ones, for the project's loader with persistent workers (one
    `open_loader` for the run, as `pipeline.train` uses it), for the project's loader started anew each epoch
    (`TrainSet.loader`, the way before persistent workers), and for timm's path over the same shards with
    the same workers and batch (persistent workers too)."""
    from pipeline import cache
    from pipeline.student_data import open_train_set

    m = replace(m, student=replace(m.student, epochs=epochs))
    data = open_train_set(m, cache.open_cache(m.cache.path))
    b, w = m.student.batch_size, m.student.workers

    def project():
        with data.open_loader(0) as loader:
            for epoch in range(epochs):
                yield loader.epoch(epoch)

    def restart():
        for epoch in range(epochs):
            yield data.loader(epoch, 0)

    def timm_side():
        loader = timm_loader(urls, b, w, shuffle=len(data.valid[0]), persistent=True)
        try:
            for _ in range(epochs):
                yield loader
        finally:
            _stop_workers(loader)

    runs = interleave({"project": lambda: _epoch_gaps(project), "restart": lambda: _epoch_gaps(restart),
                       "timm": lambda: _epoch_gaps(timm_side)}, reps)
    out = {"shuffle_buffer": m.student.shuffle_buffer, "workers": w, "epochs": epochs}
    for name, values in runs.items():
        prefix = "" if name == "project" else f"{name}_"
        out |= {f"{prefix}{key}": value for key, value in _loader_figures(values).items()}
    return out


# --------------------------------------------------------------------------------------------- per view


class DraftImages(EncodedImages):
    """A replay candidate, measured and not adopted: position -> RGB image decoded at the coarsest JPEG DCT
    scale (1/2, 1/4, 1/8: PIL's draft mode) that keeps the view's crop box at least `size` px a side, a scale
    derivable from the stored crop and the teacher's size alone. It changes the pixels (the resize starts
    from a DCT-reduced image), so adopting it means stage 1 decoding the same way and a new recipe version."""

    def __init__(self, encoded: dict[int, bytes], params: np.ndarray, size: int):
        super().__init__(encoded, "the 224 px bench's photos")
        self.params, self.size = params, size
        self.scales: list[float] = []  # the decode scale of every image decoded

    def __getitem__(self, pos: int) -> Image.Image:
        x0, y0, x1, y1 = views.describe(self.params[pos])["crop"]["box"]  # pixels of the source
        img = Image.open(io.BytesIO(self.encoded[pos]))
        width, height = img.size
        img.draft("RGB", (max(1, math.ceil(self.size * width / max(x1 - x0, 1))),
                          max(1, math.ceil(self.size * height / max(y1 - y0, 1)))))
        self.scales.append(width / img.size[0])
        return img.convert("RGB")


def per_view(shardlist_path: str, count: int, reps: int) -> dict:
    """ms per view on one core, in process, on the same files: timm's path (tar read + PIL decode + DeiT's
    transform, plus Mixup on batches of 16, amortised) against the project's replay (`read_shard` + the
    stored parameters rendered by `views.ShardViews`, as the student's workers do; parameters computed
    beforehand, as the student reads them from the cache)."""
    shardlist = load_shardlist(shardlist_path)
    cfg = Manifest().views
    shards = []
    for i, entry in enumerate(shardlist.shards):
        if sum(len(s[0]) for s in shards) >= count:
            break
        samples = list(read_shard(shardlist, i))
        params = np.stack([views.sample_params(cfg, 0, i, x.pos, entry.samples, views.image_size(x.image), size=SIZE) for x in samples])
        shards.append(([x.pos for x in samples], params, i))
    n = sum(len(s[0]) for s in shards)
    transform, mixup = timm_transform(), timm_mixup()
    urls = [shardlist.shards[i].url for _, _, i in shards]

    def timm_side():
        start = time.perf_counter()
        pending = []
        for members in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            with Image.open(io.BytesIO(members["jpg"])) as img:
                pending.append(transform(img.convert("RGB")))
            if len(pending) == 16:
                mixup(torch.stack(pending), torch.zeros(16, dtype=torch.int64))
                pending = []
        return (time.perf_counter() - start) * 1e3 / n

    def replay_side():
        start = time.perf_counter()
        for positions, params, i in shards:
            images = {x.pos: x.image for x in read_shard(shardlist, i)}
            rendered = views.ShardViews(images, params, SIZE, cfg)
            for pos in positions:
                rendered.view(pos)
        return (time.perf_counter() - start) * 1e3 / n

    def draft_side(compare: bool = False):
        start, diffs, scales = time.perf_counter(), [], []
        for positions, params, i in shards:
            encoded = {x.pos: x.image for x in read_shard(shardlist, i, decode=False)}
            images = DraftImages(encoded, params, SIZE)
            rendered = views.ShardViews(images, params, SIZE, cfg)
            if compare:
                full = views.ShardViews({x.pos: x.image for x in read_shard(shardlist, i)}, params, SIZE, cfg)
                diffs += [float(np.abs(rendered.view(p).astype(np.int16) - full.view(p)).mean()) for p in positions]
                scales += images.scales
                continue
            for pos in positions:
                rendered.view(pos)
        if compare:
            return float(np.mean(diffs)), float(np.mean(np.array(scales) > 1))
        return (time.perf_counter() - start) * 1e3 / n

    runs = interleave({"timm_ms": timm_side, "replay_ms": replay_side, "replay_draft_ms": draft_side}, reps + 1)
    runs = {name: values[1:] for name, values in runs.items()}  # the first pass warms each side up
    diff, reduced = draft_side(compare=True)
    return {name: summary(values) for name, values in runs.items()} | {
        "views": n, "draft_mean_abs_diff": diff, "draft_reduced_share": reduced}


# --------------------------------------------------------------------------------------------- the section


def measure(work: Path, photo_dir: Path, quick: bool, device: str = "cpu") -> dict:
    setup = QUICK if quick else FULL
    torch_device = pick_device(device)
    work.mkdir(parents=True, exist_ok=True)
    kind = "quick" if quick else "full"
    photos = write_photo_shards(photo_dir / f"{kind}-replay", setup.photos, setup.photo_shard, CLASSES, seed=0,
                                prefix="photo")
    loop_count = setup.batch * setup.loop_batches
    loop_list = write_photo_shards(photo_dir / f"{kind}-loop-b{setup.batch}", loop_count, loop_count, CLASSES,
                                   seed=1, prefix="loop")
    val_list = write_photo_shards(photo_dir / f"{kind}-val", 16, 16, CLASSES, seed=2, prefix="val")
    loader_list = write_photo_shards(photo_dir / f"{kind}-loader", setup.loader_photos, setup.loader_photos, CLASSES,
                                     seed=3, prefix="loader")
    m = project_manifest(work, str(loop_list), str(val_list), setup, device)
    filled = teacher_cache.run(m, progress=False)
    (work / "loader").mkdir(exist_ok=True)
    m_loader = project_manifest(work / "loader", str(loader_list), str(val_list), setup, device)
    teacher_cache.run(m_loader, progress=False)
    loop_urls = [s.url for s in load_shardlist(loop_list).shards]
    models = Models(setup, torch_device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(setup.batch, 3, SIZE, SIZE, generator=gen).to(torch_device)
    target = torch.softmax(torch.randn(setup.batch, CLASSES, generator=gen), 1).to(torch_device)
    ids = torch.randint(CLASSES, (setup.batch,), generator=gen).to(torch_device)
    counter = iter(range(10**6))

    def steady(rates_fn: Callable[[], list[float]]) -> Callable[[], float]:
        def run():
            rates = rates_fn()
            if len(rates) <= setup.warmup_steps:
                raise RuntimeError(f"a 224 px loop made {len(rates)} steps; the bench needs more than "
                                   f"{setup.warmup_steps} (the warm-up)")
            return statistics.median(rates[setup.warmup_steps:])
        return run

    runs = interleave({
        "a_timm": steady(lambda: timm_loop(models, loop_urls, setup, online=False)),
        "b_cache": steady(lambda: project_loop(m, work / "runs" / f"b-{next(counter)}")),
        "c_online": steady(lambda: timm_loop(models, loop_urls, setup, online=True)),
        "student_step_s": lambda: seconds_per_call(lambda: models.step(x, target, ids), setup.model_calls) / setup.batch,
        "teacher_forward_s": lambda: seconds_per_call(lambda: models.teacher_ids(x), setup.model_calls) / setup.batch,
    }, setup.reps)
    med = {name: statistics.median(values) for name, values in runs.items()}
    ideal = (med["student_step_s"] + med["teacher_forward_s"]) / med["student_step_s"]
    c_over_b = med["b_cache"] / med["c_online"]  # C time / B time per image
    replay = per_view(str(photos), setup.photos, max(2, setup.reps))
    loader = first_batch(m_loader, [s.url for s in load_shardlist(loader_list).shards], max(3, setup.reps),
                         setup.loader_epochs)
    return {name: summary(values) for name, values in runs.items()} | {
        "b_over_a_224": med["b_cache"] / med["a_timm"],
        "online_share_of_ideal_224": c_over_b / ideal,
        "c_time_over_b_time": c_over_b, "ideal_c_over_b": ideal,
        "replay_over_timm_ms": replay["replay_ms"]["median"] / replay["timm_ms"]["median"],
        # the goal's figure: an epoch after the first, persistent workers (299 of a 300-epoch run's epochs)
        "first_batch_over_steady": loader["first_s"]["median"] / loader["steady_s"]["median"],
        "first_batch_epoch1_over_steady": loader["first_epoch1_s"]["median"] / loader["steady_s"]["median"],
        "restart_first_batch_over_steady": loader["restart_first_s"]["median"] / loader["restart_steady_s"]["median"],
        "timm_first_batch_over_steady": loader["timm_first_s"]["median"] / loader["timm_steady_s"]["median"],
        "timm_first_batch_epoch1_over_steady": (loader["timm_first_epoch1_s"]["median"]
                                                / loader["timm_steady_s"]["median"]),
        "per_view": replay, "loader": loader,
        "setup": dataclasses.asdict(setup), "device": str(torch_device),
        "photos": {"replay_set": setup.photos, "loop_set": loop_count, "mean_jpeg_bytes": round(mean_file_bytes(photos)),
                   "sources": source_names() or "synthetic colour fields"},
        "cache_fill": {"views": filled["views"], "views_per_s": filled["views_per_s"]},
        "teacher": setup.teacher, "student": STUDENT,
    }


# --------------------------------------------------------------------------------------------- the report


def goals(r: dict) -> list[list[str]]:
    return [
        ["224a", "B / A: the project's student from the cache / timm's own input path (images/s)",
         num(r["b_over_a_224"]), ">= 1.0", met(r["b_over_a_224"] >= 1.0)],
        ["224b", "(C time / B time) as a share of the ideal (t_s + t_t) / t_s", num(r["online_share_of_ideal_224"]),
         ">= 0.9", met(r["online_share_of_ideal_224"] >= 0.9)],
        ["224c", "replay ms per view / timm's decode + transform + Mixup ms per view (one core)",
         num(r["replay_over_timm_ms"]), "<= 0.8", met(r["replay_over_timm_ms"] <= 0.8)],
        ["224d", "the project loader's first batch of an epoch after the first (persistent workers) / its steady "
                 "batch time",
         num(r["first_batch_over_steady"]), "<= 2", met(r["first_batch_over_steady"] <= 2)],
    ]


def _spread(entry: dict, scale: float = 1.0) -> str:
    return f"{num(entry['median'] * scale)} ({num(entry['min'] * scale)}-{num(entry['max'] * scale)})"


def markdown(r: dict) -> list[str]:
    s, pv, ld = r["setup"], r["per_view"], r["loader"]
    a, b, c = (r[k]["median"] for k in ("a_timm", "b_cache", "c_online"))
    rows = [["A: timm's input path, no distillation", _spread(r["a_timm"]), "1",
             "webdataset + `create_transform` (DeiT's arguments) in the loader workers, `Mixup` on the batch."],
            ["B: the project's student from the cache (hard)", _spread(r["b_cache"]), num(b / a),
             "`pipeline.train.train`: replay of the stored views, the cache's top-K, the same step."],
            ["C: A + teacher online (hard)", _spread(r["c_online"]), num(c / a),
             f"{r['teacher']} forward on every mixed batch; C time / B time {num(r['c_time_over_b_time'])} "
             f"against the ideal {num(r['ideal_c_over_b'])} from the model costs."]]
    return (["## The real setting: 224 px, DeiT's recipe, timm's own input path", "",
             f"Student `{r['student']}`{' ' + str(s['student_args']) if s['student_args'] else ''} and teacher `{r['teacher']}`, random weights, "
             f"{SIZE} px, batch {s['batch']}, {s['workers']} loader worker(s) on every side, device {r['device']}, "
             f"{s['reps']} interleaved repetitions (median, min-max). Photos: {r['photos']['replay_set']} "
             f"ImageNet-like JPEGs for the per-view comparison and {r['photos']['loop_set']} for the loops "
             f"(mean {num(r['photos']['mean_jpeg_bytes'] / 1e3)} KB, cut from {', '.join(r['photos']['sources']) if isinstance(r['photos']['sources'], list) else r['photos']['sources']}). Each loop "
             f"runs {s['loop_steps']} timed steps after {s['warmup_steps']} warm-up step(s)"
             + (": on a CPU the step is the model's (a 224 px DeiT-Ti step costs tens of milliseconds per image), so A, B and C mostly "
                "measure the models and the per-view rows below are what speaks for the data path." if
                r["device"] == "cpu" else "."), ""]
            + table(["loop", "images/s", "vs A", "what"], rows)
            + ["", f"Model costs on pre-made batches, same repetitions: student step "
                   f"{_spread(r['student_step_s'], 1e3)} ms/image, teacher forward {_spread(r['teacher_forward_s'], 1e3)} "
                   f"ms/image. B's cache was filled by stage 1 with the stand-in teacher `{s['filler']}` "
                   f"({r['cache_fill']['views']} views at {num(r['cache_fill']['views_per_s'])} views/s).", ""]
            + table(["per view, one core, same files", "ms/view", "ratio"], [
                ["timm: tar + decode + `create_transform` + `Mixup`", _spread(pv["timm_ms"]), "1"],
                ["project: `read_shard` + `views.ShardViews` replay", _spread(pv["replay_ms"]),
                 num(r["replay_over_timm_ms"])],
                ["candidate, not adopted: the replay from a JPEG draft-mode decode (`DraftImages`)",
                 _spread(pv["replay_draft_ms"]),
                 f"{num(pv['replay_draft_ms']['median'] / pv['timm_ms']['median'])} ({num(pv['draft_reduced_share'] * 100)}% of "
                 f"the decodes reduced; pixels differ by {num(pv['draft_mean_abs_diff'])} of 255 on average)"]])
            + ["", f"The loaders alone ({ld['workers']} worker(s), batch {s['batch']}, one shard of "
                   f"{ld['batches'] * s['batch']} photos: {ld['batches']} batches an epoch, {ld['epochs']} consecutive "
                   f"epochs per run, {len(ld['first_s']['runs'])} interleaved runs; seconds, median (min-max) over the "
                   f"runs). Goal 224d is the first batch of an epoch after the first, the state a 300-epoch run is "
                   f"in for 299 of its epochs; the run's first epoch, whose worker starts, is reported beside it.", ""]
            + table(["loader", "first batch, epoch 1", "first batch, epochs >= 2", "steady batch",
                     "ratio epoch 1", "ratio epochs >= 2", "an epoch >= 2"], [
                ["project, persistent workers (`TrainSet.open_loader`, as `pipeline.train` runs)",
                 _spread(ld["first_epoch1_s"]), _spread(ld["first_s"]), _spread(ld["steady_s"]),
                 num(r["first_batch_epoch1_over_steady"]), num(r["first_batch_over_steady"]), _spread(ld["epoch_s"])],
                ["project, workers started each epoch (`TrainSet.loader`, as before)",
                 _spread(ld["restart_first_epoch1_s"]), _spread(ld["restart_first_s"]), _spread(ld["restart_steady_s"]),
                 num(ld["restart_first_epoch1_s"]["median"] / ld["restart_steady_s"]["median"]),
                 num(r["restart_first_batch_over_steady"]), _spread(ld["restart_epoch_s"])],
                ["timm's path, same shards, workers and batch, persistent workers",
                 _spread(ld["timm_first_epoch1_s"]), _spread(ld["timm_first_s"]), _spread(ld["timm_steady_s"]),
                 num(r["timm_first_batch_epoch1_over_steady"]), num(r["timm_first_batch_over_steady"]),
                 _spread(ld["timm_epoch_s"])]])
            + ["", f"The shuffle buffer ({ld['shuffle_buffer']}) holds encoded samples and a view is rendered when its "
                   "batch leaves, so an epoch's first batch waits for its worker to read its share of the shards up "
                   "to that batch (here the whole shard: the buffer is larger than an epoch) and to render its views "
                   "and their mix partners (about two batches' renders), and, where workers start with the epoch, "
                   "for the worker's start (fork, open the cache). Persistent workers start once, and each begins its "
                   "part of the next epoch in a thread as soon as it has read all it reads of the current one (the "
                   "batches left are the buffer's drain; here from an epoch's second batch on) or, at the latest, as "
                   "it starts the last two: the thread reads up to the next epoch's first batch and renders it, and "
                   "the worker hands that batch over when the epoch is asked for. The same batches, made earlier; a "
                   "worker holds up to two buffers of encoded samples. In a run that work overlaps the trainer's steps "
                   "and evaluation; here, with nothing but the loader, it overlaps the worker's own batches, in a "
                   "thread that can use the core the waiting main process leaves: the steady batch and the epoch "
                   "time show what it costs. With W workers each batching its own views (timm's loader as well), the "
                   "first batch is one worker's work while a steady batch is W workers' in parallel."])
