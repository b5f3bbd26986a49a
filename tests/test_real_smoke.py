"""`make real-smoke`: DeiT's ImageNet recipe end to end at 224 px and 1000 classes, with the real architectures
(random weights in timm's checkpoint layout), on generated photos, on the CPU. Checked against what the stages
wrote, read back with zarr, timm and torch directly."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
import zarr

from pipeline.real_smoke import USED_CLASSES, class_names

pytestmark = pytest.mark.slow


def test_real_smoke_runs_deits_recipe_at_real_sizes(tmp_path):
    out = tmp_path / "real-smoke"
    done = subprocess.run([sys.executable, "-c", "from pipeline.cli import main; main()", "real-smoke", "--out", str(out)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()}, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    recipe = yaml.safe_load(Path("manifests/imagenet_deit.yaml").read_text())
    assert summary["num_classes"] == 1000 and summary["top_k"] == recipe["cache"]["top_k"] == 10
    assert summary["teacher_size"] == summary["student_size"] == 224
    assert summary["teacher"] == "regnety_160.deit_in1k" and summary["student"] == "deit_tiny_distilled_patch16_224"
    assert summary["recipe"] == {"crop_scale": [0.08, 1.0], "flip": 0.5, "randaugment": "rand-m9-mstd0.5-inc1",
                                 "erasing": 0.25, "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mix_prob": 1.0}
    n_train, n_val = 2 * len(USED_CLASSES), len(USED_CLASSES)
    assert summary["views_cached"] == n_train + n_val and summary["verify_passed"] is True
    assert summary["steps"] == -(-n_train // 25) and 0 < summary["bytes_per_view"] < 1000
    assert set(summary["seconds"]) == {"shards", "teacher_checkpoint", "teacher_cache", "train_student",
                                       "verify_cache", "stats"}

    # the teacher: timm's own loader reads the checkpoint into a regnety_160, and the cache names that file
    checkpoint = out / "regnety_160-random.pth.tar"
    assert set(torch.load(checkpoint, weights_only=True)) == {"epoch", "arch", "state_dict"}  # timm's train.py
    timm.models.load_checkpoint(timm.create_model("regnety_160", num_classes=1000), str(checkpoint), strict=True)
    root = zarr.open_group(str(out / "cache"), mode="r")
    assert root.attrs["teacher"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert root.attrs["classes"] == class_names()

    # every train view is cached at its true label, class ids beyond 255 included (K < C, uint16 ids)
    labels = root["train"]["labels"][...]
    assert sorted(set(labels[labels >= 0].tolist())) == list(USED_CLASSES) and (labels >= 0).sum() == n_train
    digests = root["train"]["digest"][0]
    assert ((digests != 0) == (labels >= 0)).all()
    assert root["train"]["topk_ids"][...].max() > 255

    # the student is a full-size DeiT-Ti: the same parameters as timm's own
    state = _student_state(out / "student")
    reference = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=1000).state_dict()
    assert {k.removeprefix("module."): tuple(v.shape) for k, v in state.items()} == \
           {k: tuple(v.shape) for k, v in reference.items()}
    assert (out / "stats" / "stats.json").is_file()


def _student_state(run_dir: Path) -> dict:
    """The student's weights from whichever checkpoint file the run wrote (torch or safetensors)."""
    for path in sorted(run_dir.iterdir()):
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        if path.suffix in (".pt", ".pth"):
            saved = torch.load(path, weights_only=False, map_location="cpu")
            for value in saved.values():
                if isinstance(value, dict) and any("blocks.11." in str(name) for name in value):
                    return value
    raise AssertionError(f"no student checkpoint in {run_dir}: {sorted(p.name for p in run_dir.iterdir())}")


def test_a_rerun_removes_what_the_previous_smoke_run_wrote_and_nothing_else(tmp_path):
    from pipeline.real_smoke import OUTPUTS, clear_previous

    for name in OUTPUTS:
        path = tmp_path / name
        if "." in name:
            path.write_text("old")
        else:
            (path / "inner").mkdir(parents=True)
            (path / "inner" / "file").write_text("old")
    (tmp_path / "notes.txt").write_text("the user's own")
    clear_previous(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    clear_previous(tmp_path / "absent")  # a first run: nothing to remove
