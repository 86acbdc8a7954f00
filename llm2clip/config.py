"""Typed configuration: dataclasses per component, YAML file + dotted CLI overrides.

    cfg = load_config(Stage1Config, "configs/tiny_stage1.yaml", ["optim.lr=2e-4", "lora.r=8"])

Everything is validated before any model loads: an unknown or misspelled key raises ConfigError
naming the dotted key, the file it came from and the closest valid key; wrong types and values
outside a `Literal[...]` raise with the key and the allowed values. Each dataclass may define
`validate(self)` for cross-field checks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import shutil
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key (and file) at fault."""


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else f" Valid keys: {', '.join(sorted(valid))}."


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Union or origin is types.UnionType:
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool) and "on" in choices and "off" in choices:
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, val_tp = get_args(tp) or (Any, Any)
        return {str(k): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not math.isfinite(f):
            raise ConfigError(f"{where}: expected a finite integer, got {value!r}")
        if f != int(f):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(f):  # nan/inf pass every `<`/`>` check in validate() and poison the run later
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return f
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else key
        if key not in names:
            valid = [f"{where}.{n}" if where else n for n in names]
            raise ConfigError(f"unknown config key '{dotted}'." + _closest(dotted, valid))
        kwargs[key] = _coerce(value, hints[key], dotted)
    obj = cls(**kwargs)
    return obj


def _validate_tree(obj: Any, where: str = "") -> None:
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            _validate_tree(v, f"{where}.{f.name}" if where else f.name)
    if hasattr(obj, "validate"):
        try:
            obj.validate()
        except ConfigError as e:
            raise ConfigError(f"{where + ': ' if where else ''}{e}") from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`["optim.lr=2e-4", "data.fields=[txt,dense]"]` -> [("optim.lr", 0.0002), ...] (YAML-typed values)."""
    out = []
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override '{o}' must look like key=value (e.g. optim.lr=2e-4)")
        k, v = o.split("=", 1)
        k = k.strip()
        if not k:
            raise ConfigError(f"override '{o}' has an empty key")
        try:
            parsed = yaml.safe_load(v) if v.strip() else ""
        except yaml.YAMLError:
            parsed = v
        out.append((k, parsed))
    return out


def load_config(cls: type, path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Any:
    """Build and validate a `cls` config from a YAML file and dotted overrides (overrides win)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        data = loaded
    for k, v in parse_overrides(overrides or []):
        _set_dotted(data, k, v)
    try:
        cfg = _build(cls, data, "")
        _validate_tree(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see the old or the new content, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it is renamed onto `out_dir` (an existing
    `out_dir` is replaced only once the new one is complete), on error it is removed. Readers see the
    old folder or the new one, never a half-written one."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config (after overrides) as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def cli_config(cls: type, argv: list[str] | None = None, description: str = "") -> tuple[Any, Any]:
    """Standard CLI: `--config PATH --set k=v --set k2=v2`; returns (cfg, argparse namespace)."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", help="YAML config file")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted override, repeatable (e.g. --set optim.lr=2e-4)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args, rest = ap.parse_known_args(argv)
    # allow bare `key=value` tokens after the flags too (convenient from sbatch/srun)
    extra = [r for r in rest if "=" in r and not r.startswith("-")]
    bad = [r for r in rest if r not in extra]
    if bad:
        ap.error(f"unrecognised arguments: {' '.join(bad)}")
    cfg = load_config(cls, args.config, args.overrides + extra)
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        raise SystemExit(0)
    return cfg, args
