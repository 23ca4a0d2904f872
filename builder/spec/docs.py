"""Generated documentation: the JSON Schema and the Markdown spec reference."""

from __future__ import annotations

import json
from typing import Any

from builder.spec.loader import json_schema

HEADER = """# Hardware-class spec reference

Generated from the model in `builder/spec/schema.py` by `kiln schema --format markdown`;
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


# --- the device contract: docs/device-contract.md ------------------------------------------------------

CONTRACT_HEADER = """# Device contract reference

Generated from the records in `kiln_device/contract.py` and `kiln_device/channel.py`
by `kiln schema --format device-contract`; do not edit by hand (a test fails when this
file is stale).

What the builder and the device agree on. The builder writes each file below through
its record (`kiln_device.typed`), and every reader on the device parses it through the
same record: a missing field, a field of the wrong type and a key the record does not
know are errors that name the file and the field
(`/usr/lib/kiln/release.json: models[0].sha256: missing`), never a `KeyError` or a
silently defaulted value.
"""


def _record_table(record: type) -> list[str]:
    from kiln_device.typed import describe

    lines = ["| field | type | required | default | meaning |", "|---|---|---|---|---|"]
    for row in describe(record):
        default = f"`{row.default}`" if row.default and row.default != "(below)" else row.default
        lines.append(f"| `{row.path}` | {row.type} | {'yes' if row.required else ''} | {default} | "
                     f"{' '.join(row.doc.split())} |")
    return [*lines, ""]


def device_contract() -> str:
    from kiln_device import channel as ch
    from kiln_device import contract as c

    out = [CONTRACT_HEADER, "## Paths on the device", "", "| path | what |", "|---|---|"]
    out += [f"| `{path}` | {doc} |" for path, doc in c.PATHS.items()]
    out += ["", f"## release.json (`{c.RELEASE_JSON}`)", "",
            f"What an image says about itself; written by `kiln build`. `schemaVersion` is "
            f"{c.RELEASE_SCHEMA}. A reader refuses a key it does not know in a `schemaVersion` it knows "
            "(a typo, or a hand-edited file), and ignores it in a newer one: a later Kiln may add fields "
            "that an older agent still installs by. A file without `schemaVersion` is version 1.", "",
            *_record_table(c.Release)]
    out += [f"## agent.json (`{c.AGENT_JSON}`, `{c.AGENT_OVERRIDE_JSON}`)", "",
            " ".join((c.AgentFile.__doc__ or "").split()) + " Each file is checked on its own, and "
            "`kiln disk --etc kiln/agent.json=FILE` checks an override before it goes on a disk.", "",
            *_record_table(c.AgentFile)]
    out += ["## Channel targets (TUF `custom`)", "",
            f"A release is the target `{ch.target_path('<class>', '<channel>', '<version>')}` of the channel's "
            "signed targets metadata; its length and sha256 are those of the image's OCI manifest. The channel's "
            f"rollout state is the target `{ch.rollout_path('<class>', '<channel>')}` of the delegated `rollout` "
            "role. Readers ignore keys they do not know here (the metadata is signed; a later Kiln may add "
            "some).", "", *_record_table(ch.TargetCustom),
            f"### The rollout (`{ch.rollout_path('<class>', '<channel>')}`)", "",
            "Signed by the `rollout` key; `kiln release` starts it, `kiln rollout` and the fleet service move it "
            "(docs/fleet.md). A device takes its release only once the wave its stable place falls in is open.",
            "", *_record_table(ch.Rollout)]
    out += ["## Boot", "",
            f"- Partition labels: `{c.ESP_LABEL}`, `{c.slot_label('a')}`, `{c.slot_label('b')}`, "
            f"`{c.DATA_LABEL}`.",
            f"- Each slot's kernel and initramfs on the ESP: `{c.esp_kernel_dir('<slot>')}/vmlinuz`, "
            f"`{c.esp_kernel_dir('<slot>')}/initramfs.img`.",
            f"- Boot entries: `{c.entry_name('<version>', '<slot>')}`; a trial entry carries systemd's boot "
            f"counter, `{c.entry_name('<version>', '<slot>', 3)}`. loader.conf's default is `{c.ENTRY_PATTERN}`, "
            "never one pinned entry.",
            f"- The kernel command line names the booted slot: `{c.SLOT_KARG}=<slot>`. An image's kernelArgs "
            f"may not set {', '.join(f'`{a}`' for a in c.RESERVED_KERNEL_ARGS)}.", ""]
    out += ["## OCI labels", "", "| label | what |", "|---|---|"]
    out += [f"| `{name}` | {doc} |" for name, doc in c.LABELS.items()]
    out += [f"| `{c.model_label('<model>', '<key>')}` | Each model's `digest`, `precision` and `version`. |", ""]
    out += ["## Programs", "", f"`python3 -I {c.LAUNCHER} PROGRAM [ARGS]` runs:", "",
            "| program | module |", "|---|---|"]
    out += [f"| `{name}` | `{module}` |" for name, module in c.PROGRAMS.items()]
    out += ["", "## kiln-agent exit codes", "", "`kiln-agent --help` says what each means.", "",
            "| code | name |", "|---|---|"]
    out += [f"| {code} | `{name}` |" for name, code in sorted(c.AGENT_EXIT_CODES.items(), key=lambda kv: kv[1])]
    return "\n".join(out).rstrip() + "\n"
