"""Teacher agreement statistics of a cache, and of student runs trained from it, as plain JSON-able dicts.

What the teacher said about its cached train views (top-1 against the dominant ground-truth label of each
mixed view: the view's own label when lam >= 0.5, else its partner's), how much probability its top-K holds
(`sum exp(z_i - lse)`) and its entropy (of the distribution rebuilt from the sparse cache by
`losses.sparse_teacher_log_probs`), so the user learns whether K is large enough; on val, the teacher's
top-1 overall and per class, each run's per-class agreement with the teacher, and DeiT's Table 4: pairwise
disagreement rates among the ground truth, the teacher and each run's class head, distillation head and
joint prediction.

Only complete units (`cache.done_units`) are read, one shard slab at a time, so incomplete caches give
statistics over what is there and say how much that is. A run's val predictions come from its
`val_predictions.npz` (arrays `class`, `dist`, `joint` [val shards, positions], -1 where there is no
sample) when it has one, otherwise from its checkpoint, evaluated here the way `pipeline.evaluate` does
(timm's eval view at the student's size and crop_pct). The checkpoint's raw weights are used, as for the
headline numbers in result.json (not the EMA weights).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import cache, views
from pipeline.losses import sparse_teacher_log_probs
from pipeline.manifest import ManifestError
from pipeline.manifest_loader import from_dict
from pipeline.reader import read_shard
from pipeline.shards import data_shardlist
from pipeline.student import create_student, heads
from pipeline.teacher import normalize
from pipeline.train import CHECKPOINT, RESULT

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
HIST_BINS = 50
LOW_MASS = 0.9  # a view whose top-K holds less than this is poorly described by its top-K
LOW_MASS_SHARE_OK = 0.05  # K is judged large enough when at most this share of views falls below LOW_MASS
HEADS = ("class", "dist", "joint")
PREDICTIONS = "val_predictions.npz"
EVAL_BATCH = 256
MAX_CLASS_ROWS = 20  # classes printed in the per-class table (the worst ones when there are more)


class StatsError(ValueError):
    """A run directory cannot be used for the statistics; the message names it and says what to do."""


# --------------------------------------------------------------------------------------------- distributions


def topk_mass(topk_logprobs: np.ndarray) -> np.ndarray:
    """The probability the cached top-K holds per view: sum_i exp(log p_i) ([..., K] -> [...])."""
    return np.exp(topk_logprobs.astype(np.float32)).sum(-1)


def teacher_entropy(topk_logprobs: np.ndarray, topk_ids: np.ndarray, log_leftover: np.ndarray,
                    num_classes: int) -> np.ndarray:
    """Entropy (nats) of the teacher distribution rebuilt from the sparse cache at tau = 1, per view [B]."""
    if not len(log_leftover):
        return np.zeros(0, np.float32)
    log_p = sparse_teacher_log_probs(torch.from_numpy(topk_logprobs), torch.from_numpy(topk_ids.astype(np.int64)),
                                     torch.from_numpy(log_leftover), num_classes)
    return -(log_p.exp() * log_p).sum(1).numpy()


def distribution(values: np.ndarray, low: float, high: float) -> dict:
    """Mean, range, quantiles and a HIST_BINS histogram over [low, high] (values outside are clipped in)."""
    if not len(values):
        return {"count": 0}
    values = values.astype(np.float64)
    counts, edges = np.histogram(np.clip(values, low, high), bins=HIST_BINS, range=(low, high))
    return {"count": int(len(values)), "mean": float(values.mean()), "min": float(values.min()),
            "max": float(values.max()),
            "quantiles": {str(q): float(v) for q, v in zip(QUANTILES, np.quantile(values, QUANTILES))},
            "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}


def _mass_summary(mass: np.ndarray) -> dict:
    out = distribution(mass, 0.0, 1.0)
    if len(mass):
        out["below_threshold"] = float((mass < LOW_MASS).mean())
    return out


# --------------------------------------------------------------------------------------------- the cache


def dominant_labels(labels: np.ndarray, params: np.ndarray, param_fields: list[str]) -> np.ndarray:
    """The dominant ground-truth label of each view of one shard: its own label if lam >= 0.5, else its
    partner's (what `views.mix_target` decodes, read here as two columns for all positions at once).
    A partner that was skipped as a bad sample (label -1) was replaced by the view itself, as in stage 1.
    `labels` [P], `params` [P, N]; positions without a label give -1."""
    partner = params[:, param_fields.index("mix_partner")].astype(np.int64)
    lam = params[:, param_fields.index("mix_lam")]
    partner_label = labels[np.clip(partner, 0, len(labels) - 1)]
    partner_label = np.where(partner_label >= 0, partner_label, labels)
    return np.where(lam >= 0.5, labels, partner_label)


def _units_line(done: np.ndarray) -> dict:
    return {"done": int(done.sum()), "total": int(done.size)}


def train_statistics(root, bar: tqdm | None = None) -> dict:
    """Teacher top-1 against the dominant label, top-K mass and entropy, per cache epoch and overall, over
    the complete train units. Views need a digest (a view is there); the top-1 also needs the labels, which
    the epoch-0 unit of the view's shard group writes."""
    layout = cache.layout_of(root, "train")
    done = cache.done_units(root, "train")
    labels = cache.read_labels(root, "train")
    fields = list(root.attrs["param_fields"])
    by_epoch, all_mass, all_entropy, correct_total, labelled_total = [], [], [], 0, 0
    for epoch in range(layout.epochs):
        mass, entropy, correct, labelled, groups = [], [], 0, 0, 0
        for group in np.flatnonzero(done[epoch]):
            groups += 1
            for shard in layout.group_shards(int(group)):
                slab = cache.read_slab(root, "train", epoch, shard,
                                       ("topk_logprobs", "topk_ids", "log_leftover", "digest", "view"))
                present = slab["digest"] != 0
                mass.append(topk_mass(slab["topk_logprobs"][present]))
                entropy.append(teacher_entropy(slab["topk_logprobs"][present], slab["topk_ids"][present],
                                               slab["log_leftover"][present], layout.num_classes))
                target = dominant_labels(labels[shard], slab["view"], fields)
                known = present & (labels[shard] >= 0)
                correct += int((slab["topk_ids"][known, 0] == target[known]).sum())
                labelled += int(known.sum())
            if bar is not None:
                bar.update()
        if not groups:
            continue
        mass, entropy = np.concatenate(mass), np.concatenate(entropy)
        by_epoch.append({"epoch": epoch, "units": groups, "views": int(len(mass)), "labelled_views": labelled,
                         "teacher_top1": correct / labelled if labelled else None,
                         "mass": _mass_summary(mass),
                         "entropy": distribution(entropy, 0.0, np.log(layout.num_classes))})
        all_mass.append(mass)
        all_entropy.append(entropy)
        correct_total += correct
        labelled_total += labelled
    mass = np.concatenate(all_mass) if all_mass else np.zeros(0, np.float32)
    entropy = np.concatenate(all_entropy) if all_entropy else np.zeros(0, np.float32)
    return {"units": _units_line(done), "views": int(len(mass)), "labelled_views": labelled_total,
            "teacher_top1": correct_total / labelled_total if labelled_total else None, "by_epoch": by_epoch,
            "mass": _mass_summary(mass), "entropy": distribution(entropy, 0.0, np.log(layout.num_classes))}


