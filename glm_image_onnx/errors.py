"""The two kinds of error every stage raises, and the exit code each gives on the command line.

A `UsageError` is the caller's to fix: an option, input or output folder that cannot be used as
given (a missing checkpoint, an unknown component, an output that exists, a corrupt package): exit 2.
Any other failure of a stage (a graph that does not export or verify, a quantisation below its
thresholds, a provider that cannot start): exit 1. Stages raise their own classes (ExportError,
QuantizeError, PackageError, ...), the usage ones also deriving from UsageError, and the command
line maps them by type with `exit_code`, never by their messages.
"""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(ValueError):
    """The request cannot be done as given; the message says what to change."""


def exit_code(error: BaseException) -> int:
    return EXIT_USAGE if isinstance(error, UsageError) else EXIT_FAILED
