"""Generated documentation: the JSON Schema and the Markdown spec reference."""

from __future__ import annotations

import json
from typing import Any

from builder.loader import json_schema

HEADER = """# Hardware-class spec reference

Generated from the model in `builder/spec.py` by `kiln schema --format markdown`;
do not edit by hand (a test fails when this file is stale). The JSON Schema is
`schema/hardware-class.schema.json` (`kiln schema`).

A class file is `images/<name>.yaml` with `apiVersion: kiln.dev/v1alpha1`,
`kind: HardwareClass`, `metadata` and `spec`. `metadata.extends` names a
`HardwareClassDefaults` file in the same directory whose `spec` is merged under
the class's (mappings merge key by key, lists are replaced). Unknown keys are
errors. Sizes take units (`512MiB`, `2GiB`). Paths are relative to the project
root (the directory holding `images/`).
"""


def schema_json() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def _type_of(node: dict[str, Any]) -> str:
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "enum" in node:
        return "one of " + ", ".join(f"`{v}`" for v in node["enum"])
    if "const" in node:
        return f"`{node['const']}`"
    if "anyOf" in node:
        parts = [_type_of(n) for n in node["anyOf"] if n.get("type") != "null"]
        return " or ".join(dict.fromkeys(parts))
    kind = node.get("type", "any")
    if kind == "array":
        return f"list of {_type_of(node.get('items', {}))}"
    if kind == "object" and "additionalProperties" in node:
        return f"map of {_type_of(node['additionalProperties'])}"
    return str(kind)


def _section(name: str, node: dict[str, Any]) -> list[str]:
    lines = [f"## {name}", ""]
    if node.get("description"):
        lines += [" ".join(node["description"].split()), ""]
    if "enum" in node:
        return [*lines, "Values: " + ", ".join(f"`{v}`" for v in node["enum"]), ""]
    required = set(node.get("required", []))
    lines += ["| key | type | required | default |", "|---|---|---|---|"]
    for key, prop in node.get("properties", {}).items():
        default = json.dumps(prop["default"]) if "default" in prop else ""
        lines.append(f"| `{key}` | {_type_of(prop)} | {'yes' if key in required else ''} | {default} |")
    return [*lines, ""]


def spec_reference() -> str:
    schema = json_schema()
    out = [HEADER, *_section("HardwareClass", schema)]
    for name, node in sorted(schema.get("$defs", {}).items()):
        out += _section(name, node)
    return "\n".join(out).rstrip() + "\n"
