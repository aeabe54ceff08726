"""Errors of a batch job, and the exit codes the command maps them to."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # the job ran but stopped (error threshold, storage gone, interrupted)
EXIT_USAGE = 2  # nothing ran: bad input, output or parameters


class BatchConfigError(Exception):
    """The job cannot start as asked (missing input, CSV without prompt column, bad parameters...).

    Raised before any GPU work; the message says what is wrong and what to do.
    """


class ErrorThresholdExceeded(Exception):
    """More rows failed than --error-threshold allows; the job stopped early."""


# Records that storage would not take (after retries) wait in memory for finalize to report them;
# past this many the output store is plainly failing, and the job stops rather than hold more.
MAX_UNWRITTEN = 1000


def threshold_stop(failed: int, threshold: int, last_error: str, unwritten: int = 0) -> str:
    """Why a job must stop with ``failed`` rows failed under ``--error-threshold``, ``unwritten`` of
    them without a record in the output; '' to go on.

    The one rule for the runner on one machine and the driver of a Ray job.
    """
    if unwritten >= MAX_UNWRITTEN:
        return (
            f"the output store refused the records of {unwritten} rows after retries; last error: "
            f"{last_error}; check that the output can be written (permissions, quota, network)"
        )
    if threshold < 0 or failed <= threshold:
        return ""
    return f"{failed} rows failed, more than --error-threshold {threshold}; last error: {last_error}"
