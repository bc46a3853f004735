"""The one error type a command reports to its user, and the exit codes every `nmt` command uses.

    0  success
    1  runtime failure: the command started and something failed (a server unreachable, a failed
       validation, a full disk, a bug)
    2  bad usage or bad input: flags, input files, checkpoints, bundles, corpora, requests the
       user must fix

Domain errors (CheckpointError, BundleError, InvalidRequest, ...) subclass UserError with their
exit code; `nmt.cli.main` catches them once and prints one line, `nmt COMMAND: message`.
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UserError(Exception):
    """A failure worth one readable line to the user; `exit_code` says which kind (see above)."""

    exit_code: int = EXIT_USAGE

    def __init__(self, message: str = "", exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
