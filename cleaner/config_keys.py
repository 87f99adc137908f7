"""Every key of a job config, read from its pydantic model: for `--help` and for tests.

`config_keys(CleanJobConfig)` walks the nested sections and returns one `ConfigKey` per
leaf (`scoring.batch_size`, ...) with its type, default, bounds (gt/ge/lt/le, lengths),
Literal choices and description, so help texts and generated tests never restate them.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

_BOUNDS = (
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Lt, "lt", "<"),
    (annotated_types.Le, "le", "<="),
    (annotated_types.MinLen, "min_length", "length >="),
    (annotated_types.MaxLen, "max_length", "length <="),
)


@dataclass(frozen=True)
class ConfigKey:
    """One leaf key of a job config."""

    key: str
    """dotted path, as written in a `key=value` override (`scoring.batch_size`)"""
    annotation: Any
    """the field's type (`int`, `float | Literal['auto']`, ...)"""
    required: bool
    default: Any
    """the default value (None when required; default factories are called)"""
    bounds: dict[str, Any]
    """numeric and length bounds by name: gt, ge, lt, le, min_length, max_length"""
    choices: tuple[Any, ...]
    """the Literal values the key accepts ((): any value of its type)"""
    description: str

    @property
    def type_name(self) -> str:
        return type_name(self.annotation)

    @property
    def bounds_text(self) -> str:
        """The bounds in words: `> 0`, `>= 0, <= 1` ('' when unbounded)."""
        return ", ".join(f"{s} {self.bounds[n]}" for _, n, s in _BOUNDS if n in self.bounds)

    @property
    def constraints(self) -> str:
        """The bounds and choices in words: `>= 0, <= 1`, `one of per_class, global`."""
        words = [self.bounds_text] if self.bounds else []
        if self.choices:
            words.append("one of " + ", ".join(_show(c) for c in self.choices))
        return ", ".join(words)


def config_keys(model: type[BaseModel], prefix: str = "") -> list[ConfigKey]:
    """The leaf keys of `model`, nested sections walked depth first in field order."""
    keys: list[ConfigKey] = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        section = _section_model(field.annotation)
        if section is not None:
            keys.extend(config_keys(section, dotted + "."))
            continue
        keys.append(
            ConfigKey(
                key=dotted,
                annotation=field.annotation,
                required=field.is_required(),
                default=_default(field),
                bounds=_bounds(field),
                choices=_literal_choices(field.annotation),
                description=field.description or "",
            )
        )
    return keys


def format_config_keys(model: type[BaseModel], prefix: str = "") -> str:
    """A plain-text table of the keys, one or two lines per key, for `--help`."""
    lines = []
    for key in config_keys(model, prefix):
        default = "required" if key.required else f"default {_show(key.default)}"
        facts = [key.type_name, default]
        if key.bounds:
            facts.append(key.bounds_text)
        lines.append(f"  {key.key}  ({'; '.join(facts)})")
        if key.description:
            lines.append(f"      {key.description}")
    return "\n".join(lines)


def type_name(annotation: Any) -> str:
    """A short readable type: `int`, `str | list[str]`, `float | 'auto'`, `'fp32' | 'bf16'`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(_show(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if annotation is type(None):
        return "null"
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(annotation, "__name__", str(annotation))


def _section_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _default(field: FieldInfo) -> Any:
    if field.default_factory is not None:
        return field.default_factory()
    return None if field.default is PydanticUndefined else field.default


def _bounds(field: FieldInfo) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for item in field.metadata:
        for kind, name, _ in _BOUNDS:
            if isinstance(item, kind):
                found[name] = getattr(item, name)
    return found


def _literal_choices(annotation: Any) -> tuple[Any, ...]:
    """The Literal values in the annotation, with True/False when it also allows a bool."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
        literals = [c for m in members for c in _literal_choices(m)]
        if literals and all(typing.get_origin(m) is Literal or m is bool for m in members):
            return (*((True, False) if bool in members else ()), *literals)
        return tuple(literals) if literals and len(members) == 1 else ()
    return ()


def _show(value: Any) -> str:
    """A value as it is written in YAML / key=value (null, true, 'auto' -> auto)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)
