"""`kiln model optimize`: optimize and validate models against their release gates."""

from __future__ import annotations

import json
from pathlib import Path

import click

from builder.cli.common import console, err_console, load
from builder.core import paths
from builder.core.errors import UsageError
from builder.spec.schema import GOLDEN_COUNT, LATENCY_RUNS, MIXED_MAX_NODES


def parse_postprocess(pairs: tuple[str, ...]) -> dict[str, object]:
    """--postprocess KEY=VALUE ..., checked by the spec's own validation.postprocess model (the same keys and
    bounds a class spec has); a value is read as JSON when it is (0.3, 3, true), else as text."""
    from pydantic import ValidationError

    from builder.spec.schema import Postprocess

    raw: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--postprocess {pair!r}: expected KEY=VALUE")
        try:
            raw[key.strip()] = json.loads(value)
        except ValueError:
            raw[key.strip()] = value
    try:
        return Postprocess.model_validate(raw).model_dump(exclude_none=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UsageError(f"--postprocess {where}: {first['msg']}") from None


@click.group()
def model() -> None:
    """Optimize and validate models against their release gates."""


@model.command("optimize")
@click.argument("cls", metavar="[CLASS]", required=False)
@click.option("--model", "model_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Ad-hoc: an ONNX model (instead of CLASS).")
@click.option("--calibration", type=click.Path(path_type=Path),
              help="Ad-hoc: calibration inputs (.npz with x, or a sample directory with dataset.json).")
@click.option("--validation", type=click.Path(path_type=Path),
              help="Ad-hoc: validation inputs and ground truth (.npz with x, y, or a sample directory).")
@click.option("--task", type=click.Choice(["classification", "detection", "text-recognition", "fidelity"]),
              default="classification", show_default=True, help="Ad-hoc: what the ground truth is.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "int8"]), default="auto",
              show_default=True, help="Ad-hoc: pin a precision.")
@click.option("--candidates", default="int8-static", show_default=True,
              help="Ad-hoc: comma-separated candidates (int8-static, int8-dynamic, int8-mixed, fp16).")
@click.option("--max-accuracy-drop", type=float, default=0.01, show_default=True, help="Ad-hoc gate.")
@click.option("--min-cosine", type=click.FloatRange(-1, 1), default=None,
              help="Ad-hoc gate: every output's cosine to FP32 over the validation set (what --task fidelity "
                   "needs: spec gates.fidelity {\"*\": {minCosine}}).")
@click.option("--postprocess", "postprocess", multiple=True, metavar="KEY=VALUE",
              help="Ad-hoc: how the task metric reads the output, as a spec's validation.postprocess (threshold, "
                   "box_threshold, min_size, unclip_ratio, iou, output, charset, blank_index, ...); repeat it.")
@click.option("--golden-count", type=click.IntRange(1, 1024), default=GOLDEN_COUNT, show_default=True,
              help="Ad-hoc: validation samples in the golden set (spec: validation.goldenCount).")
@click.option("--latency-runs", type=click.IntRange(1, 100_000), default=LATENCY_RUNS, show_default=True,
              help="Ad-hoc: timed runs per candidate; fewer for a slow model (spec: optimization.latencyRuns).")
@click.option("--mixed-max-nodes", type=click.IntRange(1, 256), default=MIXED_MAX_NODES, show_default=True,
              help="Ad-hoc: int8-mixed's most nodes in FP32 (spec: optimization.mixedMaxNodes).")
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False),
              help="Output directory (default build/<class>/models/<name>/<version>/).")
@click.option("--json", "as_json", is_flag=True, help="Print the report(s) as JSON.")
def model_optimize(cls: str | None, model_path: Path | None, calibration: Path | None,
                   validation: Path | None, task: str, precision: str, candidates: str, max_accuracy_drop: float,
                   min_cosine: float | None, postprocess: tuple[str, ...], golden_count: int, latency_runs: int,
                   mixed_max_nodes: int,
                   output: Path | None, as_json: bool) -> None:
    """Optimize CLASS's models (or one ad-hoc --model), validate on real inputs, apply gates.

    Exit code 5 when no candidate passes the gates (report.json says why).
    """
    from builder.model import for_class
    from builder.model.pipeline import optimize_model
    from builder.model.policy import Gates, OptimizationPolicy
    from builder.model.report import render_table

    say = err_console.print
    if cls and model_path:
        raise UsageError("give CLASS or --model, not both")
    if cls:
        reports = for_class.make_optimized_models(load(cls), progress=lambda m: say(m, markup=False))
    else:
        if not (model_path and calibration and validation):
            raise UsageError("ad-hoc use needs --model, --calibration and --validation (or give a CLASS)")
        policy = OptimizationPolicy(precision=precision, task=task,
                                    candidates=tuple(c for c in candidates.split(",") if c),
                                    postprocess=parse_postprocess(postprocess), golden_count=golden_count,
                                    latency_runs=latency_runs, mixed_max_nodes=mixed_max_nodes)
        gates = Gates(max_accuracy_drop=max_accuracy_drop,
                      fidelity={"*": {"min_cosine": min_cosine}} if min_cosine is not None else {})
        out = output or paths.adhoc_model_dir(model_path.stem)
        reports = [optimize_model(model_path, calibration, validation, policy, gates, out,
                                  lambda m: say(m, markup=False))]
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in reports], indent=2))
        return
    for report in reports:
        console.print(render_table(report))
        for reason in report.reasons:
            console.print(f"  {reason}", markup=False)
