"""The one exception type users (and the CLI) need to catch."""


class NSPluginError(ValueError):
    """Bad input or an unusable environment, with a one-line message naming the problem and the fix.

    The CLI prints ``ns-plugin: error: <message>`` and exits with status 2 for these.
    """


def one_line(e: BaseException) -> str:
    """An exception as one line: an :class:`NSPluginError`'s message, otherwise ``Type: first line`` (never
    fails, even for an empty message)."""
    lines = str(e).strip().splitlines()
    if isinstance(e, NSPluginError) and lines:
        return lines[0]
    return type(e).__name__ + (f": {lines[0][:160]}" if lines else "")
