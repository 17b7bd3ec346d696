"""Strict YAML ↔ dataclass machinery shared by the training recipes (tokenizer and generator).

A recipe is a tree of dataclasses. Loading checks every key and value against the field types: an unknown key (with a
"did you mean" hint) or a wrongly typed value is a :class:`ConfigError` whose one-line message names the key and
where it came from (the file, the command line, a defaults layer). Dotted ``section.key=value`` overrides are parsed
as YAML scalars. A recipe module composes these pieces; the simplest one is :func:`load_dataclass`.

Sections every training recipe carries (:class:`ResumeSection`, :class:`NonFiniteSection`) and the resume check
(:func:`check_resume`: a run continues only with the recipe it was started with, up to :data:`RESUME_SAFE_KEYS`) live
here too, so that each stage's recipe and loop share them.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

__all__ = [
    "RESUME_SAFE_KEYS",
    "ConfigError",
    "NonFiniteSection",
    "ResumeSection",
    "UserValues",
    "build_dataclass",
    "changes_text",
    "check_resume",
    "check_section",
    "config_diff",
    "config_to_dict",
    "deep_merge",
    "dump_yaml",
    "load_dataclass",
    "nest",
    "parse_overrides",
    "read_user_values",
    "save_config",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, with a one-line message naming the key and its source."""


# ----------------------------------------------------------------------------------------------------------------------
# Type checking
# ----------------------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} values"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


class _Mismatch(Exception):
    pass


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """``value`` converted to ``tp``; raises ConfigError naming ``key`` and ``source``."""
    try:
        return _convert_inner(value, tp, key, source)
    except _Mismatch:
        raise ConfigError(f"{source}: {key}: expected {_type_name(tp)}, got {value!r}") from None


def _convert_inner(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _Mismatch
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert_inner(value, arg, key, source)
            except (_Mismatch, ConfigError):
                continue
        raise _Mismatch
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept plain numeric spellings.
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_convert(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Mismatch
        return check_section(value, tp, prefix=key, source=source)
    raise ConfigError(f"{source}: {key}: unsupported field type {tp}")


def check_section(raw: dict[str, Any], cls: type, *, prefix: str, source: str) -> dict[str, Any]:
    """Type-check a (partial) raw mapping against dataclass ``cls``; returns the converted partial mapping.

    ``prefix`` is the dotted path of ``cls`` inside the recipe ("" at the top), used in messages.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out: dict[str, Any] = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in hints or name not in names:
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown key '{key}'{hint}")
        out[name] = _convert(value, hints[name], key, source)
    return out


def build_dataclass(cls: type[T], data: dict[str, Any], *, source: str, prefix: str = "") -> T:
    """Instantiate ``cls`` from a mapping checked by :func:`check_section` (nested dataclasses included).

    A ``ValueError`` from a ``__post_init__`` check becomes a :class:`ConfigError` with the section prefixed.
    """
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in data:
            continue
        value = data[f.name]
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = build_dataclass(tp, value, source=source, prefix=f"{prefix}{f.name}.")
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except ValueError as e:
        message = str(e)
        if prefix and not message.startswith(prefix):
            message = prefix + message
        raise ConfigError(f"{source}: {message}") from None


# ----------------------------------------------------------------------------------------------------------------------
# Layers: file, command line
# ----------------------------------------------------------------------------------------------------------------------


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, recursively for nested mappings (neither input is modified)."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def nest(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1, "c": 2}`` → ``{"a": {"b": 1}, "c": 2}``."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``["a.b=1", "c=x"]`` → ``[("a.b", 1), ("c", "x")]``; values are parsed as YAML scalars."""
    parsed: list[tuple[str, Any]] = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected section.key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0]
            raise ConfigError(f"override {item!r}: value is not valid YAML ({first})") from None
        parsed.append((key, value))
    return parsed


def _read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a YAML config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (expected a YAML config)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    if "\x00" in text:
        raise ConfigError(f"{path}: not a text file (expected a YAML config)")
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
    return loaded


@dataclass(frozen=True)
class UserValues:
    values: dict[str, Any]  # the file's values with the command line's on top, type-checked, nested
    source: str  # for messages: "run.yaml", "run.yaml + command line" or "defaults"


def read_user_values(
    cls: type,
    path: str | Path | None,
    *,
    overrides: list[str] | None = None,
    check: typing.Callable[[dict[str, Any], str], None] | None = None,
) -> UserValues:
    """The YAML file (if any) and the dotted overrides, each checked against ``cls``, merged.

    ``check(values, source)`` may validate (and convert in place) what the types cannot express, e.g. a free-form
    mapping checked against another dataclass; it sees the file and every override separately, so its errors name the
    right source.
    """
    source = str(path) if path is not None else "defaults"
    from_file = check_section(_read_yaml_mapping(path), cls, prefix="", source=source) if path is not None else {}
    if check is not None:
        check(from_file, source)
    from_cli: dict[str, Any] = {}
    for key, value in parse_overrides(overrides or []):
        one = check_section(nest({key: value}), cls, prefix="", source="command line")
        if check is not None:
            check(one, "command line")
        from_cli = deep_merge(from_cli, one)
    if overrides:
        source = f"{source} + command line"
    return UserValues(values=deep_merge(from_file, from_cli), source=source)


def load_dataclass(
    cls: type[T],
    path: str | Path | None = None,
    *,
    overrides: list[str] | None = None,
    defaults: dict[str, Any] | None = None,
    check: typing.Callable[[dict[str, Any], str], None] | None = None,
) -> T:
    """Dataclass defaults < ``defaults`` (dotted keys) < YAML file < overrides → an instance of ``cls``."""
    user = read_user_values(cls, path, overrides=overrides, check=check)
    base = check_section(nest(defaults or {}), cls, prefix="", source="defaults") if defaults else {}
    return build_dataclass(cls, deep_merge(base, user.values), source=user.source)


# ----------------------------------------------------------------------------------------------------------------------
# Saving and comparing
# ----------------------------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass recipe as a plain nested dict (lists instead of tuples), suitable for YAML and JSON."""
    return _plain(dataclasses.asdict(config))


def dump_yaml(config: Any, *, compact: bool = True) -> str:
    """The recipe as YAML; ``compact`` writes sections of plain values on one line each (as ``config.yaml``)."""
    flow = None if compact else False
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=flow, width=120)


