"""Stage 4, the model: optimization with validation gates on real inputs, and the glue to a class.

    from builder.model.policy import Gates, OptimizationPolicy
    from builder.model.pipeline import optimize_model
    from builder.model.report import render_table
    report = optimize_model(model, calibration, validation, OptimizationPolicy(), Gates(), outdir)

    for_class.py      a class's models through the gate, with its own runtime (runtime_image, runtime_venv)
    fetch.py          models that come from a wheel on the package index, pinned by sha256
    artifact.py       a model as the image bakes it

Raises builder.core.errors.ModelError (unusable model or data) and GateFailed (no candidate passes;
report.json is written first). The optimizer needs onnx and onnxruntime, never torch; this package's
__init__ imports neither, so `kiln render` does not pay for them.
"""
