"""External tools for the agent: kiln_device.common.run, with failures as exit codes."""

from __future__ import annotations

import re
from collections.abc import Sequence

from kiln_device import common
from kiln_device.contract import CONFIG, NO_SPACE, SIGNATURE, UNREACHABLE
from kiln_device.errors import AgentError, log


def run(argv: Sequence[str], *, what: str, code: int, capture: bool = True, timeout: float | None = None,
        timeout_key: str | None = None, env: dict[str, str] | None = None) -> str:
    """Run a tool (printed as `+ argv`); its stdout. A failure is an AgentError: `code`, or
    what the tool's stderr says (classify), with the stderr's tail. Past `timeout` seconds the tool
    is killed and the error is `code`, naming the config key (`timeout_key`) that sets the limit."""
    try:
        done = common.run(argv, timeout=timeout, env=env, log=log)
    except common.ToolMissing:
        raise AgentError(CONFIG, f"{what}: {argv[0]} is not installed") from None
    except common.CommandTimeout:
        setting = f" (timeouts.{timeout_key} in the agent config)" if timeout_key else ""
        raise AgentError(code, f"{what}: {argv[0]} timed out after {timeout:g} s{setting}") from None
    except common.CommandFailed as exc:
        raise AgentError(classify(exc.stderr, code), f"{what}: {exc}") from None
    return done.stdout if capture else ""


def classify(stderr: str, default: int) -> int:
    """Map skopeo/umoci/mkfs messages to exit codes."""
    low = stderr.lower()
    if "no space left" in low:
        return NO_SPACE
    if "signature" in low or "source image rejected" in low or "policy" in low:
        return SIGNATURE
    if any(s in low for s in ("connection refused", "no such host", "i/o timeout", "manifest unknown",
                              "connection reset", "network is unreachable", "name unknown",
                              "reading manifest")) or re.search(r"\beof\b", low):  # not "eof" in a path
        return UNREACHABLE
    return default
