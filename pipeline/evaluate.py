"""Evaluation of a student on the val shards: top-1 of the class head, the distillation head and their
average (the joint prediction DeiT reports), and how often each agrees with the teacher's top-1 on the
val split, read from the cache (`val/topk_ids[..., 0]`).

The student sees timm's eval view of each image (`views.eval_view`: resize to size / crop_pct, centre
crop) at its own resolution with its own crop_pct; the teacher's cached answer is for its own eval view.
Val shards are dealt to ranks and loader workers by index; counts are summed over ranks.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset

from pipeline import cache, views
from pipeline.manifest import Manifest
from pipeline.reader import ShardList, dataloader_worker, read_shard
from pipeline.student import Student, heads
from pipeline.teacher import normalize

HEADS = ("class", "dist", "joint")


class ValViews(IterableDataset):
    """Batches of one rank's val shards: uint8 eval views [B, H, W, 3], labels [B], teacher_top1 [B]."""

    def __init__(self, m: Manifest, shardlist: ShardList, crop_pct: float, rank: int, world_size: int):
        self.m, self.shardlist, self.crop_pct = m, shardlist, crop_pct
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        worker, workers = dataloader_worker()
        root = cache.open_cache(self.m.cache.path)
        size, batch = self.m.student.img_size, self.m.student.batch_size
        shards = range(len(self.shardlist.shards))[self.rank::self.world_size][worker::workers]
        pending = []
        for shard in shards:
            slab = cache.read_slab(root, "val", None, shard, ("topk_ids", "digest"))
            for sample in read_shard(self.shardlist, shard, on_error=self.m.data.on_error):
                if slab["digest"][sample.pos] == 0:
                    raise cache.CacheError(f"cache {self.m.cache.path}: val shard {shard} position {sample.pos} "
                                           f"({sample.key!r}) has no teacher answer: the val shards changed since "
                                           f"the cache was filled; rebuild the cache")
                pending.append((views.eval_view(sample.image, size, self.crop_pct), sample.label,
                                int(slab["topk_ids"][sample.pos, 0])))
                if len(pending) == batch:
                    yield _collate(pending)
                    pending = []
        if pending:
            yield _collate(pending)


def _collate(records) -> dict[str, torch.Tensor]:
    images, labels, teacher = zip(*records)
    return {"views": torch.from_numpy(np.stack(images)), "labels": torch.tensor(labels),
            "teacher_top1": torch.tensor(teacher)}


@torch.inference_mode()
def evaluate_many(entries: list[tuple[torch.nn.Module, Student]], loader, device: torch.device) -> list[dict]:
    """`evaluate` of several models on one pass over the loader: each val batch is rendered once and every
    model (with its student's normalisation) predicts on it. Returns one result per entry."""
    modes = [model.training for model, _ in entries]
    for model, _ in entries:
        model.eval()
    counts = [torch.zeros(2 * len(HEADS) + 2, dtype=torch.float64, device=device) for _ in entries]
    for batch in loader:
        views = batch["views"].to(device)
        labels, teacher = batch["labels"].to(device), batch["teacher_top1"].to(device)
        inputs = {}
        for (model, student), total in zip(entries, counts):
            key = (student.mean, student.std)
            if key not in inputs:
                inputs[key] = normalize(views, student.mean, student.std)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                cls_logits, dist_logits = heads(model, inputs[key])
            cls_logits, dist_logits = cls_logits.float(), dist_logits.float()
            preds = (cls_logits.argmax(1), dist_logits.argmax(1), (cls_logits + dist_logits).argmax(1))
            total += torch.stack([(p == labels).sum() for p in preds] + [(p == teacher).sum() for p in preds]
                                 + [(teacher == labels).sum(), torch.tensor(len(labels), device=device)]).double()
    for (model, _), mode in zip(entries, modes):
        model.train(mode)
    results = []
    for total in counts:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
        total = total.tolist()
        n = total[-1]
        result = {f"top1_{h}": total[i] / n for i, h in enumerate(HEADS)}
        result |= {f"agree_{h}": total[len(HEADS) + i] / n for i, h in enumerate(HEADS)}
        results.append(result | {"teacher_top1": total[-2] / n, "samples": int(n)})
    return results


def evaluate(model: torch.nn.Module, student: Student, loader, device: torch.device) -> dict[str, float]:
    """Top-1 accuracy and teacher agreement of each head over the loader's batches (summed over ranks under
    torch.distributed). Returns top1_{class,dist,joint}, agree_{class,dist,joint}, teacher_top1, samples."""
    return evaluate_many([(model, student)], loader, device)[0]


class Evaluator:
    """Decides when to evaluate (every `student.eval_every` epochs and after the last; eval_every <= 0 means
    only after the last) and runs the evaluation on this rank's share of the val shards."""

    def __init__(self, m: Manifest, shardlist: ShardList, student: Student, device: torch.device,
                 rank: int = 0, world_size: int = 1):
        self.m, self.student, self.device = m, student, device
        self.dataset = ValViews(m, shardlist, student.crop_pct, rank, world_size)

    def due(self, epoch: int) -> bool:
        every, last = self.m.student.eval_every, epoch + 1 == self.m.student.epochs
        return last or (every > 0 and (epoch + 1) % every == 0)

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        return self.many([(model, self.student)])[0]

    def many(self, entries: list[tuple[torch.nn.Module, Student]]) -> list[dict]:
        """Several models on one pass over the val views (their students must share this one's crop_pct and
        img_size, which decide the views)."""
        if any(student.crop_pct != self.student.crop_pct for _, student in entries):
            raise ValueError("models evaluated on one pass must share the eval view's crop_pct")
        workers = self.m.student.workers
        loader = DataLoader(self.dataset, batch_size=None, num_workers=workers, generator=torch.Generator(),
                            prefetch_factor=2 if workers else None)
        return evaluate_many(entries, loader, self.device)
