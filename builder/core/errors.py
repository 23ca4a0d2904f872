"""Kiln's error hierarchy. Only cli.py turns these into exit codes."""

from __future__ import annotations


class KilnError(Exception):
    """Base class; `exit_code` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def with_context(self, context: str) -> KilnError:
        """Return the same error with "context: " prepended (RAUC style)."""
        self.message = f"{context}: {self.message}"
        self.args = (self.message,)
        return self

    def __str__(self) -> str:
        return self.message


class SpecError(KilnError):
    """A hardware-class spec is malformed; carries every problem found."""

    exit_code = 2

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        n = len(problems)
        head = f"{source} has {n} error{'s' if n != 1 else ''}:"
        super().__init__("\n".join([head, *(f"  {p}" for p in problems)]))


class UsageError(KilnError):
    """Bad command-line input that click itself cannot catch."""

    exit_code = 2


class ToolMissing(KilnError):
    """An external tool Kiln drives is not installed (or too old)."""

    exit_code = 3


class CommandFailed(KilnError):
    """An external command exited non-zero."""

    exit_code = 4

    def __init__(self, argv: list[str], returncode: int, stderr_tail: str = "") -> None:
        from builder.core.redact import redact, redact_argv

        self.argv = redact_argv(list(argv))
        self.returncode = returncode
        self.stderr_tail = stderr_tail = redact(stderr_tail)
        msg = f"{argv[0]} failed with exit code {returncode}"
        if stderr_tail:
            msg += ":\n" + "\n".join(f"  | {line}" for line in stderr_tail.splitlines())
        super().__init__(msg)


class GateFailed(KilnError):
    """A release gate (model validation, image lint) refused the release."""

    exit_code = 5


class ModelError(KilnError):
    """A model or its data cannot be used (corrupt file, wrong shape ...)."""

    exit_code = 6


class BuildError(KilnError):
    """An image cannot be built on this machine, or the build failed."""

    exit_code = 7


class RegistryError(KilnError):
    """A registry cannot be reached or refused an operation."""

    exit_code = 8


class DiskError(KilnError):
    """A disk image cannot be assembled (size, missing kernel ...)."""

    exit_code = 9


class VMError(KilnError):
    """A VM could not start or did not come up in time."""

    exit_code = 10


EXIT_CODES: dict[str, int] = {
    cls.__name__: cls.exit_code
    for cls in (
        KilnError, SpecError, UsageError, ToolMissing, CommandFailed, GateFailed,
        ModelError, BuildError, RegistryError, DiskError, VMError,
    )
}


class VerifyFailed(KilnError):
    """`kiln verify`: a signature, the SBOM or the provenance did not check out against the image's digest."""

    exit_code = 11
