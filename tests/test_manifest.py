"""Bad manifests: each mistake stops the run with an error that names the field and the fix, before any cache
is touched. Loading goes through `pipeline.manifest_loader.load`; the checks that need the data or the teacher
(K against the class count, the teacher checkpoint) run at the start of `teacher-cache`."""

import os
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from fault_script import tiny_overrides
from pipeline.cli import main
from pipeline.manifest import ManifestError
from pipeline.manifest_loader import load
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


# --------------------------------------------------------------------------------------------- where, and ranges


def test_an_unknown_key_from_set_is_blamed_on_set_with_the_nearest_key(tmp_path):
    with pytest.raises(ManifestError) as e:
        load(TINY, ["student.alpha=0.5", "student.lr=1e-3"])
    assert str(e.value).startswith("--set student.lr=1e-3: unknown key student.lr: valid keys here are [")
    assert str(e.value).endswith("; did you mean student.optim.lr?") and TINY not in str(e.value)
    with pytest.raises(ManifestError, match=r"^--set studnet.alpha=0.5: unknown key studnet: .*did you mean "
                                            r"student.alpha\?$"):
        load(TINY, ["studnet.alpha=0.5"])
    with pytest.raises(ManifestError, match=r"^--set student.optim.lr.max=1: unknown key student.optim.lr.max: "
                                            r"student.optim.lr is a value, not a section; did you mean student.optim.lr\?$"):
        load(TINY, ["student.optim.lr.max=1"])
    with pytest.raises(ManifestError, match=r"^--set cache.top_k=2.5: cache.top_k: expected an integer, got 2.5$"):
        load(TINY, ["cache.top_k=2.5"])
    assert load(TINY, ["student.model_args.qkv_bias=false"]).student.model_args["qkv_bias"] is False  # free-form
    path = _manifest_file(tmp_path, lambda d: d["student"].update(lr=0.1))
    with pytest.raises(ManifestError, match=rf"^{re.escape(str(path))}: unknown key student.lr: valid keys here are "
                                            r"\[.*\]; did you mean student.optim.lr\?$"):
        load(path)
    path = _manifest_file(tmp_path, lambda d: d["cache"].update(top_kk=5))
    with pytest.raises(ManifestError, match=r"unknown key cache.top_kk: .*; did you mean cache.top_k\?$"):
        load(path)


@pytest.mark.parametrize("override, message", [
    ("student.optim.lr=0", "student.optim.lr=0.0 must be > 0: set it to a valid value (default 0.0005)"),
    ("student.optim.lr=-1e-3", "student.optim.lr=-0.001 must be > 0"),
    ("student.optim.lr=.nan", "student.optim.lr=nan must be > 0"),
    ("student.tau=.inf", "student.tau=inf must be > 0"),
    ("student.patch_size=0", "student.patch_size=0 must be >= 1: set it to a valid value (default 16)"),
    ("cache.workers=-1", "cache.workers=-1 must be >= 0"),
    ("student.workers=-2", "student.workers=-2 must be >= 0"),
    ("student.verify_sample=1.5", "student.verify_sample=1.5 must lie in [0, 1]"),
    ("student.ckpt_every=-1", "student.ckpt_every=-1 must be >= 0"),
    ("student.eval_every=-1", "student.eval_every=-1 must be >= 0"),
    ("student.ema=1.0", "student.ema=1.0 must lie in (0, 1)"),
    ("views.crop.scale=[0, 1]", "views.crop.scale[0]=0.0 must lie in (0, 1]: set it to a valid value (default 0.08)"),
    ("cache.top_k=0", "cache.top_k=0 must be >= 1"),
    ("student.smoothing=1", "student.smoothing=1.0 must lie in [0, 1)"),
])
def test_a_number_out_of_range_names_the_key_the_range_and_the_set_that_gave_it(override, message):
    with pytest.raises(ManifestError) as e:
        load(TINY, [override])
    assert str(e.value).startswith(f"--set {override}: {message}")
    assert ": set it to a valid value (default " in str(e.value) or "ema" in override  # ema's default is None


@pytest.mark.parametrize("sets, message", [
    (["views.randaugment.spec=rand-m9-n5"], "views.randaugment.spec='rand-m9-n5': section 'n5' asks for 5 ops"),
    (["views.mix.mixup_alpha=0", "views.mix.cutmix_alpha=0"],
     "views.mix is enabled but views.mix.mixup_alpha and views.mix.cutmix_alpha are both 0"),
    (["views.crop.ratio=[2, 1]"], "views.crop.ratio=[2.0, 1.0] must satisfy 0 < min <= max"),
])
def test_the_view_recipes_own_checks_refuse_a_manifest_when_it_is_loaded(sets, message):
    with pytest.raises(ManifestError, match=re.escape(f"{TINY} with --set {' '.join(sets)}: {message}")):
        load(TINY, sets)


def test_a_number_out_of_range_in_the_file_is_blamed_on_the_file(tmp_path):
    path = _manifest_file(tmp_path, lambda d: d["student"].update(patch_size=0))
    with pytest.raises(ManifestError, match=rf"^{re.escape(str(path))}: student.patch_size=0 must be >= 1"):
        load(path)
    assert load(path, ["student.patch_size=4"]).student.patch_size == 4  # an override may repair the file
    result = CliRunner().invoke(main, ["train-student", "--manifest", str(path)])
    assert result.exit_code == 2 and "student.patch_size=0 must be >= 1" in result.output
    assert "Traceback" not in result.output


def test_every_number_of_the_manifest_has_a_range():
    from pipeline.manifest import RANGES, Manifest, all_keys, field_value

    m = Manifest()
    numbers = set()
    for key in all_keys():
        value = field_value(m, key)
        hint = typing_hint(key)
        if isinstance(value, tuple):
            numbers |= {f"{key}[{i}]" for i, v in enumerate(value) if isinstance(v, (int, float))}
        elif (isinstance(value, (int, float)) and not isinstance(value, bool)) or hint in ("float | None",
                                                                                                "int | None"):
            numbers.add(key)
    assert numbers == set(RANGES)
    for key, valid in RANGES.items():  # the defaults are valid
        assert field_value(m, key) is None or field_value(m, key) in valid, key


def typing_hint(key: str) -> str:
    import dataclasses
    import typing

    from pipeline.manifest import Manifest

    tp = Manifest
    for part in key.split("."):
        tp = typing.get_type_hints(tp)[part]
    return str(tp) if not dataclasses.is_dataclass(tp) else ""


def test_a_dangling_symlink_as_cache_path_is_named(tmp_path):
    link = tmp_path / "cache"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(ManifestError, match=rf"with --set cache.path={re.escape(str(link))}: cache.path={re.escape(str(link))} "
                                            rf"is a symlink to {re.escape(str(tmp_path / 'gone'))}, which does not "
                                            r"exist: create the directory it points to"):
        load(TINY, [f"cache.path={link}"])
    (tmp_path / "gone").mkdir()
    assert load(TINY, [f"cache.path={link}"]).cache.path == str(link)


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """YAML 1.2 floats; PyYAML (YAML 1.1) would read `1e-3` as a string."""
    assert load(TINY, ["student.optim.lr=1e-3"]).student.optim.lr == 1e-3
    path = _manifest_file(tmp_path, lambda d: d["student"]["optim"].update(lr="5E-4"))
    assert load(path).student.optim.lr == 5e-4
    with pytest.raises(ManifestError, match="expected a number, got '1e'"):
        load(TINY, ["student.optim.lr=1e"])