def val_answers(root, bar: tqdm | None = None) -> dict[str, np.ndarray]:
    """The teacher's val top-1 and the labels over [Sv, Pv], with `present` False where there is no sample
    or its unit is not complete; plus top-K mass and entropy of the present views."""
    layout = cache.layout_of(root, "val")
    done = cache.done_units(root, "val")
    top1 = np.full((layout.shards, layout.positions), -1, np.int64)
    present = np.zeros((layout.shards, layout.positions), bool)
    mass, entropy = [], []
    for group in np.flatnonzero(done):
        for shard in layout.group_shards(int(group)):
            slab = cache.read_slab(root, "val", None, shard, ("topk_logprobs", "topk_ids", "log_leftover", "digest"))
            here = slab["digest"] != 0
            present[shard] = here
            top1[shard] = slab["topk_ids"][:, 0]
            mass.append(topk_mass(slab["topk_logprobs"][here]))
            entropy.append(teacher_entropy(slab["topk_logprobs"][here], slab["topk_ids"][here],
                                           slab["log_leftover"][here], layout.num_classes))
        if bar is not None:
            bar.update()
    labels = cache.read_labels(root, "val").astype(np.int64)
    present &= labels >= 0
    empty = np.zeros(0, np.float32)
    return {"top1": top1, "labels": labels, "present": present, "units": _units_line(done),
            "mass": np.concatenate(mass) if mass else empty, "entropy": np.concatenate(entropy) if entropy else empty}


