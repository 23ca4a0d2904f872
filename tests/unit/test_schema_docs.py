"""The committed JSON Schema and spec reference match the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.spec import docs

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path, generate", [
    ("schema/hardware-class.schema.json", docs.schema_json),
    ("docs/spec-reference.md", docs.spec_reference),
    ("docs/device-contract.md", docs.device_contract),
], ids=["schema", "reference", "device-contract"])
def test_generated_file_is_current(path: str, generate) -> None:  # type: ignore[no-untyped-def]
    committed = (ROOT / path).read_text()
    assert committed == generate(), (
        f"{path} is stale: run `kiln schema -o schema/hardware-class.schema.json` and "
        "`kiln schema --format markdown -o docs/spec-reference.md` and "
        "`kiln schema --format device-contract -o docs/device-contract.md`")


def test_schema_forbids_unknown_keys_and_lists_enums() -> None:
    schema = json.loads((ROOT / "schema/hardware-class.schema.json").read_text())
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["Precision"]["enum"] == ["auto", "fp32", "fp16", "int8"]
    assert "kernel" in schema["$defs"]["Spec"]["properties"]
