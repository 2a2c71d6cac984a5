"""Entry points something reads: a third-party distribution that declares an attack under the
``ns_plugin.attacks`` group is installed with pip (into a temporary target folder), and ``ns_plugin.register()``
in a fresh interpreter puts it into torchattacks (namespace and ``__all__``)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_register_loads_an_installed_attack_plugin(tmp_path):
    src = tmp_path / "src"
    (src / "tiny_attack_plugin").mkdir(parents=True)
    (src / "tiny_attack_plugin" / "__init__.py").write_text(textwrap.dedent('''
        import torch
        from torchattacks.attack import Attack

        class TinySign(Attack):
            """One FGSM-like step (a stand-in third-party attack)."""
            def __init__(self, model, eps=1 / 255):
                super().__init__("TinySign", model)
                self.eps = eps
                self.supported_mode = ["default"]

            def forward(self, images, labels):
                return (images + self.eps).clamp(0, 1)
    '''))
    (src / "setup.py").write_text(textwrap.dedent('''
        from setuptools import setup
        setup(name="tiny-attack-plugin", version="0.1", packages=["tiny_attack_plugin"],
              entry_points={"ns_plugin.attacks": ["TinySign = tiny_attack_plugin:TinySign"]})
    '''))
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                          "--disable-pip-version-check", "-q", "--target", str(target), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-800:]
    assert list(target.glob("tiny_attack_plugin-0.1*.dist-info/entry_points.txt"))
    code = ("import ns_plugin, torchattacks\n"
            "assert not hasattr(torchattacks, 'TinySign')\n"
            "out = ns_plugin.register()\n"
            "assert out['plugins'] == ['TinySign'], out\n"
            "assert torchattacks.TinySign.__module__ == 'tiny_attack_plugin' and 'TinySign' in torchattacks.__all__\n"
            "print('plugin ok')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "plugin ok" in out.stdout, out.stderr[-800:]