def rate(hits: np.ndarray) -> float | None:
    """The share of True in `hits` (None when it is empty)."""
    return float(hits.mean()) if hits.size else None


def per_class_rate(hits: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float | None]:
    """Share of hits among the samples of each ground-truth class (None for a class with no sample)."""
    counts = np.bincount(labels, minlength=num_classes)
    sums = np.bincount(labels, weights=hits.astype(np.float64), minlength=num_classes)
    return [float(s / c) if c else None for s, c in zip(sums, counts)]


def k_verdict(mass: dict, top_k: int, num_classes: int) -> dict:
    """Whether the cached top-K holds enough of the teacher's probability, in words."""
    if top_k >= num_classes:
        return {"enough": True, "message": f"K={top_k} covers all {num_classes} classes: the cache is exact."}
    if not mass.get("count"):
        return {"enough": None, "message": "no complete train unit: nothing to judge K by yet."}
    median, low = mass["quantiles"]["0.5"], mass["below_threshold"]
    enough = low <= LOW_MASS_SHARE_OK
    text = (f"K={top_k} of {num_classes} classes: the top-K holds a median {median:.4f} of the teacher's probability; "
            f"{100 * low:.1f}% of views keep less than {LOW_MASS} in their top-K")
    text += (": K is large enough." if enough else
             f": more than {100 * LOW_MASS_SHARE_OK:.0f}% of views lose over {1 - LOW_MASS:.0%} of their mass to "
             f"the uniform spread, so soft targets are blurred; consider a larger cache.top_k.")
    return {"enough": enough, "median_mass": median, "below_threshold": low, "threshold": LOW_MASS,
            "message": text}


# --------------------------------------------------------------------------------------------- runs


def run_dirs(paths: list[str | Path]) -> list[Path]:
    """The run directories named, a directory without a result.json but with finished runs below it (a sweep
    directory) standing for those runs."""
    out = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise StatsError(f"run directory {path} does not exist: pass --run with a student run_dir "
                             f"(it holds result.json)")
        if (path / RESULT).is_file() or (path / PREDICTIONS).is_file():
            out.append(path)
            continue
        below = sorted(p.parent for p in path.glob(f"*/{RESULT}"))
        if not below:
            raise StatsError(f"{path} holds no {RESULT} (and no run directories with one): finish the run with "
                             f"`distill train-student`, or pass its student.run_dir")
        out += below
    return out


def run_names(dirs: list[Path]) -> list[str]:
    """Each run's directory name, or its whole path where two names clash."""
    names = [d.name for d in dirs]
    return [d.name if names.count(d.name) == 1 else str(d) for d in dirs]


