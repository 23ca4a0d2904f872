"""The release report: one self-contained HTML file per release (inline CSS and SVG, no script, nothing fetched),
with a section per class, drawn from the build records only.

    html = render_report([record, ...], previous={cls: record})      # kiln report / kiln release

Per class: the version and image digest; the layer sizes by group; what a device downloads coming from the
previous release (the compressed layers that changed, plus the config), in bytes and as a share of the
image; the model gate table with a latency chart per candidate; the health checks and rollout stages; the
SBOM summary and the signature status. Each figure sits in an element with a `data-k` attribute, so a test
(and a reader's tooling) finds it by name.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from builder.core import paths, records
from builder.core.errors import UsageError
from kiln_device import version as kv

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em;color:#1b1f24;max-width:1100px}
h1{font-size:1.5em}h2{font-size:1.25em;border-bottom:1px solid #ccd;padding-bottom:.2em;margin-top:2em}
h3{font-size:1.05em;margin-top:1.4em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccd;padding:.25em .6em;text-align:left}
th{background:#eef1f5}td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#116329;font-weight:600}.bad{color:#a40e26;font-weight:600}.muted{color:#57606a}
code{font-size:.92em;background:#f3f4f6;padding:0 .25em}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def num(value: Any, spec: str) -> str:
    """A number as SPEC says, or the value escaped as it is (a report written by another Kiln)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return "" if value is None else esc(value)


def mib(n: int | float) -> str:
    return f"{n / 1048576:,.1f} MiB"


