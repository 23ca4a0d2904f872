"""Kiln's device side: the code baked into every image, and the contract it shares with the builder.

Standard library only (inference and health also use the runtime venv's numpy and
onnxruntime). Nothing here imports `builder`; the builder imports `kiln_device.contract`.
Images carry this package under /usr/lib/kiln/python/ and run it through
/usr/lib/kiln/launch.py (see contract.LAUNCHER).
"""