def val_predictions(run_dir: Path, root, cache_path: str) -> tuple[dict[str, np.ndarray], str]:
    """({head: predictions [Sv, Pv], -1 where none}, source file name) of one run on the cache's val split.
    A run with a result.json must have been trained from this very cache."""
    layout = cache.layout_of(root, "val")
    shape = (layout.shards, layout.positions)
    result = json.loads((run_dir / RESULT).read_text()) if (run_dir / RESULT).is_file() else None
    if result is not None and result.get("cache_fingerprint") != root.attrs["fingerprint"]:
        raise StatsError(f"{run_dir} was trained from a cache with fingerprint {result.get('cache_fingerprint')}, "
                         f"not from {cache_path} (fingerprint {root.attrs['fingerprint']}): pass the run's own cache "
                         f"with --cache, or leave this run out")
    file = run_dir / PREDICTIONS
    if file.is_file():
        with np.load(file) as data:
            missing = [h for h in HEADS if h not in data]
            if missing:
                raise StatsError(f"{file} lacks the arrays {missing}: it needs {list(HEADS)} shaped {shape}")
            preds = {h: data[h].astype(np.int64) for h in HEADS}
        for head, values in preds.items():
            if values.shape != shape:
                raise StatsError(f"{file}: array {head!r} has shape {values.shape} but the cache {cache_path} has "
                                 f"{shape} val (shards, positions): the run was evaluated on other val shards")
        return preds, PREDICTIONS
    return _predict_from_checkpoint(run_dir, result, root, cache_path, shape), CHECKPOINT


@torch.inference_mode()
def _predict_from_checkpoint(run_dir: Path, result: dict, root, cache_path: str,
                             shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Evaluate the run's checkpoint on the val shards its config names (they must be the cache's)."""
    ckpt = run_dir / CHECKPOINT
    if not ckpt.is_file():
        raise StatsError(f"{run_dir} has a {RESULT} but no {CHECKPOINT} to evaluate: restore the checkpoint, or "
                         f"re-run the student")
    try:
        m = from_dict(result["config"])
    except ManifestError as e:
        raise StatsError(f"{run_dir / RESULT}: its config is not a valid run spec any more ({e}); write the run's "
                         f"{PREDICTIONS} with the code that trained it, or leave this run out") from None
    shardlist = data_shardlist(m, "val")
    cached = [tuple(entry) for entry in root.attrs["shards"]["val"]]
    listed = [(Path(s.url).name, s.samples, s.sha256) for s in shardlist.shards]
    if listed != cached:
        raise StatsError(f"{run_dir}: its data.val ({m.data.val}) lists other val shards than the cache "
                         f"{cache_path} was built from: run the statistics where the run's data paths resolve")
    student = create_student(m.student, len(root.attrs["classes"]))
    try:  # weights_only: a pickle planted in a run directory is refused, never run
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise StatsError(f"{ckpt} holds more than tensors and plain data, so it was not loaded (no pickle from a "
                         f"run directory is executed): {str(e).splitlines()[0]}. Retrain the run, or write its "
                         f"{PREDICTIONS} with the code that trained it") from None
    student.model.load_state_dict(state["model"])
    student.model.eval()
    preds = {h: np.full(shape, -1, np.int64) for h in HEADS}
    size = m.student.img_size
    for shard in range(len(shardlist.shards)):
        samples = list(read_shard(shardlist, shard, on_error=m.data.on_error))
        for start in range(0, len(samples), EVAL_BATCH):
            batch = samples[start:start + EVAL_BATCH]
            x = torch.from_numpy(np.stack([views.eval_view(s.image, size, student.crop_pct) for s in batch]))
            cls_logits, dist_logits = heads(student.model, normalize(x, student.mean, student.std))
            positions = [s.pos for s in batch]
            for head, logits in zip(HEADS, (cls_logits, dist_logits, cls_logits + dist_logits)):
                preds[head][shard, positions] = logits.argmax(1).numpy()
    return preds


def disagreement(predictions: dict[str, np.ndarray]) -> dict:
    """DeiT's Table 4: the share of samples on which each pair of predictors differs."""
    names = list(predictions)
    matrix = [[rate(predictions[a] != predictions[b]) for b in names] for a in names]
    return {"labels": names, "matrix": matrix}


