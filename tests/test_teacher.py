"""Teachers the way timm users have them: local checkpoints in every layout timm writes, timm's pretrained path
with a local file (`pretrained_cfg_overlay`), the identity hash for every dtype, and a head that does not fit
the data refused before anything is written. The weights are random, saved by the test in timm's layouts."""

import hashlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from pipeline.manifest_loader import load
from pipeline.teacher import TeacherError, load_teacher, state_sha256, teacher_identity
from pipeline.teacher_cache import run as fill_cache

TINY = "manifests/tiny.yaml"
ARGS = {"w0": 8, "wa": 13, "wm": 2.0, "group_size": 8, "depth": 4, "stem_width": 8}  # tiny.yaml's teacher


def _model(num_classes=10, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model("regnety_002", num_classes=num_classes, **ARGS)
    with torch.no_grad():  # BatchNorm statistics away from their defaults, so loading them is checked too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(seed + 7)
    return model.eval()


def _cfg(*overrides):
    return load(TINY, list(overrides)).teacher


def _logits(model, x):
    with torch.inference_mode():
        return model(x)


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


LAYOUTS = {
    "plain": lambda state, ema: state,
    "state_dict": lambda state, ema: {"state_dict": state, "epoch": 3, "arch": "regnety_002"},  # timm's train.py
    "model": lambda state, ema: {"model": state, "epoch": 3},  # DeiT's main.py
    "module_prefix": lambda state, ema: {"state_dict": {f"module.{k}": v for k, v in state.items()}},  # DDP
    "compiled_ddp": lambda state, ema: {f"_orig_mod.module.{k}": v for k, v in state.items()},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_local_checkpoints_load_in_every_timm_layout(tmp_path, layout):
    model = _model()
    path = tmp_path / "teacher.pth"
    torch.save(LAYOUTS[layout](model.state_dict(), None), path)
    teacher = load_teacher(_cfg(f"teacher.checkpoint={path}"), 10)
    assert _same_state(teacher.model, model)
    assert torch.equal(_logits(teacher.model, X), _logits(model, X))
    assert teacher.identity["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert teacher_identity(_cfg(f"teacher.checkpoint={path}"), 10) == teacher.identity


def test_safetensors_and_the_ema_weights_are_chosen_by_a_key(tmp_path):
    model, ema = _model(seed=0), _model(seed=1)
    path = tmp_path / "teacher.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path))
    assert _same_state(load_teacher(_cfg(f"teacher.checkpoint={path}"), 10).model, model)

    both = tmp_path / "train-checkpoint.pth.tar"  # timm's train.py with --model-ema
    torch.save({"state_dict": model.state_dict(), "state_dict_ema": ema.state_dict(), "epoch": 9}, both)
    plain = load_teacher(_cfg(f"teacher.checkpoint={both}"), 10)
    averaged = load_teacher(_cfg(f"teacher.checkpoint={both}", "teacher.use_ema=true"), 10)
    assert _same_state(plain.model, model) and _same_state(averaged.model, ema)
    assert not torch.equal(_logits(plain.model, X), _logits(averaged.model, X))
    # one file, two teachers: the choice is part of the identity, so their caches cannot be confused
    assert plain.identity["sha256"] == averaged.identity["sha256"] and plain.identity != averaged.identity
    deit = tmp_path / "deit-checkpoint.pth"  # DeiT's main.py with --model-ema
    torch.save({"model": model.state_dict(), "model_ema": ema.state_dict()}, deit)
    assert _same_state(load_teacher(_cfg(f"teacher.checkpoint={deit}", "teacher.use_ema=true"), 10).model, ema)


def test_a_local_file_as_timms_pretrained_weights(tmp_path):
    """`pretrained: true` with `pretrained_cfg_overlay: {file: ...}`: timm's own pretrained path, offline."""
    model = _model(num_classes=1000)
    path = tmp_path / "regnety_002.pth"
    torch.save(model.state_dict(), path)
    overrides = ["teacher.checkpoint=null", "teacher.pretrained=true", f"teacher.pretrained_cfg_overlay={{file: {path}}}"]
    teacher = load_teacher(_cfg(*overrides), 1000)
    assert _same_state(teacher.model, model)
    assert torch.equal(_logits(teacher.model, X), _logits(model, X))
    assert teacher.identity["sha256"] == state_sha256(model)
    with pytest.raises(TeacherError, match=re.escape("the pretrained teacher.model='regnety_002' has a 1000-class head, "
                                                     "but the data has 10 classes (data.train)")):
        load_teacher(_cfg(*overrides), 10)


def test_a_head_that_does_not_fit_the_data_stops_before_the_cache_exists(tmp_path):
    from fault_script import tiny_overrides

    path = tmp_path / "teacher.pth"
    torch.save({"state_dict": _model(num_classes=1000).state_dict()}, path)
    overrides = tiny_overrides(tmp_path / "data") + [f"teacher.checkpoint={path}", f"cache.path={tmp_path / 'cache'}"]
    with pytest.raises(TeacherError, match=re.escape(f"teacher.checkpoint={path} (head.fc.weight (1000, 64)) has a "
                                                     f"1000-class head, but the data has 10 classes (data.train=")
                       + r".*Use a teacher whose head was trained on these 10 classes"):
        fill_cache(load(TINY, overrides), progress=False)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "cache.locks").exists()


def test_unreadable_checkpoints_name_the_file_and_what_is_accepted(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherError, match=re.escape(f"teacher.checkpoint={junk} cannot be read as weights")):
        load_teacher(_cfg(f"teacher.checkpoint={junk}"), 10)
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("regnety_002", num_classes=10).state_dict(), other)  # another width
    with pytest.raises(TeacherError, match=re.escape(f"teacher.checkpoint={other} does not fit teacher.model='regnety_002'")):
        load_teacher(_cfg(f"teacher.checkpoint={other}"), 10)


def _reference_sha(model: torch.nn.Module) -> str:
    """The identity hash computed independently, through numpy (float32/int64 models only)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        array = np.ascontiguousarray(tensor.numpy())
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(array.reshape(-1).tobytes())
    return h.hexdigest()


def test_identity_hash_covers_every_dtype_and_zero_dim_tensors():
    model = _model()
    assert model.stem.bn.num_batches_tracked.dim() == 0  # the 0-dim buffer that broke `.view(torch.uint8)`
    assert state_sha256(model) == _reference_sha(model)
    changed = _model()
    changed.stem.bn.num_batches_tracked += 1  # a 0-dim buffer alone changes the identity
    assert state_sha256(changed) != state_sha256(model)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        cast = _model().to(dtype)
        assert len(state_sha256(cast)) == 64 and state_sha256(cast) != state_sha256(model)
    flags = torch.nn.Module()
    flags.register_buffer("mask", torch.tensor([True, False, True]))
    flags.register_buffer("scalar", torch.tensor(3.5, dtype=torch.bfloat16))
    h = hashlib.sha256()
    h.update(b"mask:torch.bool:(3,)" + bytes([1, 0, 1]))
    h.update(b"scalar:torch.bfloat16:()" + torch.tensor([3.5], dtype=torch.bfloat16).view(torch.int16).numpy().tobytes())
    assert state_sha256(flags) == h.hexdigest()


def test_pretrained_weights_that_cannot_be_fetched_name_the_offline_fixes(tmp_path):
    """No network (the Hub in offline mode): timm names and hf-hub: names stop with the way to use local weights."""
    code = ("from pipeline.manifest_loader import load\nfrom pipeline.teacher import TeacherError, load_teacher\n"
            "import sys\n"
            "m = load('manifests/tiny.yaml', ['teacher.checkpoint=null', 'teacher.pretrained=true', "
            "'teacher.model_args={}', 'teacher.model=' + sys.argv[1]])\n"
            "try:\n    load_teacher(m.teacher, 1000)\nexcept TeacherError as e:\n    print(e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.getcwd(), "HF_HOME": str(tmp_path)}
    for name, fix in (("regnety_160.deit_in1k", "set teacher.pretrained_cfg_overlay: {file: /path/to/weights}"),
                      ("hf-hub:timm/regnety_160.deit_in1k", "the timm name with its tag instead of the hf-hub: name")):
        out = subprocess.run([sys.executable, "-c", code, name], env=env, capture_output=True, text=True, timeout=300)
        assert f"teacher.model={name!r}: its pretrained weights could not be loaded" in out.stdout, out.stderr[-2000:]
        assert "point teacher.checkpoint at a local weights file" in out.stdout and fix in out.stdout


def test_normalize_is_timms_normalisation_in_either_memory_order():
    """(x / 255 - mean) / std of the uint8 views, as torchvision's ToTensor + Normalize (timm's eval and train
    transforms) compute it, bit for bit; contiguous or in the views' own channels_last order."""
    import torchvision.transforms as T

    from pipeline.teacher import normalize

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    views = torch.randint(0, 256, (3, 17, 13, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    timm_way = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    want = torch.stack([timm_way(v.numpy()) for v in views])
    plain, last = normalize(views, mean, std), normalize(views, mean, std, channels_last=True)
    assert plain.is_contiguous() and last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plain, want) and torch.equal(last, want)
