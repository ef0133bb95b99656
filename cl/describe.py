"""``cl describe NAME``: every option of a strategy, dataset or PEFT method, from its typed config."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from cl.errors import UserError

# family, registry attribute in cl.registry, where the section goes in a run config
FAMILIES = (("strategy", "STRATEGIES", "strategy"), ("dataset", "BENCHMARKS", "benchmark.dataset"), ("PEFT method", "PEFT", "strategy.peft"))


def describe(name: str) -> list[str]:
    """Lines describing ``name`` in every family that has it; a one-line error if none does."""
    from cl import registry

    out: list[str] = []
    for family, attr, section in FAMILIES:
        reg = getattr(registry, attr)
        if name not in reg:
            continue
        entry = reg.entry(name)
        model = entry.config or entry.builder
        out.append(f"{family} '{name}': {entry.help}" if entry.help else f"{family} '{name}'")
        out.append(f"  in a run config: {section}: {{name: {name}, ...}}")
        if isinstance(model, type) and issubclass(model, BaseModel):
            out += [f"  {line}" for line in options(model)]
        out.append("")
    if not out:
        raise UserError(f"'{name}' is not a strategy, dataset or PEFT method (see: cl list strategies | benchmarks | peft)")
    return out[:-1]


def options(model: type[BaseModel]) -> list[str]:
    """One line per option of ``model`` (its ``name`` excluded): ``key: type = default  # description``."""
    rows = []
    for key, field in model.model_fields.items():
        if key == "name":
            continue
        rows.append((key, type_name(field.annotation) + bounds(field), default_text(field), field.description or ""))
    if not rows:
        return ["(no options)"]
    wk = max(len(r[0]) for r in rows)
    wt = max(len(r[1]) for r in rows)
    wd = max(len(r[2]) for r in rows)
    return [f"{k:<{wk}}  {t:<{wt}}  {d:<{wd}}  {desc}".rstrip() for k, t, d, desc in rows]


def type_name(annotation: Any) -> str:
    """A YAML reader's name for a type: ``sgd | adam``, ``int | null``, ``list[int]``, ``{name: ...}``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin in (list, tuple, set):
        inner = ", ".join(type_name(a) for a in args if a is not Ellipsis)
        return f"list[{inner}]" if inner else "list"
    if origin is dict:
        return "mapping"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        named = "name" in annotation.model_fields
        return "{name: ..., ...}" if named else "{...}"
    return getattr(annotation, "__name__", str(annotation))


def bounds(field: Any) -> str:
    """The field's numeric bounds, as `` >= 1``, `` in (0, 1]``."""
    limits = {}
    for m in field.metadata:
        for attr in ("ge", "gt", "le", "lt"):
            if getattr(m, attr, None) is not None:
                limits[attr] = getattr(m, attr)
    low = f"[{limits['ge']}" if "ge" in limits else f"({limits['gt']}" if "gt" in limits else None
    high = f"{limits['le']}]" if "le" in limits else f"{limits['lt']})" if "lt" in limits else None
    if low and high:
        return f" in {low}, {high}"
    if low:
        return f" {'>=' if 'ge' in limits else '>'} {low[1:]}"
    if high:
        return f" {'<=' if 'le' in limits else '<'} {high[:-1]}"
    return ""


def default_text(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        name = getattr(value, "name", None)
        return f"= {{name: {name}}}" if name else "= {...}"
    if value is None:
        return "= null"
    if isinstance(value, bool):
        return f"= {str(value).lower()}"
    return f"= {value!r}" if isinstance(value, str) else f"= {value}"
