"""Bad manifests: each mistake stops the run with an error that names the field and the fix, before any cache
is touched. Loading goes through `pipeline.manifest.load`; the checks that need the data or the teacher
(K against the class count, the teacher checkpoint) run at the start of `teacher-cache`."""

import os
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from fault_script import tiny_overrides
from pipeline.cli import main
from pipeline.manifest import ManifestError, load
from pipeline.teacher import TeacherError
from pipeline.teacher_cache import run as fill_cache

TINY = "manifests/tiny.yaml"


def _manifest_file(tmp_path: Path, edit) -> Path:
    """manifests/tiny.yaml with `edit` applied to its parsed YAML, written to tmp_path."""
    data = yaml.safe_load(Path(TINY).read_text())
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny shards (10 classes) and a teacher checkpoint, as `--set` overrides."""
    return tiny_overrides(tmp_path_factory.mktemp("tiny"))


def test_unknown_key_names_its_path_and_the_valid_keys(tmp_path):
    path = _manifest_file(tmp_path, lambda d: d["student"]["optim"].update(lrr=0.1))
    with pytest.raises(ManifestError, match=re.escape(f"{path}: unknown key student.optim.lrr: valid keys here are "
                                                      f"['name', 'lr', 'lr_batch', 'weight_decay', 'clip_grad']")):
        load(path)
    with pytest.raises(ManifestError, match=r"unknown key cache\.topk: valid keys here are \[.*'top_k'"):
        load(TINY, ["cache.topk=5"])
    with pytest.raises(ManifestError, match=r"unknown key studnet: valid keys here are \['name', 'data', 'teacher'"):
        load(TINY, ["studnet.alpha=0.5"])


def test_wrong_type_names_the_field_and_the_expected_type(tmp_path):
    path = _manifest_file(tmp_path, lambda d: d["student"].update(alpha="half"))
    with pytest.raises(ManifestError, match=re.escape(f"{path}: student.alpha: expected a number, got 'half'")):
        load(path)
    with pytest.raises(ManifestError, match=re.escape("cache.top_k: expected an integer, got 2.5")):
        load(TINY, ["cache.top_k=2.5"])
    with pytest.raises(ManifestError, match=re.escape("views.flip.enabled: expected true or false, got 'sometimes'")):
        load(TINY, ["views.flip.enabled=sometimes"])
    with pytest.raises(ManifestError, match=re.escape("student.distillation: 'medium' is not one of "
                                                      "['none', 'soft', 'hard', 'deit_none']")):
        load(TINY, ["student.distillation=medium"])


def test_patch_size_that_does_not_divide_the_image_size_names_both_keys():
    with pytest.raises(ManifestError, match=re.escape("student.img_size=16 is not divisible by student.patch_size=5: "
                                                      "change one so the patches tile the image (e.g. img_size=15)")):
        load(TINY, ["student.patch_size=5"])


def test_load_errors_reach_the_command_line_as_usage_errors():
    result = CliRunner().invoke(main, ["teacher-cache", "--manifest", TINY, "--set", "student.patch_size=5"])
    assert result.exit_code == 2
    assert "student.img_size=16 is not divisible by student.patch_size=5" in result.output


def test_top_k_larger_than_the_class_count_stops_before_the_cache_exists(tiny, tmp_path):
    m = load(TINY, tiny + [f"cache.path={tmp_path / 'cache'}", "cache.top_k=11"])
    with pytest.raises(ManifestError, match=r"cache\.top_k=11 exceeds the 10 classes of .*shardlist\.json: "
                                            r"set cache\.top_k <= 10"):
        fill_cache(m, progress=False)
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / "cache.locks").exists()  # the writer lock was given back


def test_missing_teacher_checkpoint_names_the_field_and_how_to_get_one(tiny, tmp_path):
    missing = tmp_path / "nowhere" / "teacher.pt"
    overrides = tiny + [f"cache.path={tmp_path / 'cache'}", f"teacher.checkpoint={missing}"]
    with pytest.raises(TeacherError, match=re.escape(f"teacher.checkpoint={missing} does not exist: run `make "
                                                     f"teacher` to train the demo teacher, or point teacher.checkpoint "
                                                     f"at a local weights file")):
        fill_cache(load(TINY, overrides), progress=False)
    assert not (tmp_path / "cache").exists()
    # the same through the command line: the run stops with the message, nothing is written
    result = CliRunner().invoke(main, ["teacher-cache", "--manifest", TINY, "--no-progress",
                                       *[a for o in overrides for a in ("--set", o)]])
    assert result.exit_code == 1
    assert f"Error: teacher.checkpoint={missing} does not exist" in result.output
    assert "Traceback" not in result.output
    assert not os.path.exists(tmp_path / "cache")
