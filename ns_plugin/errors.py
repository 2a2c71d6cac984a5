"""The one exception type users (and the CLI) need to catch."""


class NSPluginError(ValueError):
    """Bad input or an unusable environment, with a one-line message naming the problem and the fix.

    The CLI prints ``ns-plugin: error: <message>`` and exits with status 2 for these.
    """
