"""Typed JSON records: the files the builder writes and the device reads, one dataclass each.

A record is a frozen dataclass whose fields are declared with `key()`: the JSON name, what it means
(the generated reference, docs/device-contract.md, prints it), and any constraint. `load` checks a
parsed JSON value against it and raises ContractError naming where the problem is
(`release.json: models[1].sha256: missing`); `dump` gives back the JSON object; `describe` the rows
of the reference. Standard library only: this runs on the device, in the image's python3.

Types understood: str, int, float, bool, a nested record, tuple[X, ...] (a JSON list), dict[str, X]
(a JSON object), and `X | None` (null or absent).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
COMMENT = "$comment"  # allowed in every object: people annotate hand-written overrides


class ContractError(ValueError):
    """A record that does not match its type: in which file (`source`), where in it (a JSON path, empty for
    the whole) and what."""

    def __init__(self, source: str, path: str, problem: str) -> None:
        super().__init__(f"{source}: {path}: {problem}" if path else f"{source}: {problem}")
        self.source, self.path, self.problem = source, path, problem


def key(name: str, doc: str, *, default: Any = dataclasses.MISSING, choices: Sequence[str] | None = None,
        positive: bool = False, nonempty: bool = False) -> Any:
    """A record field: its JSON name, what it means, and its constraints. Without a default it is required.
    A dict default (a JSON object) is copied for each record."""
    meta = {"json": name, "doc": doc, "choices": tuple(choices) if choices is not None else None,
            "positive": positive, "nonempty": nonempty}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=meta)
    if isinstance(default, (list, set)):
        raise TypeError("use a tuple as a list's default")
    return dataclasses.field(default=default, metadata=meta)


def default_of(f: dataclasses.Field[Any]) -> Any:
    """A field's default value (MISSING: the field is required)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


@dataclass(frozen=True)
class Row:
    """One line of a record's reference."""

    path: str
    type: str
    required: bool
    default: str
    doc: str


def load(cls: type[T], data: Any, source: str, *, ignore_unknown: bool = False) -> T:
    """`data` (read from `source`) as a `cls`; ContractError, naming the field, when it does not fit. Unknown
    keys are an error unless `ignore_unknown` (a file from a newer writer, whose schemaVersion says so)."""
    return _load(cls, data, _At(source, ""), ignore_unknown)


@dataclass(frozen=True)
class _At:
    source: str
    path: str

    def __truediv__(self, name: str) -> _At:
        return _At(self.source, f"{self.path}.{name}" if self.path else name)

    def index(self, i: int) -> _At:
        return _At(self.source, f"{self.path}[{i}]")

    def error(self, problem: str) -> ContractError:
        return ContractError(self.source, self.path, problem)


def _load(cls: type[T], data: Any, where: _At, ignore_unknown: bool) -> T:
    if not isinstance(data, Mapping):
        raise where.error(f"expected an object, got {_kind(data)}")
    fields = _fields(cls)
    known = {f.metadata["json"] for f in fields}
    unknown = sorted(str(k) for k in data if k not in known and k != COMMENT)
    if unknown and not ignore_unknown:
        raise where.error(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                                   f"(known: {', '.join(sorted(known))})")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields:
        name = f.metadata["json"]
        at = where / name
        value = data.get(name)
        if value is None:
            if default_of(f) is dataclasses.MISSING:
                raise at.error("missing" if name not in data else "must not be null")
            if name in data and not _optional(hints[f.name]):
                raise at.error("must not be null")
            continue  # the default
        values[f.name] = _check(f, _convert(hints[f.name], value, at, ignore_unknown), at)
    return cls(**values)


def dump(record: Any) -> dict[str, Any]:
    """A record as its JSON object (every field, null where unset)."""
    return {f.metadata["json"]: _dump_value(getattr(record, f.name)) for f in _fields(type(record))}


