"""Stage 2's loop: equivalence of cached and online teacher answers, exact resume after SIGKILL, the
fingerprint check, evaluation against an independent computation, and its error paths."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline import cache, views
from pipeline.evaluate import Evaluator
from pipeline.manifest import ManifestError
from pipeline.reader import read_shard
from pipeline.shards import load_shardlist
from pipeline.student_data import open_train_set
from pipeline.student import create_student, heads
from pipeline.teacher import load_teacher, normalize
from pipeline.train import METRICS, RESULT, NonFiniteLossError, cached_answers, train
from stages.train_student import train_student

torch.set_num_threads(1)  # two busy cores: a second intra-op thread only spins

REPO = Path(__file__).resolve().parents[1]


def _records(run_dir, event="step"):
    lines = (Path(run_dir) / METRICS).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def _losses(run_dir):
    return [(r["step"], r["loss"], r["base"], r["distill"], r["lr"]) for r in _records(run_dir)]


# --------------------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_cached_answers_give_the_online_teachers_losses(tiny_cache, tmp_path, mode):
    """K = class count: training from the cache follows training with the teacher online on the same
    replayed views, step by step, up to the float16 rounding of the stored logits."""
    overrides = (f"student.distillation={mode}", "student.alpha=0.7", "student.tau=2.0", "student.epochs=1",
                 "student.verify_sample=0", "student.optim.lr=0.01", "student.sched.warmup_epochs=0")
    m = tiny_cache.manifest(*overrides, run_dir=tmp_path / "cached")
    assert m.cache.top_k == 10  # every class
    train(m, progress=False)
    train(tiny_cache.manifest(*overrides, run_dir=tmp_path / "online"), answers="online", progress=False)
    cached, online = _records(tmp_path / "cached"), _records(tmp_path / "online")
    assert len(cached) == len(online) == 12
    # the stored log-probabilities (up to about -10) carry float16's relative rounding of 2**-11; the losses move
    # by about 1e-4 relative, while an answer for another view would move them by tenths
    for part in ("loss", "base", "distill"):
        a = np.array([r[part] for r in cached])
        b = np.array([r[part] for r in online])
        assert a.min() > 0.1, part
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=0, err_msg=part)
    if mode == "hard":  # the argmax survives float16 rounding: nothing differs at all
        assert [r["loss"] for r in cached] == [r["loss"] for r in online]


# --------------------------------------------------------------------------------------------- resume


def test_resume_after_sigkill_continues_with_identical_losses(tiny_cache, tmp_path):
    overrides = ("student.epochs=4", "student.ckpt_every=5", "student.ema=0.9", "student.optim.clip_grad=1.0")
    with pytest.warns(UserWarning, match=r"student.epochs=4 exceeds the 2 cached epochs: student epoch e replays "
                                         r"cache epoch e % 2, so the epochs cycle"):
        expected = train(tiny_cache.manifest(*overrides, run_dir=tmp_path / "whole"), progress=False)

    killed = tmp_path / "killed"
    args = ["--manifest", "manifests/tiny.yaml", "--no-progress"]
    for override in tiny_cache.manifest_overrides(run_dir=killed) + list(overrides):
        args += ["--set", override]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", "from stages.train_student import train_student; train_student()",
                             *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = killed / "last.pth"
    deadline = time.time() + 120
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    done = torch.load(checkpoint, weights_only=True)["position"]["step"]
    assert 5 <= done < expected["steps"]

    with pytest.warns(UserWarning, match="cycle"):
        resumed = train(tiny_cache.manifest(*overrides, run_dir=killed), progress=False)
    assert [r["step"] for r in _records(killed)] == list(range(1, expected["steps"] + 1))
    assert _losses(killed) == _losses(tmp_path / "whole")
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "config")}  # noqa: E731
    assert strip(resumed) == strip(expected)
    assert _records(killed, "eval") == _records(tmp_path / "whole", "eval")


def test_resume_from_an_epoch_end_checkpoint(tiny_cache, tmp_path):
    """A crash after the end of epoch 0 (its checkpoint and evaluation written): the resumed run starts from
    the epoch's end, evaluates epoch 0 again in place of the old record, and goes on as if nothing happened."""
    overrides = ("student.epochs=2", "student.ckpt_every=12")
    expected = train(tiny_cache.manifest(*overrides, run_dir=tmp_path / "whole"), progress=False)
    assert expected["steps_per_epoch"] == 12
    cached = cached_answers(torch.device("cpu"))
    calls = []

    def crash_at_step_13(batch):
        calls.append(1)
        if len(calls) == 13:
            raise KeyboardInterrupt
        return cached(batch)

    crashed = tiny_cache.manifest(*overrides, run_dir=tmp_path / "crashed")
    with pytest.raises(KeyboardInterrupt):
        train(crashed, answers=crash_at_step_13, progress=False)
    assert len(_records(tmp_path / "crashed", "eval")) == 1
    resumed = train(crashed, progress=False)
    assert _losses(tmp_path / "crashed") == _losses(tmp_path / "whole")
    assert len(_records(tmp_path / "crashed")) == 24
    assert _records(tmp_path / "crashed", "eval") == _records(tmp_path / "whole", "eval")
    assert resumed["top1_joint"] == expected["top1_joint"]


