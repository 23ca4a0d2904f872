"""Load hardware-class specs: YAML -> merged dict -> HardwareClass, strictly.

Every problem is collected and raised at once as a SpecError, each line with
its file and line, its path (`spec.models[0].precision`) and, for misspelled
keys, a suggestion. Nothing in here may raise anything but SpecError.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from builder.core import paths
from builder.core.errors import SpecError
from builder.core.locations import Loc, format_loc, where
from builder.spec import rules
from builder.spec.schema import API_VERSION, HardwareClass
from builder.spec.stand_in import SUFFIX, finalize_stand_in_data, finalize_stand_in_lines, stand_in_target


@dataclass
class Document:
    """A parsed YAML file: plain data plus where each path came from."""

    data: Any
    lines: dict[Loc, str] = field(default_factory=dict)


class _Problem(Exception):
    def __init__(self, where: str, message: str) -> None:
        super().__init__(message)
        self.where = where
        self.message = message


# --- YAML with line numbers and no duplicate keys -------------------------


def parse_yaml(text: str, source: str) -> Document:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise SpecError(source, [f"{source}: {_yaml_error(exc)}"]) from None
    if node is None:
        raise SpecError(source, [f"{source}: the file is empty"])
    doc = Document(data=None)
    problems: list[str] = []
    try:
        doc.data = _construct(node, (), doc, source, problems)
    except _Problem as exc:
        raise SpecError(source, [f"{exc.where}: {exc.message}"]) from None
    if problems:
        raise SpecError(source, problems)
    return doc


def _yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return f"{where}invalid YAML: {problem}"


_CONSTRUCTOR = yaml.SafeLoader("")
MAX_NODES = 20_000
MAX_DEPTH = 64


def _construct(node: yaml.Node, loc: Loc, doc: Document, source: str, problems: list[str]) -> Any:
    where = f"{source}:{node.start_mark.line + 1}"
    if len(loc) > MAX_DEPTH or len(doc.lines) > MAX_NODES:
        raise _Problem(where, "document too deep or too large (recursive or expanding aliases?)")
    doc.lines[loc] = where
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node, doc, source, problems)
            if not isinstance(key, str):
                problems.append(f"{source}:{key_node.start_mark.line + 1}: "
                                f"{format_loc(loc)}: key {key!r} must be a string")
                continue
            if key in out:
                problems.append(f"{source}:{key_node.start_mark.line + 1}: "
                                f"{format_loc((*loc, key))}: duplicate key")
                continue
            out[key] = _construct(value_node, (*loc, key), doc, source, problems)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(v, (*loc, i), doc, source, problems) for i, v in enumerate(node.value)]
    return _scalar(node, doc, source, problems)


def _scalar(node: yaml.Node, doc: Document, source: str, problems: list[str]) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        problems.append(f"{source}:{node.start_mark.line + 1}: keys must be plain strings")
        return None
    try:
        return _CONSTRUCTOR.construct_object(node, deep=True)  # type: ignore[no-untyped-call]
    except (yaml.YAMLError, ValueError, OverflowError) as exc:
        problems.append(f"{source}:{node.start_mark.line + 1}: {exc}")
        return None


# --- files, extends, validation --------------------------------------------


def known_classes(images_dir: Path | None = None) -> list[str]:
    """The classes in images/, and `<class>-stand-in` after each class whose file has spec.standIn."""
    images_dir = images_dir or paths.images_dir()
    names = []
    for path in sorted(images_dir.glob("*.yaml")):
        if path.name.startswith("_"):
            continue
        names.append(path.stem)
        if _declares_stand_in(path) and not path.with_name(f"{path.stem}{SUFFIX}.yaml").exists():
            names.append(f"{path.stem}{SUFFIX}")
    return names


def _declares_stand_in(path: Path) -> bool:
    try:
        data = read_document(path).data
    except SpecError:
        return False  # loading the class says what is wrong with it
    spec = data.get("spec") if isinstance(data, dict) else None
    return isinstance(spec, dict) and "standIn" in spec


def resolve_class_path(ref: str, images_dir: Path | None = None) -> Path:
    """CLASS is a name from images/ or a path to a YAML file; `<class>-stand-in` is the class's file."""
    if ref.endswith((".yaml", ".yml")) or "/" in ref:
        return Path(ref)
    images_dir = images_dir or paths.images_dir()
    path = images_dir / f"{ref}.yaml"
    target = stand_in_target(ref)
    if not path.exists() and target is not None and (images_dir / f"{target}.yaml").exists():
        return images_dir / f"{target}.yaml"
    if not path.exists():
        names = known_classes(images_dir)
        close = difflib.get_close_matches(ref, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise SpecError(ref, [f"no hardware class named '{ref}' in {_rel(images_dir)}{hint}; "
                              f"known: {', '.join(names)}"])
    return path


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def read_document(path: Path) -> Document:
    source = _rel(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(source, [f"{source}: no such file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(source, [f"{source}: cannot read: {exc}"]) from None
    return parse_yaml(text, source)


def deep_merge(base: Any, over: Any) -> Any:
    """Mappings merge key by key; anything else (lists included) is replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = deep_merge(base[key], value) if key in base else value
        return out
    return over


def load_merged(path: Path) -> Document:
    """The class document with its `metadata.extends` defaults merged under it."""
    doc = read_document(path)
    source = _rel(path)
    if not isinstance(doc.data, dict):
        raise SpecError(source, [f"{source}: expected a mapping with apiVersion, kind, metadata, spec"])
    meta = doc.data.get("metadata")
    extends = meta.get("extends") if isinstance(meta, dict) else None
    if extends is None:
        return doc
    if not isinstance(extends, str) or "/" in extends or not extends:
        raise SpecError(source, [f"{doc.lines.get(('metadata', 'extends'), source)}: "
                                 "metadata.extends: expected the name of a defaults file next to this one"])
    defaults = read_defaults(path.parent / f"{extends}.yaml", doc.lines[("metadata", "extends")])
    merged = Document(data=dict(doc.data), lines={**defaults.lines, **doc.lines})
    merged.data["spec"] = deep_merge(defaults.data.get("spec", {}), doc.data.get("spec", {}))
    return merged


def read_defaults(path: Path, referrer: str) -> Document:
    if not path.exists():
        raise SpecError(referrer, [f"{referrer}: metadata.extends: no defaults file {_rel(path)}"])
    doc = read_document(path)
    source = _rel(path)
    problems = []
    data = doc.data if isinstance(doc.data, dict) else {}
    if data.get("apiVersion") != API_VERSION:
        problems.append(f"{source}: apiVersion: expected {API_VERSION}")
    if data.get("kind") != "HardwareClassDefaults":
        problems.append(f"{source}: kind: expected HardwareClassDefaults")
    for key in sorted(set(data) - {"apiVersion", "kind", "metadata", "spec"}):
        problems.append(f"{doc.lines.get((key,), source)}: {key}: unknown key")
    if not isinstance(data.get("spec", {}), dict):
        problems.append(f"{source}: spec: expected a mapping")
    if problems:
        raise SpecError(source, problems)
    return doc


def load_class(ref: str | Path, images_dir: Path | None = None) -> HardwareClass:
    """Load, merge, validate and contract-check one class. Raises SpecError only.
    `<class>-stand-in` is the class's stand-in (builder.spec.stand_in), from the class's own file."""
    target = stand_in_target(ref) if isinstance(ref, str) else None
    folder = images_dir or paths.images_dir()
    if target is not None and not (folder / f"{ref}.yaml").exists() and (folder / f"{target}.yaml").exists():
        return load_stand_in(target, images_dir)
    path = ref if isinstance(ref, Path) else resolve_class_path(ref, images_dir)
    doc = load_merged(path)
    return validate_document(doc, _rel(path), path)


def load_stand_in(target: str, images_dir: Path | None = None) -> HardwareClass:
    """The stand-in of class TARGET: the class validated as it is, then the stand-in derived from it
    and validated again, its problems located in the class's file (spec.standIn where they come from)."""
    path = resolve_class_path(target, images_dir)
    source = _rel(path)
    doc = load_merged(path)
    hc = validate_document(doc, source, path)
    if hc.spec.stand_in is None:
        raise SpecError(source, [f"{source}: {target} has no spec.standIn, so there is no {target}{SUFFIX} "
                                 "(a stand-in replaces a vendor's base, kernel and runtime where they are out "
                                 "of reach; see docs/arm64.md)"])
    derived = Document(data=finalize_stand_in_data(hc), lines=finalize_stand_in_lines(doc.lines))
    return validate_document(derived, source, None, stand_in_for=hc.name)


def validate_document(doc: Document, source: str, path: Path | None = None, *,
                      stand_in_for: str | None = None) -> HardwareClass:
    try:
        hc = HardwareClass.model_validate(doc.data)
    except ValidationError as exc:
        errors = _drop_consequential(exc.errors())
        problems = [format_error(err, doc.lines, source) for err in errors]
        raise SpecError(source, problems) from None
    except (RecursionError, ValueError, TypeError) as exc:  # defensive: never a traceback
        raise SpecError(source, [f"{source}: cannot validate: {exc}"]) from None
    hc._stand_in_for = stand_in_for
    problems = rules.check(hc, doc.lines, source, path)
    if problems:
        raise SpecError(source, problems)
    return hc


def _drop_consequential(errors: list[Any]) -> list[Any]:
    """Drop "too short" on a list whose items already failed: one cause, one message."""
    nested = {tuple(e["loc"][:n]) for e in errors for n in range(len(e["loc"]))}
    return [e for e in errors if not (e["type"] == "too_short" and tuple(e["loc"]) in nested)]


def format_error(err: Any, lines: dict[Loc, str], source: str) -> str:
    loc: Loc = tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        msg = "unknown key" + _suggest(loc)
    elif kind == "missing":
        msg = "required key is missing"
    elif kind in ("literal_error", "enum"):
        msg = "expected one of " + _options(err)
    elif kind in ("value_error", "assertion_error"):
        msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    else:
        msg = _lower_first(err["msg"]) + f", got {_short(err.get('input'))}"
    return f"{where(lines, loc, source)}: {format_loc(loc)}: {msg}"


def _lower_first(text: str) -> str:
    text = text.replace("Input should be", "expected").replace("input should be", "expected")
    return text[:1].lower() + text[1:]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _options(err: Any) -> str:
    import re

    expected = str(err.get("ctx", {}).get("expected", ""))
    found = re.findall(r"'([^']*)'", expected)
    return ", ".join(found) if found else expected


def _suggest(loc: Loc) -> str:
    known = schema_keys_at(loc[:-1])
    key = str(loc[-1])
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:
        close = [k for k in known if k.lower() == key.lower().replace("_", "").replace("-", "")]
    return f" (did you mean '{close[0]}'?)" if close else ""


_SCHEMA: dict[str, Any] | None = None


def json_schema() -> dict[str, Any]:
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = HardwareClass.model_json_schema(by_alias=True)
    return _SCHEMA


def schema_keys_at(loc: Loc) -> list[str]:
    root = json_schema()
    node: Any = root
    for part in loc:
        node = _deref(root, node)
        if isinstance(part, int):
            node = node.get("items", {})
        else:
            node = node.get("properties", {}).get(part) or node.get("additionalProperties") or {}
    node = _deref(root, node)
    return list(node.get("properties", {}))


def _deref(root: dict[str, Any], node: Any) -> Any:
    for _ in range(10):
        if not isinstance(node, dict):
            return {}
        if "$ref" in node:
            node = root["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        elif "anyOf" in node:
            node = next((n for n in node["anyOf"] if n.get("type") != "null"), {})
        elif "allOf" in node:
            node = node["allOf"][0]
        else:
            return node
    return node