def describe(cls: type, prefix: str = "") -> Iterator[Row]:
    """The reference rows of a record and of the records it holds (their paths dotted, lists as `[]`)."""
    hints = typing.get_type_hints(cls)
    for f in _fields(cls):
        path = f"{prefix}{f.metadata['json']}"
        hint = hints[f.name]
        doc = f.metadata["doc"]
        if f.metadata["choices"]:
            doc += f" One of: {', '.join(f'`{c}`' for c in f.metadata['choices'])}."
        if f.metadata["positive"]:
            doc += " Above 0."
        value = default_of(f)
        default = "" if value is dataclasses.MISSING else _show_default(value)
        yield Row(path, _type_text(hint), value is dataclasses.MISSING, default, doc)
        inner = _record_inside(hint)
        if inner is not None:
            yield from describe(inner, f"{path}[]." if _is_sequence(hint) else f"{path}.")


# -- internals ---------------------------------------------------------------------------------


def _fields(cls: type) -> tuple[dataclasses.Field[Any], ...]:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a record")
    return tuple(f for f in dataclasses.fields(cls) if "json" in f.metadata)


def _optional(hint: Any) -> bool:
    return _is_union(hint) and type(None) in typing.get_args(hint)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _strip_none(hint: Any) -> Any:
    if _is_union(hint):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]  # noqa: UP007
    return hint


def _is_sequence(hint: Any) -> bool:
    return typing.get_origin(_strip_none(hint)) is tuple


def _record_inside(hint: Any) -> type | None:
    hint = _strip_none(hint)
    origin = typing.get_origin(hint)
    if origin is tuple:
        hint = typing.get_args(hint)[0]
    elif origin is dict:
        hint = typing.get_args(hint)[1]
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, (int, float)):
        return f"{value!r} (a number)"
    if isinstance(value, str):
        return f"{value[:40]!r} (a string)"
    return "a list" if isinstance(value, list) else "an object" if isinstance(value, dict) else type(value).__name__


def _convert(hint: Any, value: Any, at: _At, ignore_unknown: bool) -> Any:
    hint = _strip_none(hint)
    origin = typing.get_origin(hint)
    if hint is str:
        if not isinstance(value, str):
            raise at.error(f"expected a string, got {_kind(value)}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise at.error(f"expected true or false, got {_kind(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise at.error(f"expected a whole number, got {_kind(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise at.error(f"expected a number, got {_kind(value)}")
        return float(value)
    if origin is tuple:
        if not isinstance(value, list):
            raise at.error(f"expected a list, got {_kind(value)}")
        item = typing.get_args(hint)[0]
        return tuple(_convert(item, v, at.index(i), ignore_unknown) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise at.error(f"expected an object, got {_kind(value)}")
        item = typing.get_args(hint)[1]
        return {str(k): _convert(item, v, at / str(k), ignore_unknown) for k, v in value.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _load(hint, value, at, ignore_unknown)
    raise TypeError(f"{at.path}: the record declares a type typed.py does not know: {hint!r}")


def _check(f: dataclasses.Field[Any], value: Any, at: _At) -> Any:
    choices = f.metadata["choices"]
    if choices is not None and value not in choices:
        raise at.error(f"{_kind(value)} is not one of {', '.join(choices)}")
    if f.metadata["positive"] and not value > 0:
        raise at.error(f"must be above 0, got {value!r}")
    if f.metadata["nonempty"] and not value:
        raise at.error("must not be empty")
    return value


def _dump_value(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dump(value)
    if isinstance(value, tuple):
        return [_dump_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump_value(v) for k, v in value.items()}
    return value


def _type_text(hint: Any) -> str:
    optional = _optional(hint)
    hint = _strip_none(hint)
    origin = typing.get_origin(hint)
    if origin is tuple:
        text = f"list of {_type_text(typing.get_args(hint)[0])}"
    elif origin is dict:
        text = f"object of {_type_text(typing.get_args(hint)[1])}"
    elif isinstance(hint, type) and dataclasses.is_dataclass(hint):
        text = "object"
    else:
        text = {str: "string", int: "integer", float: "number", bool: "boolean"}.get(hint, str(hint))
    return f"{text} or null" if optional else text


def _show_default(value: Any) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return "(below)"
    if isinstance(value, dict):
        return json.dumps(value) if value else "{}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return json.dumps(_dump_value(value))
    return f'"{value}"' if isinstance(value, str) else str(value)
