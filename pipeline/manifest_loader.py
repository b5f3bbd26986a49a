"""Loading manifests: a YAML file and its `--set` overrides, read strictly into a checked `Manifest`.

An unknown key, a wrong type or a bad value raises `ManifestError` naming its dotted path
(`student.optim.lr`) and the valid choices. Overrides (`--set student.alpha=0.5`) go through the same checks.
Every check runs here: the ranges and cross-field checks that sit next to the dataclasses (`pipeline.manifest`),
then the view recipe's own (`pipeline.views.check`). This module may import both; the dataclasses need none of
the modules they configure.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.manifest import Manifest, ManifestError, check_ranges, did_you_mean

YAML12_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check `value` against the annotation `tp` and convert it (lists to tuples, ints to floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ManifestError(f"{path}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ManifestError as e:
                errors.append(str(e))
        raise ManifestError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if origin is Literal:
        if value not in args:
            raise ManifestError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ManifestError(f"{path}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ManifestError(f"{path}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ManifestError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ManifestError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and YAML12_FLOAT.fullmatch(value):  # PyYAML reads 1e-3 (no dot) as a string
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ManifestError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ManifestError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ManifestError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported manifest annotation {tp!r} at {path}")


def _build(cls: type, data: dict, path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        key = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ManifestError(f"unknown key {key}: valid keys here are {names}{did_you_mean(key)}")
    kwargs = {k: _convert(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def check_override_key(text: str) -> None:
    """The key of a `--set key.path=value` must exist in the schema (anything below a mapping field goes)."""
    key = text.split("=", 1)[0].strip()
    tp: Any = Manifest
    for i, part in enumerate(key.split(".")):
        hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        if part not in hints:
            where = ".".join(key.split(".")[:i + 1])
            parent = where.rsplit(".", 1)[0]
            hint = did_you_mean(key, spelling=False) or did_you_mean(where)
            raise ManifestError(f"--set {text}: unknown key {where}: "
                                + (f"valid keys here are {list(hints)}" if hints else
                                   f"{parent} is a value, not a section") + hint)
        tp = hints[part]
        if typing.get_origin(tp) is dict or tp is dict:
            return


def parse_override(text: str) -> dict:
    """`student.optim.lr=1e-3` -> {'student': {'optim': {'lr': 0.001}}}; the value is parsed as YAML."""
    if "=" not in text:
        raise ManifestError(f"override {text!r} must look like key.path=value (e.g. student.alpha=0.5)")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def from_dict(data: dict, overrides: list[dict] | tuple = ()) -> Manifest:
    """A checked manifest from plain data (and parsed overrides): the ranges and cross-field checks of the
    dataclasses (`Manifest.check`), then the view recipe's own."""
    for over in overrides:
        data = _merge(data, over)
    m = _build(Manifest, data, "").check()
    from pipeline import views  # the recipe's own checks (RandAugment spec, alphas, ...) live with it

    views.check(m.views)
    return m


def read_yaml_mapping(path: Path, error: type[Exception], what: str, keys: list[str]) -> dict:
    """A YAML file whose top level is a mapping; `error` names the file and the fix otherwise."""
    if not path.is_file():
        raise error(f"{what} {path} does not exist: pass a YAML file (see manifests/)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: the top level must be a mapping with keys {keys}")
    return data


def load(path: str | Path, overrides: list[str] | tuple = ()) -> Manifest:
    """Load a manifest file strictly, apply `key.path=value` overrides, run the range and cross-field checks.
    An error names where the bad value came from: the file, or the `--set` that gave it."""
    path = Path(path)
    data = read_yaml_mapping(path, ManifestError, "manifest", [f.name for f in dataclasses.fields(Manifest)])
    try:
        _build(Manifest, data, "")
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}") from None
    parsed = []
    for text in overrides:
        check_override_key(text)
        parsed.append(parse_override(text))
        try:
            check_ranges(_build(Manifest, _merge(data, parsed[-1]), ""), under=text.split("=", 1)[0].strip())
        except ManifestError as e:
            raise ManifestError(f"--set {text}: {e}") from None
    try:
        return from_dict(data, parsed)
    except ManifestError as e:
        where = f"{path} with --set {' '.join(overrides)}" if overrides else str(path)
        raise ManifestError(f"{where}: {e}") from None
