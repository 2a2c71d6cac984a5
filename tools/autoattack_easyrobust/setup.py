"""``autoattack`` for robustbench 1.1.1, running the AutoAttack that easyrobust 0.2.4 ships.

robustbench 1.1.1 does ``from autoattack import AutoAttack`` and ``from autoattack.state import
EvaluationState``. The original package (fra31/auto-attack, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks", Croce & Hein, ICML 2020) is not on PyPI, and
robustbench's PyPI dependency ``pyautoattack`` installs a module named ``pyautoattack`` instead. easyrobust
vendors fra31's code as ``easyrobust.attacks.autoattack`` (a version from before ``state_path`` existed).
This distribution puts a top-level ``autoattack`` over that vendored code and adds the ``state`` module
(resumable evaluation state) that robustbench imports. Install it with ``pip install --no-deps
tools/autoattack_easyrobust`` (``tools/bootstrap.sh`` does).
"""
from setuptools import setup

setup(
    name="autoattack-easyrobust",
    version="0.1.0",
    description="top-level 'autoattack' (robustbench's import) running easyrobust's vendored fra31 AutoAttack",
    long_description=__doc__,
    packages=["autoattack"],
    python_requires=">=3.8",
    install_requires=["easyrobust", "torch"],
)
