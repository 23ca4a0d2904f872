"""Run one of Kiln's device programs from the kiln_device package next to this file.

    python3 -I /usr/lib/kiln/launch.py PROGRAM [ARGS...]

PROGRAM is kiln-agent, kiln-inference, kiln-health-inference, kiln-health-gpu,
kiln-cdi or kiln-lint (kiln_device.contract.PROGRAMS). `-I` keeps the environment and the user's site
packages out of the interpreter, and this file's directory out of sys.path; the
package directory (python/, beside this file) is put there instead. Works from an
unpacked rootfs too: everything is found relative to this file.
"""

import importlib
import sys
from pathlib import Path

sys.dont_write_bytecode = True  # /usr is read-only on the device
sys.path.insert(0, str(Path(__file__).resolve().parent / "python"))

from kiln_device.contract import PROGRAMS  # noqa: E402

if len(sys.argv) < 2 or sys.argv[1] not in PROGRAMS:
    print(f"usage: {sys.argv[0]} {{{','.join(PROGRAMS)}}} [ARGS...]", file=sys.stderr)
    sys.exit(64)
program = importlib.import_module(PROGRAMS[sys.argv[1]])
sys.exit(program.main(sys.argv[2:]))
