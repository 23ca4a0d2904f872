"""Model optimization with validation gates on real inputs.

    from builder.model import Gates, OptimizationPolicy, optimize_model, render_table
    report = optimize_model(model, calibration, validation, OptimizationPolicy(), Gates(), outdir)

Raises builder.errors.ModelError (unusable model or data) and GateFailed (no
candidate passes; report.json is written first). Needs onnx and onnxruntime,
never torch.
"""

from builder.model.gates import Decision, GateResult, Metrics, decide, evaluate
from builder.model.pipeline import optimize_model
from builder.model.policy import (
    CALIBRATION_METHODS,
    CANDIDATES,
    GRAPH_LEVELS,
    METRICS,
    PRECISIONS,
    Gates,
    OptimizationPolicy,
)
from builder.model.report import (
    CandidateResult,
    Report,
    format_table,
    read_report,
    render_table,
    write_report,
)

__all__ = [
    "CALIBRATION_METHODS", "CANDIDATES", "GRAPH_LEVELS", "METRICS", "PRECISIONS",
    "CandidateResult", "Decision", "GateResult", "Gates", "Metrics", "OptimizationPolicy", "Report",
    "decide", "evaluate", "format_table", "optimize_model", "read_report", "render_table",
    "write_report",
]
