"""Section 1, student speedup on the digits: images/s of the training loop (`pipeline.train.train`) from the
cache, against the same loop with no distillation (the cost floor, same data path) and with the teacher run
online on the same views; plus the teacher-forward : student-step cost ratio of the pair on pre-made batches.
A small-scale check of the loop; the honest comparison with timm's own input path is the 224 px section."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.markdown import met, num, table
from benchmarks.settings import Settings
from benchmarks.timing import interleave, seconds_per_call, summary
from pipeline.distributed import World
from pipeline.losses import deit_loss, mixed_target
from pipeline.manifest import Manifest
from pipeline.shards import load_shardlist
from pipeline.student import create_student
from pipeline.teacher import forward, load_teacher, normalize, pick_device


def model_steps(m: Manifest, s: Settings, device: torch.device) -> dict[str, Callable[[], float]]:
    """Measures of the seconds per image of one student train step (forward, DeiT hard loss, backward,
    AdamW) and of one teacher forward, on pre-made batches of student.batch_size (no data path)."""
    from timm.optim import create_optimizer_v2

    num_classes = len(load_shardlist(m.data.train).classes)
    gen = torch.Generator().manual_seed(0)
    b = m.student.batch_size
    student_model = create_student(m.student, num_classes)
    model = student_model.model.to(device)
    optimizer = create_optimizer_v2(model, opt=m.student.optim.name, lr=m.student.optim.lr,
                                    weight_decay=m.student.optim.weight_decay)
    teacher = load_teacher(m.teacher, num_classes, device)
    student_u8 = torch.randint(0, 256, (b, m.student.img_size, m.student.img_size, 3), dtype=torch.uint8, generator=gen)
    teacher_u8 = torch.randint(0, 256, (b, m.teacher.img_size, m.teacher.img_size, 3), dtype=torch.uint8, generator=gen)
    labels = torch.randint(num_classes, (b,), generator=gen).to(device)
    k = m.cache.top_k
    answers = {"topk_logprobs": (torch.randn(b, k, generator=gen).sort(1, descending=True).values - 3).half().to(device),
               "topk_ids": torch.stack([torch.randperm(num_classes, generator=gen)[:k] for _ in range(b)]).to(device),
               "log_leftover": torch.full((b,), -2.0).to(device)}
    target = mixed_target(labels, labels.roll(1), torch.full((b,), 0.7, device=device), num_classes,
                          m.student.smoothing)

    def step():
        x = normalize(student_u8.to(device), student_model.mean, student_model.std)
        cls_logits, dist_logits = model(x)
        loss = deit_loss(cls_logits, dist_logits, target, answers, "hard", m.student.alpha, m.student.tau)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def per_image(fn):
        return lambda: seconds_per_call(fn, s.model_batches) / b

    return {"student_step_s": per_image(step),
            "teacher_forward_s": per_image(lambda: forward(teacher, teacher_u8, device))}


def _loop_rate(run_dir: Path) -> float:
    """The median of a run's logged per-step images/s, the first (warm-up) step left out: a step that a
    neighbouring process slowed down does not move it."""
    rates = [json.loads(line)["images_per_s"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "step"][1:]
    if not rates:
        raise RuntimeError(f"{run_dir}: the bench's student run logged fewer than two steps; give it more data")
    return statistics.median(rates)


def measure(work: Path, m: Manifest, s: Settings) -> dict:
    """The training loop (`pipeline.train.train`) three ways, each in a fresh run directory: from the cache
    (the manifest's distillation mode), with no distillation (mode `none`, same data path: the floor), and
    with the teacher online on the same views; interleaved with the student step and the teacher forward
    on pre-made batches, so the ideal speedup (t_s + t_t) / t_s comes from the same moments. Ratios are
    ratios of the medians over the repetitions."""
    from pipeline.train import train

    device = pick_device(m.student.device)
    modes = {"no_distillation": ("none", "cache"), "cached": (m.student.distillation, "cache"),
             "online": (m.student.distillation, "online")}
    counter = iter(range(10**6))

    def loop(mode: str) -> Callable[[], float]:
        distillation, answers = modes[mode]

        def measure():
            run_dir = work / "runs" / f"{mode}-{next(counter)}"
            spec = replace(m, student=replace(m.student, distillation=distillation, run_dir=str(run_dir)))
            train(spec, World(0, 1, None), answers=answers, progress=False)
            return _loop_rate(run_dir)
        return measure

    runs = interleave({mode: loop(mode) for mode in modes} | model_steps(m, s, device), s.reps)
    med = {name: statistics.median(values) for name, values in runs.items()}
    speedup = med["cached"] / med["online"]
    ideal = 1.0 + med["teacher_forward_s"] * med["cached"]  # (t_s + t_t) / t_s with t_s = 1 / cached rate
    return {name: summary(values) for name, values in runs.items()} | {
        "cached_vs_floor": med["cached"] / med["no_distillation"],
        "online_speedup": speedup, "ideal_speedup": ideal, "share_of_ideal": speedup / ideal,
        "teacher_to_student": med["teacher_forward_s"] / med["student_step_s"],
        "distillation": m.student.distillation, "batch_size": m.student.batch_size, "device": str(device),
        "workers": m.student.workers,
        "student": {"model": m.student.model, "model_args": m.student.model_args, "img_size": m.student.img_size,
                    "patch_size": m.student.patch_size},
        "teacher": {"model": m.teacher.model, "model_args": m.teacher.model_args, "img_size": m.teacher.img_size},
    }


def markdown(st: dict) -> list[str]:
    floor, share = st["cached_vs_floor"], st["share_of_ideal"]
    rows = [
        ["no distillation (floor)", num(st["no_distillation"]["median"]), "1",
         "Both heads learn the ground truth; the data path still reads the cache: the fastest the loop can go."],
        [f"from the cache ({st['distillation']})", num(st["cached"]["median"]), num(floor),
         f"Reading the teacher's top-K answers and the distillation loss cost {num(max(0.0, 1 - floor) * 100, 2)}% "
         f"of the floor's rate" + (" (within noise)." if floor >= 0.98 else ".")],
        ["teacher online (same views)", num(st["online"]["median"]),
         num(st["online"]["median"] / st["no_distillation"]["median"]),
         f"The online teacher makes the loop {num(st['online_speedup'])}x slower than the cached one; the teacher's "
         f"forward alone predicts {num(st['ideal_speedup'])}x, so the cache delivers {num(share * 100, 3)}% of the "
         f"ideal saving" + (" (the online loop loses more than the teacher's forward)." if share > 1.02 else ".")],
    ]
    return (["## 1. Student speedup", "",
             f"Student `{st['student']['model']}` {st['student']['model_args']} at {st['student']['img_size']} px, patch "
             f"{st['student']['patch_size']}; teacher `{st['teacher']['model']}` {st['teacher']['model_args']} at "
             f"{st['teacher']['img_size']} px, randomly initialised (timing only); batch {st['batch_size']}, loader "
             f"workers {st['workers']}, device {st['device']}. On pre-made batches, in the same interleaved "
             f"repetitions: student train step {num(st['student_step_s']['median'] * 1e3)} ms/image, teacher forward "
             f"{num(st['teacher_forward_s']['median'] * 1e3)} ms/image: a teacher forward costs "
             f"{num(st['teacher_to_student'])} student steps (RegNetY-16GF vs DeiT-Ti: about 4). Loop rates are "
             f"the median per-step images/s of `pipeline.train.train` (warm-up step left out), then the median over "
             f"the repetitions; ratios are ratios of those medians.", ""]
            + table(["loop", "images/s", "vs floor", "interpretation"], rows))


def goals(st: dict) -> list[list[str]]:
    return [["1a", "digits: student loop from the cache / without distillation (images/s ratio)",
             num(st["cached_vs_floor"]), ">= 0.95", met(st["cached_vs_floor"] >= 0.95)],
            ["1b", "digits: online-teacher time / cached time, as a share of the ideal (t_s + t_t) / t_s",
             f"{num(st['online_speedup'])} of {num(st['ideal_speedup'])} = {num(st['share_of_ideal'])}",
             ">= 0.9", met(st["share_of_ideal"] >= 0.9)]]