def save_config(config: Any, path: str | Path) -> None:
    """Write the fully resolved recipe; loading it back gives an equal dataclass."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_yaml(config))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def config_diff(
    saved: dict[str, Any], current: dict[str, Any], *, ignore: tuple[str, ...] = ("notes",)
) -> list[tuple[str, Any, Any]]:
    """``(dotted key, saved value, current value)`` for every leaf that differs, sorted by key.

    Both sides go through JSON first, so tuples and lists compare equal; keys in ``ignore`` (and below them) are
    skipped. A key present on one side only shows ``None`` on the other.
    """
    a = _flatten(json.loads(json.dumps(saved, default=list)))
    b = _flatten(json.loads(json.dumps(current, default=list)))
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    skipped = tuple(ignore)
    return [(k, a.get(k), b.get(k)) for k in keys if not (k in skipped or k.startswith(tuple(f"{i}." for i in ignore)))]


# ----------------------------------------------------------------------------------------------------------------------
# Sections shared by the training recipes, and the resume check
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ResumeSection:
    allow_changes: bool = False  # resume even though recipe keys outside RESUME_SAFE_KEYS changed (they are listed)


@dataclass
class NonFiniteSection:
    max_skips: int = 5  # steps with a NaN/inf loss or gradient skipped (with a warning) before the run stops

    def __post_init__(self) -> None:
        if self.max_skips < 0:
            raise ValueError(f"max_skips: must be >= 0, got {self.max_skips}")


# Keys (fnmatch patterns over dotted keys) a resumed run may change freely: they do not change what is computed.
# max_steps is among them so that a finished run can be extended (a schedule decaying over max_steps stretches).
RESUME_SAFE_KEYS: tuple[str, ...] = (
    "max_steps",
    "log_every",
    "val_every",
    "checkpoint_every",
    "keep_last",
    "export",
    "threads",
    "device",
    "deterministic",
    "find_unused_parameters",
    "output_dir",
    "notes",
    "progress",
    "*num_workers",
    "data.val",
    "data.val_images",
    "data.val_num_tokens",
    "resume.*",
    "nonfinite.*",
)


def _is_safe(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


def _listed(diffs: list[tuple[str, Any, Any]], limit: int = 6) -> str:
    text = ", ".join(f"{k} ({a!r} -> {b!r})" for k, a, b in diffs[:limit])
    return text + (f" and {len(diffs) - limit} more" if len(diffs) > limit else "")


def check_resume(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    allow_changes: bool,
    source: str,
    safe: Iterable[str] = RESUME_SAFE_KEYS,
) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """Compare the recipe a checkpoint was written with (``saved``) to this run's; returns (safe, other) changes.

    Changes outside ``safe`` (batch size, learning rate, seed, data, variant, ...) are a :class:`ConfigError` naming
    every changed key unless ``allow_changes``. ``source`` names the checkpoint in the message.
    """
    patterns = tuple(safe)
    diffs = config_diff(dict(saved), dict(current), ignore=())
    harmless = [d for d in diffs if _is_safe(d[0], patterns)]
    other = [d for d in diffs if not _is_safe(d[0], patterns)]
    if other and not allow_changes:
        raise ConfigError(
            f"{source} was written with a different recipe: {_listed(other)}; resume with resume.allow_changes=true "
            "to accept the changes, or use a new output_dir"
        )
    return harmless, other


def changes_text(diffs: list[tuple[str, Any, Any]]) -> str:
    """``key (old -> new), ...`` for a log line."""
    return _listed(diffs)
