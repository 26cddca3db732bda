"""User-facing errors: one clear line, no traceback, non-zero exit in the CLI."""


def printable_line(text: object, limit: int = 1000) -> str:
    """``text`` as one printable line: control and format characters (line breaks, ESC, a
    right-to-left override, zero-width spaces) written as escapes, and a text over ``limit``
    characters shortened in the middle. Error messages quote what the user typed or linked, so
    a model name cannot add lines, colour the terminal or run on for pages."""
    s = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))
    if len(s) > limit:
        s = f"{s[: limit * 2 // 3]} … {s[-(limit // 3) :]}"
    return s


class GraftError(Exception):
    """An error caused by the user's input (bad path, unknown model, empty workload...).

    The message is a single line meant to be shown as-is in the UI and on stderr
    (:func:`printable_line` makes it one, whatever text it quotes).
    """

    def __str__(self) -> str:
        return printable_line(super().__str__())


class Cancelled(Exception):
    """Raised inside a compute function when the user cancelled the job."""
