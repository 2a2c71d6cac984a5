"""``ns-plugin``: one console script; each subcommand lives in ``ns_plugin/commands/<name>.py`` and
defines ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``. Only installed commands are listed."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
import warnings
from typing import Callable, List, Optional

from .errors import NSPluginError

#: Subcommands in help order. A name whose module does not exist yet is simply not offered.
COMMANDS = ["demo", "nullspace", "noise", "train", "evaluate", "watermark", "fingerprint", "run"]


def _available():
    for name in COMMANDS:
        mod = f"ns_plugin.commands.{name}"
        if importlib.util.find_spec(mod) is not None:
            yield name, mod


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (``ns-plugin train: error: ...``) and exit status 2."""

    def error(self, message):  # noqa: D401 - argparse's hook
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="ns-plugin",
        description="Nullspace methods for vision transformers, plugged into timm, torchattacks, "
                    "robustbench and EasyRobust.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in _available():
        m = importlib.import_module(mod)
        p = sub.add_parser(name, help=m.HELP, description=m.HELP)
        m.add_arguments(p)
        p.set_defaults(_run=m.run)
    return parser


class _StderrHandler(logging.Handler):
    """Prints ns_plugin's log records on the current ``sys.stderr`` (looked up at each record)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"ns-plugin: {record.getMessage()}", file=sys.stderr)


def show_library_messages() -> None:
    """The library reports through ``logging`` (logger ``ns_plugin``); the CLI shows its INFO messages."""
    lg = logging.getLogger("ns_plugin")
    if not any(isinstance(h, _StderrHandler) for h in lg.handlers):
        lg.addHandler(_StderrHandler())
    lg.setLevel(logging.INFO)


def main(argv: Optional[List[str]] = None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    show_library_messages()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a bad flag (one line already printed, status 2) or --help (0)
        return int(e.code or 0)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return guarded(lambda: args._run(args))


def guarded(run: Callable[[], Optional[int]], prog: str = "ns-plugin", *, interrupted: str = "interrupted") -> int:
    """``run()``'s exit code; an :class:`NSPluginError` becomes one line ``PROG: error: ...`` and exit 2, Ctrl-C
    one line and exit 130 (used by ``ns-plugin`` and the benchmark scripts)."""
    try:
        return int(run() or 0)
    except NSPluginError as e:
        from .errors import one_line   # also unwraps an error raised in a DataLoader worker
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment refused (permissions, a full disk, a file where a folder goes)
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"{prog}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
