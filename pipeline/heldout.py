"""The held-out test split: every finished run (the teacher, each student) is evaluated on it once, after
training, and nothing is chosen by it; settings are chosen on the validation split (`data.val`).

Both models see timm's eval view (`views.eval_view`) of each test image at their own resolution and
crop_pct, exactly as the cache's val answers and the students' val evaluation do. Predictions are returned
per sample, so accuracy and agreement with the teacher come from the same arrays.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline import views
from pipeline.manifest import TeacherCfg
from pipeline.manifest_loader import from_dict
from pipeline.reader import read_shard
from pipeline.shards import load_shardlist
from pipeline.student import create_student, heads
from pipeline.teacher import load_teacher, normalize
from pipeline.train import CHECKPOINT, RESULT

EVAL_BATCH = 500
HEADS = ("class", "dist", "joint")


class TestSplit:
    """The test images decoded once; eval views are rendered once per (size, crop_pct)."""

    def __init__(self, shardlist_path: str):
        shardlist = load_shardlist(shardlist_path)
        self.path, self.classes = shardlist_path, list(shardlist.classes)
        samples = [s for shard in range(len(shardlist.shards)) for s in read_shard(shardlist, shard)]
        self.images = [s.image for s in samples]
        self.labels = np.array([s.label for s in samples], dtype=np.int64)
        self._views: dict[tuple[int, float], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def views(self, size: int, crop_pct: float) -> torch.Tensor:
        key = (size, crop_pct)
        if key not in self._views:
            self._views[key] = torch.from_numpy(np.stack([views.eval_view(im, size, crop_pct) for im in self.images]))
        return self._views[key]


@torch.inference_mode()
def _argmax(forward, x: torch.Tensor, mean, std) -> list[np.ndarray]:
    """Batched argmax of each output of `forward` (a tuple of logits) over uint8 views [N, H, W, 3]."""
    outputs = [forward(normalize(x[i:i + EVAL_BATCH], mean, std)) for i in range(0, len(x), EVAL_BATCH)]
    return [torch.cat([o[j] for o in outputs]).argmax(1).numpy() for j in range(len(outputs[0]))]


def teacher_predictions(cfg: TeacherCfg, test: TestSplit) -> np.ndarray:
    teacher = load_teacher(cfg, len(test.classes))
    (preds,) = _argmax(lambda x: (teacher.model(x),), test.views(cfg.img_size, teacher.crop_pct), teacher.mean, teacher.std)
    return preds


def student_predictions(run_dir: str | Path, test: TestSplit) -> dict[str, np.ndarray]:
    """{head: predictions} of a finished run's final weights (its result.json names its config)."""
    run_dir = Path(run_dir)
    m = from_dict(json.loads((run_dir / RESULT).read_text())["config"])
    student = create_student(m.student, len(test.classes))
    student.model.load_state_dict(torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=True)["model"])
    student.model.eval()

    def forward(x):
        cls_logits, dist_logits = heads(student.model, x)
        return cls_logits, dist_logits, cls_logits + dist_logits

    preds = _argmax(forward, test.views(m.student.img_size, student.crop_pct), student.mean, student.std)
    return dict(zip(HEADS, preds))


def scores(preds: dict[str, np.ndarray], labels: np.ndarray, teacher: np.ndarray) -> dict[str, float]:
    """top1_<head> against the labels and agree_<head> with the teacher's predictions."""
    out = {f"top1_{h}": float((p == labels).mean()) for h, p in preds.items()}
    return out | {f"agree_{h}": float((p == teacher).mean()) for h, p in preds.items()}