def group_sizes(record: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for layer in record.get("layers") or []:
        out[layer["group"]] = out.get(layer["group"], 0) + int(layer.get("size") or 0)
    return out


def download(record: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a device running PREVIOUS downloads to get RECORD: the compressed layers whose content changed, and
    the config; None without the registry's sizes (a record that was never pushed signed)."""
    manifest = record.get("manifest")
    if not manifest or len(manifest["layers"]) != len(record.get("layers") or []):
        return None
    total = manifest["config"] + sum(la["size"] for la in manifest["layers"])
    have = {la["diffId"] for la in (previous or {}).get("layers") or []}
    changed = [(rec, la) for rec, la in zip(record["layers"], manifest["layers"], strict=True)
               if rec["diffId"] not in have]
    nbytes = manifest["config"] + sum(la["size"] for _, la in changed)
    return {"from": (previous or {}).get("version"), "bytes": nbytes, "total": total, "share": nbytes / total,
            "layers": len(changed), "groups": sorted({rec["group"] for rec, _ in changed})}


def model_reports(record: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    context = Path(record.get("context") or "")
    out = []
    for m in record.get("models") or []:
        rep = context / "models" / m["name"] / m["version"] / "report.json"
        out.append((m, json.loads(rep.read_text()) if rep.is_file() else None))
    return out


def class_spec(record: dict[str, Any]) -> dict[str, Any]:
    spec = Path(record.get("context") or "") / "release" / "class.json"
    return dict(json.loads(spec.read_text()).get("spec") or {}) if spec.is_file() else {}


def latency_chart(candidates: list[dict[str, Any]]) -> str:
    """Horizontal bars: p50 and p95 per candidate (ms), as inline SVG."""
    rows = [c for c in candidates if all(isinstance(c.get(k), (int, float)) for k in ("p50_ms", "p95_ms"))]
    if not rows:
        return "<p class=muted>no latency measured</p>"
    top = max(float(c["p95_ms"]) for c in rows) or 1.0
    width, bar, label = 520, 12, 130
    height = len(rows) * (2 * bar + 12) + 24
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + label + 90}" height="{height}" '
             f'role="img" aria-label="latency per candidate">']
    y = 6
    for c in rows:
        parts.append(f'<text x="0" y="{y + bar + 4}" font-size="12">{esc(c["name"])}</text>')
        for key, colour, dy in (("p50_ms", "#54aeff", 0), ("p95_ms", "#0969da", bar + 2)):
            w = max(1.0, float(c[key]) / top * width)
            parts.append(f'<rect x="{label}" y="{y + dy}" width="{w:.1f}" height="{bar}" fill="{colour}"/>')
            parts.append(f'<text x="{label + w + 4:.1f}" y="{y + dy + bar - 2}" font-size="11">'
                         f'{key[:3]} {float(c[key]):.4f} ms</text>')
        y += 2 * bar + 12
    parts.append("</svg>")
    return "".join(parts)


def class_section(record: dict[str, Any], previous: dict[str, Any] | None) -> str:
    cls, version = record["class"], record["version"]
    k = esc(cls)
    pushed = next((p for p in reversed(record.get("pushed") or []) if p.get("signed")), None) or \
        (record.get("pushed") or [None])[-1]
    digest = (record.get("manifest") or {}).get("digest") or (pushed or {}).get("digest") or "not pushed"
    out = [f'<section id="{esc(cls)}"><h2>{esc(cls)} <span data-k="{k}.version">{esc(version)}</span></h2>',
           f'<p>image digest <code data-k="{k}.digest">{esc(digest)}</code>'
           + (f' at <code>{esc(pushed["ref"])}</code>' if pushed else "") + "</p>"]
    groups = group_sizes(record)
    out.append("<h3>Layers by group (uncompressed)</h3><table><tr><th>group</th><th>size</th><th>bytes</th></tr>")
    for g, n in groups.items():
        out.append(f'<tr><td>{esc(g)}</td><td class=n>{mib(n)}</td><td class=n data-k="{k}.layers.{esc(g)}">{n}'
                   "</td></tr>")
    out.append(f'<tr><th>total</th><th class=n>{mib(sum(groups.values()))}</th>'
               f'<th class=n data-k="{k}.layers.total">{sum(groups.values())}</th></tr></table>')
    dl = download(record, previous)
    out.append("<h3>What a device downloads</h3>")
    if dl is None:
        out.append("<p class=muted>no registry sizes in the record (pushed without signing)</p>")
    else:
        since = f"from {esc(dl['from'])}" if dl["from"] else "on a device with none of its layers"
        out.append(f'<p>{since}: <b data-k="{k}.download.bytes">{dl["bytes"]}</b> bytes '
                   f'({mib(dl["bytes"])}) of <span data-k="{k}.download.total">{dl["total"]}</span> compressed, '
                   f'<b data-k="{k}.download.share">{dl["share"]:.1%}</b>; {dl["layers"]} layers changed '
                   f'({esc(", ".join(dl["groups"]) or "none")})</p>')
    out.append("<h3>Model gates</h3>")
    for m, rep in model_reports(record):
        out.append(f'<p><b>{esc(m["name"])}</b> {esc(m["version"])}: shipped <span data-k="{k}.model.{esc(m["name"])}'
                   f'.precision">{esc(m["precision"])}</span>, <code>{esc(m["sha256"][:19])}</code></p>')
        if rep is None:
            out.append("<p class=muted>precision fixed by the spec: no gate run</p>")
            continue
        runtime = rep.get("runtime") or {}
        gated_isa = (runtime.get("isa") if runtime.get("measured_with") else None) or rep.get("host_isa")
        where = (f'{esc(runtime.get("measured_with") or "CPUExecutionProvider")} on '
                 f'<span data-k="{k}.model.{esc(m["name"])}.isa">{esc(gated_isa or "the build host")}</span>'
                 + (" (emulated: qemu-user)" if runtime.get("emulated") else "")
                 + (f', {esc(runtime.get("name"))} {esc(runtime.get("version"))}' if runtime.get("name") else ""))
        out.append(f"<p>gated figures measured with {where}"
                   + (f'; the build host\'s ({esc(rep.get("host_isa") or "?")}) figures kept as reference'
                      if rep.get("reference") else "") + "</p>")
        out.append("<table><tr><th>candidate</th><th>precision</th><th>size (bytes)</th>"
                   f"<th>{esc(rep.get('score') or rep.get('metric', 'metric'))}</th><th>p50 ms</th><th>p95 ms</th>"
                   "<th>speed-up</th>"
                   "<th>gates</th></tr>")
        for c in rep.get("candidates") or []:
            metric = c.get(rep.get("metric", "accuracy"))
            refused = ", ".join(g["gate"] for g in c.get("gates") or [] if not g["passed"])
            verdict = '<span class=ok>passed</span>' if c.get("passed") else \
                f'<span class=bad>refused</span> {esc(refused)}'
            chosen = " (chosen)" if c.get("name") == rep.get("chosen") else ""
            name = f"{m['name']}.{c.get('name')}"
            out.append(f'<tr><td>{esc(c.get("name"))}{chosen}</td><td>{esc(c.get("precision"))}</td>'
                       f'<td class=n data-k="{k}.gate.{esc(name)}.size">{esc(c.get("size_bytes"))}</td>'
                       f'<td class=n>{num(metric, ".4f")}</td><td class=n>{num(c.get("p50_ms"), ".4f")}</td>'
                       f'<td class=n data-k="{k}.gate.{esc(name)}.p95">{num(c.get("p95_ms"), ".4f")}</td>'
                       f'<td class=n>{num(c.get("speedup"), ".2f")}x</td><td>{verdict}</td></tr>')
        out.append("</table>")
        out.append("<p>" + "; ".join(esc(r) for r in rep.get("reasons") or []) + "</p>")
        out.append(latency_chart(rep.get("candidates") or []))
    spec = class_spec(record)
    rollout = spec.get("rollout") or {}
    out.append("<h3>Health checks and rollout</h3>")
    out.append(f'<p>health checks: <span data-k="{k}.health">{esc(", ".join(rollout.get("healthChecks") or []))}'
               f'</span> (boot tries {esc(rollout.get("bootTries"))}, timeout {esc(rollout.get("healthTimeoutSec"))} s)'
               "</p><table><tr><th>wave</th><th>percent</th><th>soak hours</th></tr>")
    for n, stage in enumerate(rollout.get("stages") or [], 1):
        out.append(f'<tr><td>{n}</td><td class=n data-k="{k}.stage.{n}">{esc(stage.get("percent"))}</td>'
                   f'<td class=n>{esc(stage.get("soakHours"))}</td></tr>')
    out.append(f"</table><p>channel {esc(rollout.get('channel'))}, halt above a failure rate of "
               f"{esc(rollout.get('maxFailureRate'))}</p>")
    att = record.get("attestations") or {}
    summary = att.get("sbomSummary")
    out.append("<h3>SBOM and signatures</h3>")
    if summary:
        out.append(f'<p>SBOM (CycloneDX 1.6) at <code>{esc(att["sbom"]["tag"])}</code>: '
                   f'<span data-k="{k}.sbom.packages">{summary["packages"]}</span> dpkg packages, '
                   f'<span data-k="{k}.sbom.wheels">{summary["wheels"]}</span> wheels, {summary["models"]} models, '
                   f'kernel {esc(summary["kernel"])}, driver {esc(summary["driver"] or "none")}; provenance '
                   f'(SLSA v1) at <code>{esc(att["att"]["tag"])}</code></p>')
    else:
        out.append("<p class=bad>no SBOM or provenance: this version was not released with `kiln release`</p>")
    sigs = [s for s in record.get("signatures") or [] if s.get("digest") == digest]
    if sigs:
        s = sigs[-1]
        signed = [s["identity"]] + [f'{att[kind]["tag"]}' for kind in ("sbom", "att") if kind in att]
        out.append(f'<p><span class=ok data-k="{k}.signed">signed</span> by <code>{esc(s["fingerprint"])}</code>: '
                   + ", ".join(f"<code>{esc(x)}</code>" for x in signed) + "</p>")
    else:
        out.append(f'<p><span class=bad data-k="{k}.signed">unsigned</span></p>')
    out.append("</section>")
    return "\n".join(out)


def render_report(records_: list[dict[str, Any]], previous: dict[str, dict[str, Any] | None]) -> str:
    versions = sorted({r["version"] for r in records_}, key=kv.Version)
    title = f"Kiln release {', '.join(versions)}"
    body = [f"<h1>{esc(title)}</h1>",
            "<p>" + ", ".join(f'<a href="#{esc(r["class"])}">{esc(r["class"])}</a>' for r in records_) + "</p>"]
    body += [class_section(r, previous.get(r["class"])) for r in records_]
    return (f"<!doctype html>\n<html lang=en><head><meta charset=utf-8><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def previous_record(cls: str, version: str, given: str | None = None) -> dict[str, Any] | None:
    """The record of GIVEN, else of the newest version of CLS below VERSION that was pushed signed, in Kiln's
    version order (kiln_device.version: the order devices and systemd-boot use), never another."""
    if given:
        return records.read_record(cls, given)
    if not kv.is_valid(version):
        return None
    best: tuple[str, dict[str, Any]] | None = None
    for path in paths.class_dir(cls).glob("*/build.json"):
        v = path.parent.name
        if not kv.is_valid(v):
            continue
        if kv.compare(v, version) < 0 and (best is None or kv.compare(v, best[0]) > 0):
            rec = json.loads(path.read_text())
            if rec.get("manifest"):
                best = (v, rec)
    return best[1] if best else None


def write_report(classes: list[str], version: str, out: Path, previous: str | None = None) -> Path:
    if not classes:
        raise UsageError("name at least one class")
    recs = [records.read_record(cls, version) for cls in classes]  # a clear BuildError when one is missing
    html_text = render_report(recs, {r["class"]: previous_record(r["class"], version, previous) for r in recs})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html_text)
    return out
