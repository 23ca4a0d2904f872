"""No input makes the loader raise anything but SpecError (property-based)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.core.errors import SpecError
from builder.spec.loader import load_class, parse_yaml, validate_document

ROOT = Path(__file__).resolve().parents[2]
QEMU = yaml.safe_load((ROOT / "images/qemu-x86_64.yaml").read_text())

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                    st.text(max_size=30), st.sampled_from(["fp32", "x86_64", "1GiB", "-1", "sha256:00"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=20)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


PATHS = _paths(QEMU)[1:]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=300))
def test_random_text_never_raises_anything_but_spec_error(text: str, tmp_path_factory: Any) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "x.yaml"
    path.write_text(text)
    try:
        load_class(path)
    except SpecError as exc:
        assert exc.problems


@settings(max_examples=300, deadline=None)
@given(data=values)
def test_random_yaml_documents(data: Any) -> None:
    text = yaml.safe_dump(data)
    try:
        validate_document(parse_yaml(text, "fuzz.yaml"), "fuzz.yaml")
    except SpecError as exc:
        assert exc.problems


@settings(max_examples=400, deadline=None)
@given(where=st.sampled_from(PATHS), value=values)
def test_mutated_real_spec(where: tuple[Any, ...], value: Any) -> None:
    doc = copy.deepcopy(QEMU)
    doc["metadata"].pop("extends", None)
    node = doc
    for part in where[:-1]:
        node = node[part]
    node[where[-1]] = value
    try:
        validate_document(parse_yaml(yaml.safe_dump(doc), "fuzz.yaml"), "fuzz.yaml")
    except SpecError as exc:
        assert exc.problems and all(p.startswith("fuzz.yaml") for p in exc.problems)
