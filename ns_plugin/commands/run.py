"""``ns-plugin run``: start an unchanged program that sees ns_plugin's attacks and models.

``ns-plugin run [--checkpoint NAME=PATH ...] [--robustbench DATASET ...] -- python script.py ARGS``
runs the command with a ``sitecustomize`` hook (see :mod:`ns_plugin.integrations.launch`): when the program imports
torchattacks, ``torchattacks.PatchFool`` etc. exist and are in ``torchattacks.__all__``; when it imports
timm, ``ns_vit_digits`` and every ``NAME`` are timm models (EasyRobust ``--model NAME``, robustbench
``load_model(NAME, dataset=DATASET)``). The exit status is the program's.
"""
from __future__ import annotations

import argparse
import subprocess

from ..errors import NSPluginError

HELP = ("run an unchanged program (EasyRobust benchmark.py, torchattacks' tests, a robustbench script) "
        "with our models and attacks registered")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                   help="register checkpoint PATH as timm model NAME in the program (repeatable)")
    p.add_argument("--use-ema", action="store_true", help="load the checkpoints' EMA weights")
    p.add_argument("--robustbench", action="append", metavar="DATASET",
                   help="robustbench dataset(s) the checkpoints serve in load_model (default: imagenet)")
    p.add_argument("--no-attacks", action="store_true", help="do not add our attacks to torchattacks")
    p.add_argument("--print-env", action="store_true",
                   help="print the PYTHONPATH and NS_PLUGIN_RUN lines to export instead of running a command")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")


def run(args: argparse.Namespace) -> int:
    from ..integrations.launch import ENV, check_checkpoints, launch_env, make_spec, parse_checkpoint_arg

    cmd = list(args.cmd)
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    if not cmd and not args.print_env:
        raise NSPluginError("no command given; usage: ns-plugin run [--checkpoint NAME=PATH] -- python script.py ...")
    datasets = tuple(args.robustbench or ("imagenet",))
    cks = [parse_checkpoint_arg(c, use_ema=args.use_ema, robustbench=datasets) for c in args.checkpoint]
    check_checkpoints(cks)  # fail here, in one line, rather than inside the program
    env = launch_env(make_spec(cks, attacks=not args.no_attacks))
    if args.print_env:
        import shlex
        print(f"export PYTHONPATH={shlex.quote(env['PYTHONPATH'])}")
        print(f"export {ENV}={shlex.quote(env[ENV])}")
        return 0
    try:
        return subprocess.call(cmd, env=env)
    except FileNotFoundError:
        raise NSPluginError(f"command not found: {cmd[0]}") from None
