"""`distill demo` on the tiny twin: students of two modes and two seeds from one cache, each scored once on a
held-out test split; the summary's numbers against timm's own eval transform and forward."""

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from timm.data import create_transform

from pipeline.manifest_loader import from_dict
from pipeline.reader import read_shard
from pipeline.shards import load_shardlist
from pipeline.student import create_student
from pipeline.teacher import load_teacher
from stages.demo import demo
from tiny import TRAIN_SHARDS, VAL_SHARDS, write_shards

REPO = Path(__file__).resolve().parents[1]


def _timm_predictions(model, pretrained_cfg, size, images):
    """argmax of timm's eval forward over timm's own eval transform (resize, centre crop, normalise)."""
    transform = create_transform(input_size=(3, size, size), crop_pct=pretrained_cfg["crop_pct"],
                                 interpolation="bicubic", mean=pretrained_cfg["mean"], std=pretrained_cfg["std"])
    with torch.no_grad():
        return model.eval()(torch.stack([transform(im) for im in images])).argmax(1).numpy()


@pytest.mark.slow
def test_demo_summary_matches_timm_on_the_test_split(tiny_cache, tmp_path, monkeypatch):
    test_list = write_shards(tmp_path / "test", (30,), sum(TRAIN_SHARDS) + sum(VAL_SHARDS))  # unseen digits
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.chdir(REPO)
    args = ["--manifest", "manifests/tiny.yaml", "--out", str(tmp_path / "demo"), "--seeds", "0,1",
            "--modes", "none,hard", "--jobs", "1", "--timing-epochs", "1", "--no-progress",
            "--set", f"data.test={test_list}"]
    for override in tiny_cache.manifest_overrides():
        if not override.startswith("student.run_dir"):
            args += ["--set", override]
    outcome = CliRunner().invoke(demo, args)
    assert outcome.exit_code == 0, outcome.output
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())

    shardlist = load_shardlist(test_list)
    samples = [s for shard in range(len(shardlist.shards)) for s in read_shard(shardlist, shard)]
    images, labels = [Image.fromarray(s.image) for s in samples], np.array([s.label for s in samples])
    m = tiny_cache.manifest()
    teacher = load_teacher(m.teacher, 10)
    teacher_preds = _timm_predictions(teacher.model, teacher.model.pretrained_cfg, m.teacher.img_size, images)
    assert summary["teacher_acc"] == pytest.approx((teacher_preds == labels).mean(), abs=1.01 / len(labels))
    assert summary["reported_split"] == "test" and summary["test_images"] == 30 and summary["seeds"] == [0, 1]

    for mode in ("none", "hard"):
        top1, agree = [], []
        for seed in (0, 1):
            run_dir = tmp_path / "demo" / "students" / f"distillation={mode},seed={seed}"
            config = json.loads((run_dir / "result.json").read_text())["config"]
            assert (config["student"]["distillation"], config["student"]["seed"]) == (mode, seed)
            student = create_student(from_dict(config).student, 10)
            student.model.load_state_dict(torch.load(run_dir / "last.pth", weights_only=True)["model"])
            student.model.set_distilled_training(False)  # timm's eval forward: the average of the two heads
            preds = _timm_predictions(student.model, student.model.pretrained_cfg, m.student.img_size, images)
            top1.append((preds == labels).mean())
            agree.append((preds == teacher_preds).mean())
        joint = summary["modes"][mode]["test"]["joint"]
        assert joint["runs"] == pytest.approx(top1, abs=1.01 / len(labels))
        assert joint["mean"] == pytest.approx(statistics.fmean(joint["runs"]))
        assert joint["sd"] == pytest.approx(statistics.stdev(joint["runs"]))
        assert summary["modes"][mode]["test_agreement"]["joint"]["runs"] == pytest.approx(agree, abs=1.01 / len(labels))
    assert summary["student_none_acc"] == summary["modes"]["none"]["test"]["joint"]["mean"]
    assert summary["student_hard_acc"] == summary["modes"]["hard"]["test"]["joint"]["mean"]
    claim = summary["claim_none_lt_hard"]["test"]
    assert claim["holds"] == (min(summary["modes"]["hard"]["test"]["joint"]["runs"]) >
                              max(summary["modes"]["none"]["test"]["joint"]["runs"]))
    # K = classes and hard labels: the online teacher gives the cached run's answers, so the same student
    assert summary["cached_vs_online"]["same_val_top1"] is True
    assert set(summary["seconds"]) >= {"teacher", "teacher_cache", "students", "test", "cached_vs_online", "stats"}
    assert (tmp_path / "demo" / "stats" / "stats.json").is_file()
