"""The problems a report stops on that the user can fix (a missing store, an unknown or empty experiment, params
that do not make a configuration): the command line prints the message, no traceback, and exits with the code."""


class ReportError(Exception):
    """A problem the user can fix (no traceback): the message says what; ``exit_code`` is the CLI's."""

    exit_code = 1


class UnknownExperiment(ReportError):
    exit_code = 2


class EmptyExperiment(ReportError):
    exit_code = 1
