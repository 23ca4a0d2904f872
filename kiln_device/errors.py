"""The agent's one error type and its log line."""

from __future__ import annotations

from kiln_device.common import make_logger

log = make_logger("kiln-agent")


class AgentError(Exception):
    """A failure with an exit code (kiln_device.contract); the message says what and where."""

    def __init__(self, code: int, message: str, *, blocklist: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.blocklist = blocklist  # the image itself is refused: its digest is never tried again
