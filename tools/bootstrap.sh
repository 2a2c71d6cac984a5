#!/usr/bin/env bash
# Create or refresh .venv with the ecosystem whose upstream pins conflict (README: "Why the install is
# unusual"). Idempotent: a stamp holding the hash of this script and setup.py skips all work when it matches.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=.venv
STAMP=$VENV/.ns_plugin_bootstrap
want=$(cat tools/bootstrap.sh setup.py tools/autoattack_easyrobust/setup.py tools/autoattack_easyrobust/autoattack/*.py | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
echo "bootstrapping $VENV (first run takes a few minutes)..."
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_() {  # pip, quiet, minus the known-harmless noise; keeps pip's exit status
  local log rc=0; log=$(mktemp)
  "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" >"$log" 2>&1 || rc=$?
  grep -v -e "^WARNING: Location" -e "dependency conflicts" -e "requires timm==0.5.4" \
          -e "requires requests~=2.25.1" -e "^ERROR: pip's dependency resolver" "$log" || true
  rm -f "$log"; return $rc
}
pip_ install "pip>=23" wheel
# 1. torch/torchvision: these exact versions lie on this disk; a bare "torch" would pull a multi-GB build.
pip_ install torch==2.14.1 torchvision==0.29.1
# 2. torchattacks without deps: its requests~=2.25.1 pin would downgrade requests. Its wheel also ships a
#    stripped 2022 top-level "robustbench", so it must go in BEFORE the real robustbench.
pip_ install --no-deps torchattacks==3.5.1
# 3. the real robustbench 1.1.1 with its deps (timm==1.0.9, pyautoattack, pandas...); setuptools<81 keeps
#    pkg_resources, which robustbench imports. Then re-lay its files over torchattacks' copy.
#    huggingface_hub: timm 1.0.9 downloads pretrained weights through it and imports
#    `repo_type_and_id_from_hf_id`, which 2.0 removed (timm then reports "no hub support" and
#    `pretrained=True` fails); 1.33.0 is the newest release timm 1.0.9 imports (checked: 2.0.0-2.4.0 fail).
pip_ install "setuptools<81" robustbench==1.1.1 "timm==1.0.9" "huggingface_hub==1.33.0" requests
pip_ install --no-deps --force-reinstall robustbench==1.1.1
# 4. easyrobust pins timm==0.5.4 (unresolvable with robustbench): no deps, plus its real runtime needs.
pip_ install --no-deps easyrobust==0.2.4
pip_ install tqdm opt_einsum einops ftfy regex PyWavelets
# 4b. robustbench imports "autoattack" (fra31/auto-attack, not on PyPI; pyautoattack installs another module
#     name). tools/autoattack_easyrobust is a tiny distribution whose "autoattack" runs easyrobust's vendored
#     fra31 AutoAttack and adds the "state" module robustbench imports.
pip_ install --no-deps --no-build-isolation --force-reinstall ./tools/autoattack_easyrobust
# 5. the rest, then the package itself (its own install_requires are all satisfied by now).
pip_ install numpy scipy matplotlib scikit-learn pyyaml pytest ruff imagecorruptions==1.1.2
pip_ install --no-deps -e .
# fail loudly here rather than in the first test if the layering did not work: a fresh interpreter that
# never imports ns_plugin must import robustbench (and its AutoAttack), easyrobust and torchattacks
"$VENV/bin/python" - <<'PY'
import sys, warnings; warnings.filterwarnings("ignore")
import robustbench, robustbench.eval, easyrobust.benchmarks, torchattacks, timm, autoattack
from robustbench.utils import load_model
from easyrobust.attacks import pgd_generator
assert robustbench.benchmark.__module__ == "robustbench.eval", "robustbench is torchattacks' stripped copy"
assert timm.__version__.startswith("1.0."), timm.__version__
from timm.models._hub import has_hf_hub
assert has_hf_hub(), "timm cannot use huggingface_hub (pretrained weights would not load): check its version"
assert "ns_plugin" not in sys.modules
print(f"ecosystem ok: timm {timm.__version__}, torchattacks {torchattacks.__version__}, robustbench 1.1.1, "
      f"easyrobust 0.2.4, autoattack = {autoattack.SOURCE}")
PY
echo "$want" > "$STAMP"
