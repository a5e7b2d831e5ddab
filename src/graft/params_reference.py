"""The reference of every ``params.yaml`` key, rendered as Markdown from the models in graft.config.

The documentation site builds its reference page from this (``docs/hooks/graft_docs.py``), so
a key added, removed or re-described in :mod:`graft.config` shows up in the docs without anyone
editing them.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from graft.config import Params


@dataclass(frozen=True)
class KeyDoc:
    """One ``params.yaml`` key: its dotted path (``[]`` marks a list item), type, default, rules."""

    key: str
    type: str
    default: str
    rules: str
    meaning: str


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds, directly or as the items of a list."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is list:
        return _section_model(get_args(annotation)[0])
    return None


def type_name(annotation: Any) -> str:
    """A reader's name for a field's type: ``int``, ``list of float``, ``one of a, b``."""
    origin = get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(f"`{value}`" for value in get_args(annotation))
    if origin in (Union, types.UnionType):
        names = ["null" if arg is type(None) else type_name(arg) for arg in get_args(annotation)]
        return " or ".join(names)
    if origin is list:
        return f"list of {type_name(get_args(annotation)[0])}"
    if origin is tuple:
        return "[" + ", ".join(type_name(arg) for arg in get_args(annotation)) + "]"
    if origin is dict:
        key, value = get_args(annotation)
        return f"mapping of {type_name(key)} to {type_name(value)}"
    if _section_model(annotation) is not None:
        return "mapping (keys below)"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"))


def _rules(field: FieldInfo) -> str:
    """The constraints pydantic enforces on a field (``Field(ge=..., pattern=...)``)."""
    rules = []
    for item in field.metadata:
        for attribute, symbol in _BOUNDS:
            bound = getattr(item, attribute, None)
            if bound is not None:
                rules.append(f"{symbol} {bound}")
        pattern = getattr(item, "pattern", None)
        if pattern:
            rules.append(f"matches `{pattern}`")
    return ", ".join(rules)


def _yaml_value(value: Any) -> str:
    """A default as it would be written in params.yaml, on one line."""
    if isinstance(value, list):  # e.g. select.candidates: a list of sections
        value = [item.model_dump() if isinstance(item, BaseModel) else item for item in value]
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def key_docs(
    model: type[BaseModel] = Params, prefix: str = "", defaults: BaseModel | None = None
) -> Iterator[KeyDoc]:
    """Every key of ``model``, depth first: a section's own keys, then its sub-sections'.

    ``defaults`` is the section's default value where its parent sets one (e.g.
    ``transfer.training`` has its own learning rate); without it, the model's field defaults.
    """
    nested = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        default = (
            getattr(defaults, name)
            if defaults is not None
            else field.get_default(call_default_factory=True)
        )
        section = _section_model(field.annotation)
        if section is not None and get_origin(field.annotation) is not list:
            nested.append((section, f"{key}.", default))
            continue
        yield KeyDoc(
            key=key,
            type=type_name(field.annotation),
            default="required" if field.is_required() else _yaml_value(default),
            rules=_rules(field),
            meaning=" ".join((field.description or "").split()),
        )
        if section is not None:  # a list of sections: its items' keys, as key[].item
            nested.append((section, f"{key}[].", None))
    for section, section_prefix, section_default in nested:
        yield from key_docs(section, section_prefix, section_default)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _summary(model: type[BaseModel]) -> str:
    doc = (model.__doc__ or "").strip()
    return " ".join(doc.split("\n\n")[0].split())


def params_reference_markdown() -> str:
    """The reference page's body: a table per top-level section, every key with its default."""
    blocks = []
    for name, field in Params.model_fields.items():
        section = _section_model(field.annotation)
        blocks += [f"## `{name}`", "", _summary(section), ""]
        blocks += ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        for doc in key_docs(section, f"{name}.", getattr(Params(), name)):
            blocks.append(
                f"| `{doc.key}` | {_cell(doc.type)} | `{_cell(doc.default)}` "
                f"| {_cell(doc.rules)} | {_cell(doc.meaning)} |"
            )
        blocks.append("")
    return "\n".join(blocks)
