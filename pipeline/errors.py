"""User-facing errors. Each class carries the process exit code; only the CLI turns them into messages."""

from __future__ import annotations


class QuantpipeError(Exception):
    """Base for errors a user can act on. The message is one line naming the problem and the fix."""

    exit_code = 1


class BadInput(QuantpipeError):
    """A recipe, argument, model or data file is wrong."""

    exit_code = 2


class UnsupportedOnTarget(QuantpipeError):
    """The recipe asks for something the target GPU cannot run."""

    exit_code = 3


class HostLacks(QuantpipeError):
    """This host lacks what a stage needs (a GPU, a library, disk space); nothing failed."""

    exit_code = 4


class VerificationFailed(QuantpipeError):
    """An artifact missed a verification threshold."""

    exit_code = 5


class CellsFailed(QuantpipeError):
    """Cells of a build matrix failed; the process exits with the first failed cell's code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
