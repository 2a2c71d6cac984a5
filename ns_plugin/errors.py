"""The one exception type users (and the CLI) need to catch."""


class NSPluginError(ValueError):
    """Bad input or an unusable environment, with a one-line message naming the problem and the fix.

    The CLI prints ``ns-plugin: error: <message>`` and exits with status 2 for these.
    """


def one_line(e: BaseException) -> str:
    """An exception as one line: an :class:`NSPluginError`'s message, otherwise ``Type: first line`` (never
    fails, even for an empty message)."""
    lines = str(e).strip().splitlines()
    if lines and lines[0].startswith("Caught ") and "DataLoader worker process" in lines[0]:
        # torch re-raises a worker's exception with the worker's traceback as the message: its last line is
        # "module.Type: message"; keep the message
        last = lines[-1].strip()
        head, sep, msg = last.partition(": ")
        lines = [msg if sep and head.replace(".", "").replace("_", "").isalnum() else last]
    if isinstance(e, NSPluginError) and lines:
        return lines[0]
    return type(e).__name__ + (f": {lines[0][:160]}" if lines else "")
