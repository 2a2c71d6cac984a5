"""``ns-plugin``: one console script; each subcommand lives in ``ns_plugin/commands/<name>.py`` and
defines ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``. Only installed commands are listed."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import warnings
from typing import List, Optional

from .errors import NSPluginError

#: Subcommands in help order. A name whose module does not exist yet is simply not offered.
COMMANDS = ["demo", "nullspace", "noise", "train", "evaluate", "watermark", "fingerprint", "run"]


def _available():
    for name in COMMANDS:
        mod = f"ns_plugin.commands.{name}"
        if importlib.util.find_spec(mod) is not None:
            yield name, mod


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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


def main(argv: Optional[List[str]] = None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except NSPluginError as e:
        print(f"ns-plugin: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ns-plugin: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
