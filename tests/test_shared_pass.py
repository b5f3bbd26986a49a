"""Students trained together on one data pass equal the same students trained alone; what a run leaves in
its directory (timm-readable checkpoints, safetensors, logs, summary.csv, config.yaml); the checks before the
first step (a corrupt chunk, a planted pickle) and the non-finite check read back without a per-step sync."""

import csv
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

from pipeline import cache, student_data
from pipeline import train as train_module
from pipeline.checkpoint import CheckpointError
from pipeline.manifest import to_dict
from pipeline.student import create_student
from pipeline.train import NonFiniteLossError, cached_answers, pass_key, train, train_shared

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
BASE = ("student.epochs=2", "student.verify_sample=0", "student.data_seed=0", "student.ckpt_every=5")
STUDENTS = {  # different modes, alphas, taus, learning rates, schedules, sizes, EMA and init seeds
    "hard": ("student.distillation=hard",),
    "soft": ("student.distillation=soft", "student.alpha=0.7", "student.tau=2.0", "student.seed=1",
             "student.ema=0.9", "student.optim.lr=0.002"),
    "none": ("student.distillation=none", "student.seed=2", "student.optim.clip_grad=1.0",
             "student.sched.warmup_epochs=0", "student.model_args={embed_dim: 24, depth: 2, num_heads: 2}"),
    "diverges": ("student.optim.lr=1.0e+6", "student.sched.warmup_epochs=0"),
}


def _records(run_dir, event="step"):
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in records if r["event"] == event]


def _weights(path):
    return load_file(path)


def test_a_shared_pass_equals_separate_runs_and_a_diverging_student_stops_alone(tiny_cache, tmp_path, monkeypatch):
    manifests = {name: tiny_cache.manifest(*BASE, *extra, run_dir=tmp_path / "shared" / name)
                 for name, extra in STUDENTS.items()}
    assert len({pass_key(m) for m in manifests.values()}) == 1
    rendered = []
    record = student_data.StudentViews._record
    monkeypatch.setattr(student_data.StudentViews, "_record",
                        lambda self, *a: rendered.append(1) or record(self, *a))
    outcomes = dict(zip(manifests, train_shared(list(manifests.values()), progress=False)))
    shared_views = len(rendered)

    alone, views_alone = {}, {}
    for name, extra in STUDENTS.items():
        rendered.clear()
        m = tiny_cache.manifest(*BASE, *extra, run_dir=tmp_path / "alone" / name)
        try:
            alone[name] = train(m, progress=False)
        except NonFiniteLossError as e:
            alone[name] = e
        views_alone[name] = len(rendered)
    # one pass renders each view once, however many students step on it
    assert shared_views == views_alone["hard"] == views_alone["none"] >= 2 * 12 * 8

    for name in ("hard", "soft", "none"):
        shared, single = tmp_path / "shared" / name, tmp_path / "alone" / name
        assert len(_records(shared)) == 24
        assert _records(shared) == _records(single), name  # every step's loss parts and lr, bit for bit
        assert _records(shared, "eval") == _records(single, "eval"), name
        files = ["model.safetensors"] + (["model_ema.safetensors"] if name == "soft" else [])
        for file in files:
            a, b = _weights(shared / file), _weights(single / file)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (name, file)
        assert outcomes[name]["top1_joint"] == alone[name]["top1_joint"]
        assert outcomes[name]["pass_runs"] == 4 and alone[name]["pass_runs"] == 1
    assert not torch.equal(_weights(tmp_path / "shared" / "hard" / "model.safetensors")["head.weight"],
                           _weights(tmp_path / "shared" / "soft" / "model.safetensors")["head.weight"])

    # the diverging student stopped at the step it stops at alone, with its error recorded; the others went on
    error = outcomes["diverges"]
    assert isinstance(error, NonFiniteLossError) and str(error) == str(alone["diverges"])
    assert str(error).startswith("non-finite loss at step 2 (epoch 0)")
    diverged = tmp_path / "shared" / "diverges"
    assert (diverged / "error.txt").read_text().startswith("NonFiniteLossError: non-finite loss at step 2")
    assert "stopped: NonFiniteLossError: non-finite loss at step 2" in (diverged / "train.log").read_text()
    assert not (diverged / "result.json").exists()


