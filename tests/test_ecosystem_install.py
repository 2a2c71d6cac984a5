"""The install-level contract: a fresh interpreter that never imports ns_plugin imports robustbench, whose
``autoattack`` is easyrobust's vendored fra31 AutoAttack (tools/autoattack_easyrobust), with the resumable
``autoattack.state`` robustbench's ``benchmark(aa_state_path=...)`` reads."""
import os
import subprocess
import sys

import torch


def test_fresh_interpreter_imports_robustbench_without_ns_plugin(tmp_path):
    code = ("import sys, warnings; warnings.filterwarnings('ignore')\n"
            "import robustbench, robustbench.eval\n"
            "from robustbench.utils import load_model\n"
            "from robustbench.eval import benchmark\n"
            "from autoattack import AutoAttack, SOURCE\n"
            "from autoattack.state import EvaluationState\n"
            "import easyrobust.attacks.autoattack.autoattack as vendored\n"
            "assert issubclass(AutoAttack, vendored.AutoAttack)\n"
            "assert 'ns_plugin' not in sys.modules and 'pyautoattack' not in sys.modules\n"
            "print('ok', benchmark.__module__, SOURCE)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NS_PLUGIN_RUN")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-800:]
    assert "ok robustbench.eval fra31/auto-attack as vendored by easyrobust" in out.stdout


def test_autoattack_state_path_resumes(model, digits, tmp_path):
    from autoattack import AutoAttack
    from autoattack.state import EvaluationState
    x, y = digits.test.tensors
    x, y = x[:12], y[:12]
    aa = AutoAttack(model, norm="Linf", eps=4 / 255, version="custom", attacks_to_run=["apgd-ce", "square"],
                    device="cpu", verbose=False, seed=0)
    aa.apgd.n_iter, aa.square.n_queries = 5, 10
    state = tmp_path / "aa.json"
    x_adv = aa.run_standard_evaluation(x, y, bs=12, state_path=state)
    st = EvaluationState.from_disk(state)
    assert st.run_attacks == {"apgd-ce", "square"} and st.attacks_to_run == {"apgd-ce", "square"}
    with torch.no_grad():
        pred_adv, pred_clean = model(x_adv).argmax(1), model(x).argmax(1)
    assert torch.equal(st.robust_flags, pred_adv.eq(y))                       # flags = what the attack left
    assert st.clean_accuracy == pred_clean.eq(y).float().mean().item()
    assert (x_adv - x).abs().max() <= 4 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    again = aa.run_standard_evaluation(x, y, bs=12, state_path=state)       # all attacks done: nothing re-runs
    assert torch.equal(again, x) and torch.equal(EvaluationState.from_disk(state).robust_flags, st.robust_flags)