@pytest.mark.filterwarnings("ignore:This DataLoader will create", "ignore:student.epochs=3 exceeds")
def test_persistent_loader_workers_resume_mid_epoch_with_identical_losses(tiny_cache, tmp_path, monkeypatch):
    """With loader workers the run keeps them for all its epochs (persistent, each epoch's first batch begun
    ahead); its losses equal those of a run whose workers start anew each epoch, a run stopped mid-epoch by an
    error stops its workers, and resumed it continues with identical losses."""
    import multiprocessing

    from pipeline.student_data import TrainSet

    overrides = ("student.workers=2", "student.epochs=3", "student.ckpt_every=5")
    whole = train(tiny_cache.manifest(*overrides, run_dir=tmp_path / "whole"), progress=False)
    steps = whole["steps_per_epoch"]
    assert not multiprocessing.active_children()

    open_loader = TrainSet.open_loader
    with monkeypatch.context() as patch:  # the loader of every epoch started anew, as before persistent workers
        patch.setattr(TrainSet, "open_loader", lambda self, rank: open_loader(self, rank, persistent=False))
        train(tiny_cache.manifest(*overrides, run_dir=tmp_path / "restarted"), progress=False)
    assert _losses(tmp_path / "restarted") == _losses(tmp_path / "whole")

    cached = cached_answers(torch.device("cpu"))
    calls = []

    def crash_mid_epoch_1(batch):
        calls.append(1)
        if len(calls) == steps + 8:
            raise KeyboardInterrupt
        return cached(batch)

    crashed = tiny_cache.manifest(*overrides, run_dir=tmp_path / "crashed")
    with pytest.raises(KeyboardInterrupt):
        train(crashed, answers=crash_mid_epoch_1, progress=False)
    assert not multiprocessing.active_children()  # the workers stopped with the error
    position = torch.load(tmp_path / "crashed" / "last.pth", weights_only=True)["position"]
    assert position["epoch"] == 1 and 0 < position["batch"] < steps  # resumed mid-epoch
    train(crashed, progress=False)
    assert _losses(tmp_path / "crashed") == _losses(tmp_path / "whole")
    assert len(_records(tmp_path / "crashed")) == 3 * steps


def test_resume_refuses_a_changed_run_spec(tiny_cache, tmp_path):
    train(tiny_cache.manifest("student.epochs=1", run_dir=tmp_path), progress=False)
    with pytest.raises(ManifestError, match=r"last.pth is a checkpoint of another run: student.optim.lr was "
                                            r"0.001, the run spec now has 0.002"):
        train(tiny_cache.manifest("student.epochs=1", "student.optim.lr=0.002", run_dir=tmp_path), progress=False)


# --------------------------------------------------------------------------------------------- checks before training


def _other_teacher(tiny_cache, tmp_path):
    state = torch.load(tiny_cache.checkpoint, weights_only=True)
    next(iter(state["model"].values())).add_(1.0)
    torch.save(state, tmp_path / "other-teacher.pt")
    return tmp_path / "other-teacher.pt"


def _other_classes(tiny_cache, tmp_path):
    data = json.loads(Path(tiny_cache.train).read_text())
    data["classes"] = [f"digit {c}" for c in data["classes"]]
    for shard in data["shards"]:
        shard["url"] = str(Path(tiny_cache.train).parent / shard["url"])
    out = tmp_path / "shardlist.json"
    out.write_text(json.dumps(data))
    return out