def test_students_whose_batches_differ_cannot_share_a_pass(tiny_cache, tmp_path):
    a = tiny_cache.manifest(run_dir=tmp_path / "a")
    with pytest.raises(ValueError, match=r"cannot share a data pass: their batches differ"):
        train_shared([a, tiny_cache.manifest("student.batch_size=4", run_dir=tmp_path / "b")])
    with pytest.raises(ValueError, match=r"share a run directory"):
        train_shared([a, tiny_cache.manifest("student.alpha=0.9", run_dir=tmp_path / "a")])
    # the data seed decides the batches; the init seed does not
    assert pass_key(a) != pass_key(tiny_cache.manifest("student.seed=1"))
    assert pass_key(tiny_cache.manifest("student.data_seed=0")) == \
        pass_key(tiny_cache.manifest("student.seed=1", "student.data_seed=0")) == pass_key(a)


# --------------------------------------------------------------------------------------------- the run directory


def test_checkpoints_are_read_by_timm_and_exported_to_safetensors(tiny_cache, tmp_path):
    m = tiny_cache.manifest("student.epochs=3", "student.ema=0.9", "student.verify_sample=0", run_dir=tmp_path)
    with pytest.warns(UserWarning, match="cycle"):
        result = train(m, progress=False)
    evals = _records(tmp_path, "eval")
    last = torch.load(tmp_path / "last.pth", weights_only=True)
    best = torch.load(tmp_path / "best.pth", weights_only=True)
    assert last["arch"] == m.student.model and last["position"]["step"] == result["steps"] == 36
    assert best["metric"] == last["metric"] == result["best_top1_joint"] == max(r["top1_joint"] for r in evals)
    best_eval = next(r for r in evals if r["top1_joint"] == best["metric"])
    assert best["position"]["step"] == best_eval["step"]

    def fresh():
        return create_student(m.student, 10).model

    for path, use_ema, expected in ((tmp_path / "last.pth", False, last["state_dict"]),
                                    (tmp_path / "last.pth", True, last["state_dict_ema"]),
                                    (tmp_path / "model.safetensors", False, last["state_dict"]),
                                    (tmp_path / "model_ema.safetensors", False, last["state_dict_ema"]),
                                    (tmp_path / "best.pth", False, best["state_dict"])):
        model = fresh()
        timm.models.load_checkpoint(model, str(path), use_ema=use_ema)
        got = model.state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), (path, use_ema)
    assert not all(torch.equal(last["state_dict"][k], last["state_dict_ema"][k]) for k in last["state_dict"])
    # the EMA's own evaluation is recorded beside the model's
    assert set(evals[-1]["ema"]) >= {"top1_joint", "top1_class", "top1_dist"}


def test_run_log_summary_and_config(tiny_cache, tmp_path):
    m = tiny_cache.manifest("student.epochs=2", "student.eval_every=2", "student.log.every=5",
                            "student.verify_sample=0", run_dir=tmp_path)
    train(m, progress=False)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == to_dict(m)
    log = (tmp_path / "train.log").read_text()
    assert "\r" not in log
    assert "epoch 0 step 5/24 (21%) loss " in log and "epoch 1 step 20/24 (83%)" in log and " img/s ETA " in log
    assert "epoch 1 step 24: val top-1 joint " in log and "epoch 0 step 12: val" not in log  # eval_every=2
    steps, evals = _records(tmp_path), _records(tmp_path, "eval")
    with open(tmp_path / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "train_loss", "train_base", "train_distill", "eval_top1", "eval_top1_class",
                             "eval_top1_dist", "eval_agree_joint", "lr"]
    assert [row["epoch"] for row in rows] == ["0", "1"]
    for epoch, row in enumerate(rows):
        for part in ("loss", "base", "distill"):
            mean = np.mean([r[part] for r in steps if r["epoch"] == epoch], dtype=np.float64)
            assert float(row[f"train_{part}"]) == pytest.approx(mean, rel=1e-12)
    assert rows[0]["eval_top1"] == "" and float(rows[1]["eval_top1"]) == evals[-1]["top1_joint"]


def test_a_finished_run_is_not_trained_or_timed_again(tiny_cache, tmp_path):
    m = tiny_cache.manifest("student.epochs=1", "student.verify_sample=0", run_dir=tmp_path)
    first = train(m, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = train(m, progress=False)
    assert again == json.loads((tmp_path / "result.json").read_text())
    assert again["seconds"] == first["seconds"] > 0
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.name != "train.log"} == \
        {k: v for k, v in stamps.items() if k != "train.log"}
    assert "finished already" in (tmp_path / "train.log").read_text()
    assert _records(tmp_path) and len(_records(tmp_path)) == first["steps"]


class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_planted_in_the_run_directory_is_not_executed(tiny_cache, tmp_path):
    marker = tmp_path / "executed"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"state_dict": {}, "payload": _Planted(marker)}, run_dir / "last.pth")
    with pytest.raises(CheckpointError, match=r"last.pth holds more than tensors and plain data, so it was not loaded "
                                              r"\(loading it could run code planted in it\).*Delete it"):
        train(tiny_cache.manifest("student.verify_sample=0", run_dir=run_dir), progress=False)
    assert not marker.exists()
    torch.load(run_dir / "last.pth", weights_only=False)  # what a full unpickling would have done
    assert marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(run_dir / "last.pth", weights_only=True)


