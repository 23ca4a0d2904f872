"""Kiln's benchmarks: real builds, pulls and boots, measured. Run from the checkout, one at a time:

    .venv/bin/python -m bench.build [--json PATH]   builds, rebuilds, layer sizes, registry pull bytes
    .venv/bin/python -m bench.boot  [--json PATH]   disk assembly, QEMU start -> healthy (KVM and TCG)
    .venv/bin/python -m bench.model [--json PATH]   FP32 vs INT8/FP16 candidates of the example models
    .venv/bin/python -m bench.ota   [--json PATH]   OTA bytes over the wire, update and rollback times

`bench.common` holds what they share; `bench.projects` the project copies (later releases of
the same device) that the benchmarks and the tests build. Nothing here imports from tests/.
"""