MISMATCHES = {
    "seed": (lambda tc, tmp: "views.seed=7", r"seed: at seed the cache has 0, the run spec has 7.*views.seed"),
    "top_k": (lambda tc, tmp: "cache.top_k=5", r"top_k: at top_k the cache has 10, the run spec has 5.*cache.top_k"),
    "recipe": (lambda tc, tmp: "views.erasing.prob=0.5",
               r"recipe: at recipe.config.erasing.prob the cache has 0.25, the run spec has 0.5"),
    "teacher": (lambda tc, tmp: f"teacher.checkpoint={_other_teacher(tc, tmp)}",
                r"teacher: at teacher.sha256 the cache has \"[0-9a-f]{8}.*teacher.checkpoint"),
    "classes": (lambda tc, tmp: f"data.train={_other_classes(tc, tmp)}",
                r"classes: at classes\[0\] the cache has \"0\", the run spec has \"digit 0\""),
}


@pytest.mark.parametrize("field", sorted(MISMATCHES))
def test_fingerprint_mismatch_stops_before_the_first_step(tiny_cache, tmp_path, field):
    override, message = MISMATCHES[field]
    m = tiny_cache.manifest(override(tiny_cache, tmp_path), run_dir=tmp_path / "run")
    with pytest.raises(cache.CacheError, match=rf"was built with a different {message}"):
        train(m, progress=False)
    assert not (tmp_path / "run" / METRICS).exists()


def test_the_command_reports_errors_without_a_traceback(tiny_cache, tmp_path):
    args = ["--manifest", "manifests/tiny.yaml", "--no-progress", "--set", "cache.top_k=5"]
    for override in tiny_cache.manifest_overrides(run_dir=tmp_path):
        args += ["--set", override]
    outcome = CliRunner().invoke(train_student, args)
    assert outcome.exit_code == 1
    assert outcome.output.startswith("Error: cache ") and "different top_k" in outcome.output
    assert "Traceback" not in outcome.output