# --------------------------------------------------------------------------------------------- everything


def compute(cache_path: str, runs: list[str | Path] = (), progress: bool = False) -> dict:
    """Every statistic of the cache at `cache_path` and of the given run directories. `progress`: a bar over
    the complete units on a terminal (none in logs)."""
    root = cache.open_cache(cache_path)
    dirs = run_dirs(list(runs))
    classes = list(root.attrs["classes"])
    num_classes, top_k = len(classes), cache.layout_of(root, "train").top_k
    units = sum(int(cache.done_units(root, split).sum()) for split in cache.SPLITS)
    with tqdm(total=units, unit="unit", desc="stats", disable=None if progress else True) as bar:
        train = train_statistics(root, bar)
        val = val_answers(root, bar)
    present, labels, teacher = val["present"], val["labels"], val["top1"]
    out = {
        "cache": {"path": cache_path, "fingerprint": root.attrs["fingerprint"],
                  "teacher": root.attrs["teacher"].get("model"), "top_k": top_k, "num_classes": num_classes,
                  "classes": classes, "epochs": cache.layout_of(root, "train").epochs,
                  "units": {"train": train.pop("units"), "val": val["units"]}},
        "train": train,
        "val": {"samples": int(present.sum()),
                "teacher_top1": rate(teacher[present] == labels[present]),
                "mass": _mass_summary(val["mass"]),
                "entropy": distribution(val["entropy"], 0.0, np.log(num_classes)),
                "per_class": {"samples": np.bincount(labels[present], minlength=num_classes).tolist(),
                              "teacher_top1": per_class_rate(teacher[present] == labels[present], labels[present],
                                                             num_classes)}},
        "k": k_verdict(train["mass"], top_k, num_classes),
        "runs": {},
    }
    table = {"ground truth": labels, "teacher": teacher}
    usable = present.copy()
    for name, run_dir in zip(run_names(dirs), dirs):
        preds, source = val_predictions(run_dir, root, cache_path)
        usable &= np.all([preds[h] >= 0 for h in HEADS], axis=0)
        table |= {f"{name} {head}": preds[head] for head in HEADS}
        out["runs"][name] = {"dir": str(run_dir), "source": source, "preds": preds}
    for name, run in out["runs"].items():
        preds = run.pop("preds")
        run["samples"] = int(usable.sum())
        run["top1"] = {h: rate(preds[h][usable] == labels[usable]) for h in HEADS}
        run["agree"] = {h: rate(preds[h][usable] == teacher[usable]) for h in HEADS}
        run["per_class_agree"] = {h: per_class_rate(preds[h][usable] == teacher[usable], labels[usable], num_classes)
                                  for h in HEADS}
    out["disagreement"] = disagreement({k: v[usable] for k, v in table.items()}) | {"samples": int(usable.sum())}
    return out


# --------------------------------------------------------------------------------------------- the table


def _pct(value: float | None) -> str:
    return "   -  " if value is None else f"{100 * value:6.2f}"


