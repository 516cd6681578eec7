"""Reading YAML files into typed config groups.

Files merge left to right: a later file overrides an earlier one (nested blocks merge key by key),
and every override is recorded so the launcher can say what it replaced. GPT-NeoX rejects the
same key in two files, which breaks its own `20B.yml local_setup.yml` recipe; here the later wins.
The same key twice in one file is an error, as in GPT-NeoX: within a file it is a mistake.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from megatron.config.errors import ConfigError
from megatron.config.schema import GROUPS

__all__ = ["ConfigError", "Override", "merge_files", "read_yaml", "split_into_groups"]


@dataclass(frozen=True)
class Override:
    key: str
    old_value: Any
    old_file: str
    new_value: Any
    new_file: str

    def __str__(self) -> str:
        return f"{self.key}: {self.old_value!r} ({self.old_file}) -> {self.new_value!r} ({self.new_file})"


def normalize_key(key: str) -> str:
    return str(key).replace("-", "_")


def _normalize(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {normalize_key(k): _normalize(v) for k, v in tree.items()}
    return tree


class _DuplicateKey(Exception):
    """Raised by _UniqueKeyLoader; read_yaml adds the file name."""

    def __init__(self, key: str, line: int, first_key: str, first_line: int) -> None:
        super().__init__(key)
        self.key, self.line, self.first_key, self.first_line = key, line, first_key, first_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping, at any nesting level.

    yaml.safe_load keeps the later value silently. Keys are compared after normalize_key, since
    ``num-layers`` and ``num_layers`` are one key. Keys brought in by a ``<<`` merge are not
    checked: overriding them is what the merge is for.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, tuple[Any, int]] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # SafeLoader reports an unhashable key itself
            norm = normalize_key(key) if isinstance(key, str) else key
            line = key_node.start_mark.line + 1
            if norm in seen:
                raise _DuplicateKey(str(key), line, str(seen[norm][0]), seen[norm][1])
            seen[norm] = (key, line)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except _DuplicateKey as dup:
        first = f"line {dup.first_line}"
        if dup.first_key != dup.key:
            first += f" as {dup.first_key!r}; hyphens and underscores spell the same key"
        raise ConfigError(
            f"{path} line {dup.line}: key {dup.key!r} appears twice in one file (first on {first})"
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(tree).__name__}")
    return _normalize(tree)


def merge_files(paths: list[str], cli: dict[str, Any] | None = None) -> tuple[dict, dict[str, str], list[Override]]:
    """Merge YAML files left to right, then the command line's keys. Returns (values, file each
    key came from, overrides)."""
    merged: dict = {}
    origin: dict[str, str] = {}
    overrides: list[Override] = []

    def record(name: str, value: Any, path: str) -> None:
        origin[name] = path
        if isinstance(value, dict):
            for key, inner in value.items():
                record(f"{name}.{key}", inner, path)

    def merge_into(dst: dict, src: dict, prefix: str, path: str) -> None:
        for key, value in src.items():
            name = prefix + key
            if key in dst and isinstance(dst[key], dict) and isinstance(value, dict):
                merge_into(dst[key], value, name + ".", path)
                continue
            if key in dst and dst[key] != value:
                overrides.append(Override(name, dst[key], origin[name], value, path))
            dst[key] = value
            record(name, value, path)

    for path in paths:
        merge_into(merged, read_yaml(path), "", str(path))
    merge_into(merged, _normalize(cli or {}), "", "the command line")
    return merged, origin, overrides


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def known_keys() -> dict[str, str]:
    """Every top-level YAML key and the group that owns it."""
    owner: dict[str, str] = {}
    for group, cls in GROUPS.items():
        for name in _field_names(cls):
            assert name not in owner, f"{name} declared in two groups"
            owner[name] = group
    return owner


def unknown_key_error(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{where}{hint}")


def _coerce(value: Any, hint: Any, name: str, where: str) -> Any:
    """Check a YAML value against a field's type; ints are accepted where floats are expected,
    and a Literal accepts only its listed values."""
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}{where}: expected a mapping, got {value!r}")
        return build_dataclass(hint, value, name + ".", where)
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{name} is {value!r}; choose one of {', '.join(map(repr, args))}")
    allowed = [a for a in args if a is not type(None)] if args else [hint]
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{name}{where}: must not be null")
    for kind in allowed:
        if typing.get_origin(kind) is typing.Literal or dataclasses.is_dataclass(kind):
            return _coerce(value, kind, name, where)  # Optional[Literal] / Optional[block]
        origin = typing.get_origin(kind) or kind
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is float and isinstance(value, str):
            try:  # YAML reads 1e-5 without a dot as a string
                return float(value)
            except ValueError:
                pass
        if origin in (str, bool, list, dict) and isinstance(value, origin):
            return value
    expected = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ConfigError(f"{name}{where}: expected {expected}, got {value!r}")


def build_dataclass(cls: type, values: dict, prefix: str = "", where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = _field_names(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise unknown_key_error(prefix + key, [prefix + n for n in names], where)
        kwargs[key] = _coerce(value, hints[key], prefix + key, where)
    return cls(**kwargs)


def split_into_groups(values: dict, origin: dict[str, str]) -> dict[str, Any]:
    """Route flat keys to their groups and build each typed group."""
    owner = known_keys()
    per_group: dict[str, dict] = {g: {} for g in GROUPS}
    for key, value in values.items():
        if key not in owner:
            raise unknown_key_error(key, list(owner), f" (in {origin.get(key, '?')})")
        per_group[owner[key]][key] = value
    groups = {}
    for group, cls in GROUPS.items():
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in per_group[group].items():
            kwargs[key] = _coerce(value, hints[key], key, f" (in {origin.get(key, '?')})")
        groups[group] = cls(**kwargs)
    return groups