def test_non_finite_loss_names_the_step_before_the_optimizer_step(tiny_cache, tmp_path):
    calls = []

    def poisoned(batch):  # the teacher's answers turn to NaN at the third step
        calls.append(1)
        logits = batch["topk_logprobs"].float()
        if len(calls) == 3:
            logits = torch.full_like(logits, float("nan"))
        return {"topk_logprobs": logits, "topk_ids": batch["topk_ids"], "log_leftover": batch["log_leftover"]}

    m = tiny_cache.manifest("student.distillation=soft", "student.ckpt_every=1", run_dir=tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 3 \(epoch 0\): loss=nan, base=[0-9.]+, "
                                                 r"distill=nan. Stopped before the optimizer step"):
        train(m, answers=poisoned, progress=False)
    assert torch.load(tmp_path / "last.pth", weights_only=True)["position"]["step"] == 2
    assert [r["step"] for r in _records(tmp_path)] == [1, 2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused(tiny_cache, tmp_path):
    with pytest.raises(ManifestError, match="student.device=cuda but no CUDA device is visible: set it to auto or cpu"):
        train(tiny_cache.manifest("student.device=cuda", run_dir=tmp_path), progress=False)


STUDENT_ERRORS = {
    "deit_tiny_distiled_patch16_224": r"student.model='deit_tiny_distiled_patch16_224' is not a timm model; "
                                      r"distilled ViTs are \[.*'deit_tiny_distilled_patch16_224'",
    "deit_tiny_patch16_224": r"student.model='deit_tiny_patch16_224' has no distillation head; pick a distilled ViT",
}


@pytest.mark.parametrize("model", sorted(STUDENT_ERRORS))
def test_student_model_errors_name_the_valid_models(tiny_cache, model):
    m = tiny_cache.manifest(f"student.model={model}")
    with pytest.raises(ManifestError, match=STUDENT_ERRORS[model]):
        create_student(m.student, 10)


def test_student_model_args_that_do_not_fit_are_named(tiny_cache):
    m = tiny_cache.manifest("student.model_args={embed_dim: 16, depth: 1, num_heads: 2, wings: 2}")
    with pytest.raises(ManifestError, match=r"student.model_args=\{.*'wings': 2\} do not fit "
                                            r"'deit_tiny_distilled_patch16_224'"):
        create_student(m.student, 10)


def test_labelled_shards_must_name_existing_shards(tiny_cache):
    root = cache.open_cache(tiny_cache.manifest().cache.path)
    open_train_set(tiny_cache.manifest("student.labelled_shards=1"), root)
    with pytest.raises(ManifestError, match=r"student.labelled_shards=99: .* has 3 shards; choose 1\.\.3"):
        open_train_set(tiny_cache.manifest("student.labelled_shards=99"), root)


# --------------------------------------------------------------------------------------------- evaluation


def test_evaluation_matches_an_independent_computation(tiny_cache):
    m = tiny_cache.manifest("student.drop_path=0.0")
    torch.manual_seed(3)
    student = create_student(m.student, 10)
    shardlist = load_shardlist(m.data.val)
    result = Evaluator(m, shardlist, student, torch.device("cpu"))(student.model)

    teacher = load_teacher(m.teacher, 10)
    samples = [s for i in range(len(shardlist.shards)) for s in read_shard(shardlist, i)]
    labels = torch.tensor([s.label for s in samples])
    x = torch.from_numpy(np.stack([views.eval_view(s.image, 16, student.crop_pct) for s in samples]))
    model = student.model.train()  # timm's training forward gives both heads (no dropout, no drop path here)
    with torch.no_grad():
        cls_logits, dist_logits = model(normalize(x, student.mean, student.std))
        joint = model.eval()(normalize(x, student.mean, student.std))  # timm's eval forward: the heads' average
        tx = torch.from_numpy(np.stack([views.eval_view(s.image, 16, teacher.crop_pct) for s in samples]))
        teacher_top1 = teacher.model(normalize(tx, teacher.mean, teacher.std)).argmax(1)
    assert result["samples"] == len(samples) == 20
    for head, logits in (("class", cls_logits), ("dist", dist_logits), ("joint", joint)):
        assert result[f"top1_{head}"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
        assert result[f"agree_{head}"] == pytest.approx((logits.argmax(1) == teacher_top1).float().mean().item())
    assert result["teacher_top1"] == pytest.approx((teacher_top1 == labels).float().mean().item())
    c, d = heads(model, normalize(x, student.mean, student.std))
    assert torch.allclose(c, cls_logits) and torch.allclose(d, dist_logits)


def test_a_val_position_without_a_teacher_answer_stops_the_evaluation(tiny_cache, tmp_path):
    shutil.copytree(tiny_cache.cache_path, tmp_path / "cache")
    cache.open_cache(str(tmp_path / "cache"), mode="r+")["val"]["digest"][0, 4] = 0
    m = tiny_cache.manifest(f"cache.path={tmp_path / 'cache'}")
    student = create_student(m.student, 10)
    evaluator = Evaluator(m, load_shardlist(m.data.val), student, torch.device("cpu"))
    with pytest.raises(cache.CacheError, match=r"val shard 0 position 4 \('digit0102'\) has no teacher answer: "
                                               r"the val shards changed since the cache was filled; rebuild"):
        evaluator(student.model)


def test_result_and_metrics(tiny_cache, tmp_path):
    m = tiny_cache.manifest("student.epochs=2", "student.sched.warmup_epochs=0", "student.eval_every=1",
                            "student.optim.lr=0.004", "student.optim.lr_batch=16", run_dir=tmp_path)
    result = train(m, progress=False)
    assert json.loads((tmp_path / RESULT).read_text())["top1_joint"] == result["top1_joint"]
    assert result["config"]["student"]["epochs"] == 2 and result["steps"] == 2 * result["steps_per_epoch"]
    assert result["student_views"]["same_pixels"] and result["student_views"]["teacher_size"] == m.teacher.img_size
    assert result["headline_head"] == "joint" and result["headline_top1"] == result["top1_joint"]  # tiny.yaml: hard
    steps = _records(tmp_path)
    assert steps[0]["lr"] == pytest.approx(0.004 * 8 / 16)  # lr x global batch / lr_batch, no warmup
    assert steps[-1]["lr"] < steps[0]["lr"]  # cosine decay
    assert all(np.isfinite([r["loss"], r["base"], r["distill"], r["images_per_s"]]).all() for r in steps)
    evals = _records(tmp_path, "eval")
    assert [(r["epoch"], r["step"]) for r in evals] == [(0, result["steps_per_epoch"]), (1, result["steps"])]
    assert {k: evals[-1][k] for k in result if k.startswith(("top1", "agree"))} == \
        {k: v for k, v in result.items() if k.startswith(("top1", "agree"))}


def test_deit_none_trains_the_class_head_alone_and_reports_it(tiny_cache, tmp_path):
    m = tiny_cache.manifest("student.epochs=1", "student.distillation=deit_none", "student.sched.warmup_epochs=0",
                            run_dir=tmp_path)
    result = train(m, progress=False)
    assert result["headline_head"] == "class" and result["headline_top1"] == result["top1_class"]
    steps = [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()]
    steps = [r for r in steps if r.get("event") == "step"]
    assert steps and all(r["distill"] == 0.0 and r["loss"] == r["base"] for r in steps)