def format_table(stats: dict) -> str:
    """The statistics as a readable plain-text report (percentages)."""
    c, train, val = stats["cache"], stats["train"], stats["val"]
    units = c["units"]
    lines = [f"teacher cache {c['path']} (fingerprint {c['fingerprint']}, teacher {c['teacher']}, "
             f"K={c['top_k']} of {c['num_classes']} classes, {c['epochs']} cached epochs)",
             f"complete units used: train {units['train']['done']}/{units['train']['total']}, "
             f"val {units['val']['done']}/{units['val']['total']}", ""]

    def dist_cells(mass: dict, entropy: dict) -> str:
        if not mass.get("count"):
            return ""
        q, e = mass["quantiles"], entropy["quantiles"]
        return (f"{q['0.5']:8.4f} {q['0.05']:8.4f} {100 * mass['below_threshold']:8.2f}% "
                f"{e['0.5']:9.3f} {e['0.95']:9.3f}")

    lines.append(f"{'teacher on cached views':26} {'views':>7} {'top-1 %':>7}  {'mass p50':>8} {'mass p5':>8} "
                 f"{'<' + str(LOW_MASS):>9} {'H p50':>9} {'H p95':>9}")
    for e in train["by_epoch"]:
        lines.append(f"{'  train epoch ' + str(e['epoch']):26} {e['views']:7d} {_pct(e['teacher_top1']):>7}  "
                     + dist_cells(e["mass"], e["entropy"]))
    lines.append(f"{'  train, all epochs':26} {train['views']:7d} {_pct(train['teacher_top1']):>7}  "
                 + dist_cells(train["mass"], train["entropy"]))
    lines.append(f"{'  val':26} {val['samples']:7d} {_pct(val['teacher_top1']):>7}  "
                 + dist_cells(val["mass"], val["entropy"]))
    lines += ["  (train top-1 is against the dominant label of each mixed view; mass = probability held by the "
              "top-K; H = entropy in nats)", f"K: {stats['k']['message']}", ""]

    runs = stats["runs"]
    per_class = val["per_class"]
    tags = [f"run {i}" for i in range(1, len(runs) + 1)]
    lines += [f"{'per class (val)':16} {'samples':>7} {'teacher':>7}" + "".join(f" {tag:>11}" for tag in tags),
              f"{'':16} {'':7} {'top-1 %':>7}" + "".join(f" {'joint=T %':>11}" for _ in runs)]
    shown = range(len(c["classes"]))
    if len(shown) > MAX_CLASS_ROWS:
        rates = [2.0 if r is None else r for r in per_class["teacher_top1"]]
        shown = sorted(np.argsort(rates, kind="stable")[:MAX_CLASS_ROWS].tolist())
        lines.append(f"  (the {MAX_CLASS_ROWS} classes of {len(rates)} with the lowest teacher top-1; all are in "
                     f"stats.json)")
    for i in shown:
        name = c["classes"][i]
        lines.append(f"  {name[:14]:14} {per_class['samples'][i]:7d} {_pct(per_class['teacher_top1'][i]):>7}"
                     + "".join(f" {_pct(run['per_class_agree']['joint'][i]):>11}" for run in runs.values()))
    if runs:
        width = max(len(name) for name in runs) + 8
        lines += ["", f"{'student runs (val %)':{width}} {'top-1 class':>11} {'dist':>7} {'joint':>7} "
                      f"{'agree class':>11} {'dist':>7} {'joint':>7}  predictions from"]
        for tag, (name, run) in zip(tags, runs.items()):
            t, a = run["top1"], run["agree"]
            lines.append(f"  {tag + ': ' + name:{width - 2}} {_pct(t['class']):>11} {_pct(t['dist']):>7} "
                         f"{_pct(t['joint']):>7} {_pct(a['class']):>11} {_pct(a['dist']):>7} {_pct(a['joint']):>7}  "
                         f"{run['source']}")
    table = stats["disagreement"]
    labels = table["labels"]
    width = max(len(f"[{i}] {label}") for i, label in enumerate(labels)) + 2
    lines += ["", f"disagreement on val, % of {table['samples']} samples (DeiT Table 4)",
              " " * (width + 2) + "".join(f" {f'[{j}]':>6}" for j in range(len(labels)))]
    for i, (label, row) in enumerate(zip(labels, table["matrix"])):
        lines.append(f"  {f'[{i}] {label}':{width}}" + "".join(f" {_pct(v):>6}" for v in row))
    return "\n".join(lines)
