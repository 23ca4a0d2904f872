"""Benchmark image builds and registry pulls, for one class or every class buildable here.

    .venv/bin/python -m bench.build [--json PATH] [--class CLASS ... | --all] [--skip-cold]
                                    [--sign-key DIR]

A production class is signed: with --sign-key DIR (or $KILN_SIGNING_KEY), else with a
throwaway key made for the run outside the project (signing is part of what is measured).

Real builds with podman into Kiln's state dir (.kiln, or $KILN_STATE_DIR):

1. cold build (`--no-cache`: every RUN runs again; the offline base and the
   wheelhouse are cached, as on any second day of work),
2. fully cached rebuild of the same inputs (must be < 5% of the cold build),
3. model-only release (a project copy whose model has new bytes; version bumped),
4. image size per layer group, uncompressed (engine) and compressed (registry),
5. bytes a registry pull moves: a fresh pull of v1, then the model-only v2 into
   the same OCI layout (skopeo reuses blobs it has). Counted from the
   registry's own log (`http.response.written` of every GET), so it is what
   went over the wire. Target: within 1.05x of v2's compressed model layer
   plus its metadata (manifest, config, release layer).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    describe_machine,
    failed,
    make_parser,
    manifest,
    mb,
    print_rows,
    registry_bytes,
    write_figures,
)
from bench.projects import make_retrained_project, project_dir
from builder.base.capability import why_not_buildable
from builder.core.context import Context, make_context
from builder.core.engine import PodmanEngine
from builder.core.errors import KilnError
from builder.core.run import run
from builder.core.state import StateDir, make_state_dir
from builder.image.build import build_class
from builder.keys.release_key import make_signing_key
from builder.release.publish import push_build
from builder.release.registry import RegistryInfo, running_registry
from builder.spec.loader import load_class


def pull(info: RegistryInfo, ref: str, layout: Path, tag: str) -> tuple[int, float]:
    before = registry_bytes(info)
    start = time.perf_counter()
    run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}", f"oci:{layout}:{tag}"], quiet=True)
    elapsed = time.perf_counter() - start
    time.sleep(0.5)  # let the registry flush its log
    return registry_bytes(info) - before, elapsed


def group_sizes(record: dict[str, Any], mf: dict[str, Any]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for layer, blob in zip(record["layers"], mf["layers"], strict=True):
        g = out.setdefault(layer["group"], {"uncompressed": 0, "compressed": 0})
        g["uncompressed"] += layer["size"] or 0
        g["compressed"] += blob["size"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = make_parser("bench.build", "cold/cached/model-only builds and registry pull bytes")
    ap.add_argument("--class", dest="classes", action="append", metavar="CLASS",
                    help="a class to measure (repeatable; default qemu-x86_64)")
    ap.add_argument("--all", action="store_true", help="every class `kiln list` says is buildable here")
    ap.add_argument("--skip-cold", action="store_true", help="skip the cold (--no-cache) build")
    ap.add_argument("--sign-key", type=Path, help="release key for production classes (default: $KILN_SIGNING_KEY, "
                    "else a throwaway key made for the run)")
    args = ap.parse_args(argv)
    state: StateDir = make_state_dir(ROOT)
    ctx = make_context(PodmanEngine(state), state=state)
    if args.all and args.classes:
        ap.error("--all or --class, not both")
    names = args.classes or ["qemu-x86_64"]
    if args.all:
        names = [p.stem for p in sorted((ROOT / "images").glob("*.yaml")) if not p.stem.startswith("_")
                 and not why_not_buildable(load_class(p.stem, ROOT / "images"))]
    results: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="kiln-bench-key-") as keys:
            key = args.sign_key
            for name in names:
                hc = load_class(name, ROOT / "images")
                if key is None and not hc.spec.development and not os.environ.get("KILN_SIGNING_KEY"):
                    key = Path(keys)
                    make_signing_key(key)
                results[name] = bench_class(ctx, name, key=None if hc.spec.development else key,
                                            cold=not args.skip_cold)
                print(f"\n{name}")
                print_table(results[name])
    except KilnError as exc:
        return failed(exc)
    write_figures(args.json, {"machine": describe_machine(), "classes": results})
    return 0


def bench_class(ctx: Context, name: str, *, key: Path | None, cold: bool) -> dict[str, Any]:
    state = ctx.state
    source = f"images/{name}.yaml"
    hc = load_class(name, ROOT / "images")
    figures: dict[str, Any] = {"class": name}
    # warm-up: base, wheelhouse, models and (if missing) every layer
    v1 = build_class(ctx, hc, source=source, version="1.0.0", sign_key=key)
    build_step = f"build {v1['image']['ref']} with podman"
    if cold:
        start = time.perf_counter()
        again = build_class(ctx, hc, source=source, version="1.0.0", no_cache=True, sign_key=key)
        figures["cold_build_s"] = again["durations"][build_step]
        figures["cold_total_s"] = round(time.perf_counter() - start, 3)
        figures["cold_same_digest"] = again["image"]["id"] == v1["image"]["id"]
    cached = build_class(ctx, hc, source=source, version="1.0.0", sign_key=key)
    figures["cached_build_s"] = cached["durations"][build_step]
    figures["cached_total_s"] = round(sum(cached["durations"].values()), 3)
    with tempfile.TemporaryDirectory(dir=state.tmp_dir) as tmp:
        proj = make_retrained_project(Path(tmp) / "project")
        with project_dir(proj):
            v2 = build_class(ctx, load_class(name, proj / "images"), source=source, version="1.0.1",
                             revision=v1["revision"], sign_key=key)
        figures["model_only_build_s"] = v2["durations"][f"build {v2['image']['ref']} with podman"]
        figures["model_only_changed_groups"] = sorted(
            {a["group"] for a, b in zip(v1["layers"], v2["layers"], strict=True) if a["diffId"] != b["diffId"]})
        with running_registry(Path(tmp) / "registry") as info:
            with project_dir(proj):
                push_build(ctx, name, "1.0.1", info.address)
            push_build(ctx, name, "1.0.0", info.address)
            repo = f"kiln/{name}"
            m1, m2 = manifest(info, repo, "1.0.0"), manifest(info, repo, "1.0.1")
            figures["groups"] = group_sizes(v1, m1)
            figures["image_uncompressed"] = sum(layer["size"] or 0 for layer in v1["layers"])
            figures["image_compressed"] = sum(layer["size"] for layer in m1["layers"])
            layout = Path(tmp) / "layout"
            figures["fresh_pull_bytes"], figures["fresh_pull_s"] = pull(info, f"{info.address}/{repo}:1.0.0",
                                                                        layout, "v1")
            figures["update_pull_bytes"], figures["update_pull_s"] = pull(info, f"{info.address}/{repo}:1.0.1",
                                                                          layout, "v2")
            changed = [b for layer, b in zip(v2["layers"], m2["layers"], strict=True)
                       if layer["group"] in ("model", "release")]
            figures["model_layer_compressed"] = sum(b["size"] for layer, b in
                                                    zip(v2["layers"], m2["layers"], strict=True)
                                                    if layer["group"] == "model")
            m2_bytes = len(json.dumps(m2).encode())
            figures["update_floor_bytes"] = sum(b["size"] for b in changed) + m2["config"]["size"] + m2_bytes
    figures["cached_vs_cold"] = (figures["cached_build_s"] / figures["cold_build_s"]) if "cold_build_s" in figures \
        else None
    figures["update_vs_floor"] = figures["update_pull_bytes"] / figures["update_floor_bytes"]
    return figures


def print_table(f: dict[str, Any]) -> None:
    rows = []
    if "cold_build_s" in f:
        rows.append(("cold build (--no-cache)", f"{f['cold_build_s']:.1f} s",
                     "same digest" if f["cold_same_digest"] else "DIFFERENT DIGEST"))
    ratio = f["cached_vs_cold"]
    rows.append(("cached rebuild", f"{f['cached_build_s']:.2f} s",
                 f"{ratio:.1%} of cold (target < 5%)" if ratio is not None else ""))
    rows.append(("model-only rebuild", f"{f['model_only_build_s']:.1f} s",
                 "changed: " + ", ".join(f["model_only_changed_groups"])))
    for group, s in f["groups"].items():
        rows.append((f"  layer group {group}", mb(s["uncompressed"]), f"{mb(s['compressed'])} compressed"))
    rows.append(("image", mb(f["image_uncompressed"]), f"{mb(f['image_compressed'])} compressed"))
    rows.append(("fresh pull v1", mb(f["fresh_pull_bytes"]), f"{f['fresh_pull_s']:.1f} s"))
    rows.append(("model-only pull v2", mb(f["update_pull_bytes"]),
                 f"{f['update_vs_floor']:.3f}x of model+release layers+config+manifest "
                 f"({mb(f['update_floor_bytes'])}; target <= 1.05x)"))
    print_rows(rows)


if __name__ == "__main__":
    raise SystemExit(main())
