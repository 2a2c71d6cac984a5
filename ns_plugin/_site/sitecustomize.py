"""Started by ``ns-plugin run``: this folder is first on ``PYTHONPATH`` of the launched command, so Python
imports this file at start-up (the standard ``sitecustomize`` hook). It installs ns_plugin's post-import
hooks (:mod:`ns_plugin.integrations.launch`), which register our attacks / models when the launched program imports
torchattacks or timm itself, and then runs the ``sitecustomize`` this one shadows, if any."""
import os
import sys


def _run_shadowed():
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        cand = os.path.join(entry or os.getcwd(), "sitecustomize.py")
        if os.path.abspath(entry or os.getcwd()) != here and os.path.isfile(cand):
            code = compile(open(cand, "rb").read(), cand, "exec")
            exec(code, {"__name__": "sitecustomize", "__file__": cand})
            return


def _install():
    spec = os.environ.get("NS_PLUGIN_RUN")
    if not spec:
        return
    try:
        from ns_plugin.integrations.launch import install_hooks
        install_hooks(spec)
    except Exception as e:  # noqa: BLE001 - report in one line, let the program run
        sys.stderr.write(f"ns-plugin run: hooks not installed: {type(e).__name__}: {e}\n")


_install()
_run_shadowed()
