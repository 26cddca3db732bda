"""User-facing errors: one clear line, no traceback, non-zero exit in the CLI."""


class GraftError(Exception):
    """An error caused by the user's input (bad path, unknown model, empty workload...).

    The message is a single line meant to be shown as-is in the UI and on stderr.
    """


class Cancelled(Exception):
    """Raised inside a compute function when the user cancelled the job."""