# --------------------------------------------------------------------------------------------- before the first step


def test_a_corrupt_chunk_is_reported_before_the_first_step(tiny_cache, tmp_path):
    shutil.copytree(tiny_cache.cache_path, tmp_path / "cache")
    root = cache.open_cache(str(tmp_path / "cache"))
    arr = root["train"]["topk_logratios"]
    chunk = Path(cache.chunk_location(root, arr, (1, 0) + (0,) * (arr.ndim - 2)))  # read only in student epoch 1
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    m = tiny_cache.manifest(f"cache.path={tmp_path / 'cache'}", "student.verify_sample=0", run_dir=tmp_path / "run")
    with pytest.raises(cache.CacheError, match=rf"train/topk_logratios chunk \(1, 0.*\({chunk}\) is corrupt"):
        train(m, progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "last.pth").exists()


def test_a_non_finite_loss_read_back_later_still_names_its_step(tiny_cache, tmp_path, monkeypatch):
    """The accelerator's rule (the check read back every log.every steps), forced on the CPU: the error names
    the step whose loss was not finite, and no checkpoint after it is written."""
    monkeypatch.setattr(train_module, "check_interval", lambda device, every: every)
    cached, calls = cached_answers(torch.device("cpu")), []

    def poisoned(batch):
        calls.append(1)
        answers = cached(batch)
        if len(calls) == 3:
            answers = {**answers, "topk_logprobs": torch.full_like(answers["topk_logprobs"].float(), float("nan"))}
        return answers

    m = tiny_cache.manifest("student.distillation=soft", "student.ckpt_every=2", "student.log.every=4",
                            "student.verify_sample=0", run_dir=tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 3 \(found at step 4: on a GPU the check "
                                                 r"is read back every student.log.every=4 steps\)\. The updates from "
                                                 r"step 3 on were not checkpointed"):
        train(m, answers=poisoned, progress=False)
    assert torch.load(tmp_path / "last.pth", weights_only=True)["position"]["step"] == 2
    assert (tmp_path / "error.txt").read_text().startswith("NonFiniteLossError: non-finite loss at step 3")


def test_tensorboard_event_files(tiny_cache, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    m = tiny_cache.manifest("student.epochs=1", "student.log.tensorboard=true", "student.verify_sample=0",
                            run_dir=tmp_path)
    result = train(m, progress=False)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx([r["loss"] for r in _records(tmp_path)])
    assert [e.value for e in events.Scalars("eval/top1_joint")] == pytest.approx([result["top1_joint"]])


# --------------------------------------------------------------------------------------------- DDP

DDP_SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
from pipeline.distributed import world
from pipeline.manifest_loader import load
from pipeline.train import train_shared
with world() as w:
    outcomes = train_shared([load("manifests/tiny.yaml", sets) for sets in json.loads(sys.argv[1])], w,
                            progress=False)
    assert not any(isinstance(o, Exception) for o in outcomes), outcomes
"""


def _torchrun(tmp_path, students):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(29500 + os.getpid() % 1000), str(script), json.dumps(students)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_under_torchrun_each_student_of_a_pass_all_reduces_its_own_gradients(tiny_cache, tmp_path):
    """Two ranks (gloo), two students on one pass: each is wrapped in its own DDP, and ends with the losses and
    weights of the same student trained alone on the same two ranks."""
    common = [o for o in tiny_cache.manifest_overrides() if not o.startswith("student.run_dir")]
    common += ["student.epochs=1", "student.verify_sample=0", "student.data_seed=0"]
    extra = {"hard": ["student.distillation=hard"],
             "soft": ["student.distillation=soft", "student.seed=1", "student.optim.lr=0.002"]}

    def students(where):
        return [common + sets + [f"student.run_dir={tmp_path / where / name}"] for name, sets in extra.items()]

    _torchrun(tmp_path, students("shared"))
    for one in students("alone"):
        _torchrun(tmp_path, [one])
    for name in extra:
        shared, alone = tmp_path / "shared" / name, tmp_path / "alone" / name
        assert _records(shared) and _records(shared) == _records(alone), name
        a, b = _weights(shared / "model.safetensors"), _weights(alone / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name
        result = json.loads((shared / "result.json").read_text())
        assert result["config"]["student"]["distillation"] == name
        assert result["steps_per_epoch"] <= 6  # each rank reads half the shards (one rank alone takes 12 steps)
