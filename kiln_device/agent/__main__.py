"""python3 -m kiln_device.agent: the kiln-agent command."""

import sys

from kiln_device.agent.cli import main

sys.exit(main())
