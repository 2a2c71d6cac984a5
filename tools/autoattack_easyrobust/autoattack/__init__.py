"""AutoAttack (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020) under the import name robustbench 1.1.1 uses.

The attacks that run are fra31/auto-attack's, as vendored by easyrobust 0.2.4
(``easyrobust.attacks.autoattack``): APGD-CE, APGD-T, FAB-T and Square for ``version="standard"``, same
constructor (``AutoAttack(model, norm, eps, seed, verbose, attacks_to_run, version, is_tf_model, device,
log_path)``). What this package adds is ``run_standard_evaluation(..., state_path=...)`` and
:mod:`autoattack.state`, which the vendored copy predates: with a state path, the attacks run one after
another on the points still robust and the state file is rewritten after each, so an interrupted
evaluation resumes at the next attack (robustbench's ``benchmark(aa_state_path=...)``).
"""
from pathlib import Path

import torch
from easyrobust.attacks.autoattack import autoattack as _vendored

from .state import EvaluationState

__version__ = "0.1.0"
#: which AutoAttack code runs (stated in reports)
SOURCE = "fra31/auto-attack as vendored by easyrobust 0.2.4 (easyrobust.attacks.autoattack)"

__all__ = ["AutoAttack", "EvaluationState", "SOURCE"]


class AutoAttack(_vendored.AutoAttack):
    """easyrobust's vendored fra31 ``AutoAttack`` plus ``state_path`` in :meth:`run_standard_evaluation`."""

    def run_standard_evaluation(self, x_orig, y_orig, bs=250, return_labels=False, state_path=None):
        if state_path is None:
            return super().run_standard_evaluation(x_orig, y_orig, bs=bs, return_labels=return_labels)
        return self._run_with_state(Path(state_path), x_orig, y_orig, bs, return_labels)

    @torch.no_grad()
    def _predict(self, x, bs):
        out = [self.get_logits(x[i:i + bs].to(self.device)).argmax(1).to(x.device) for i in range(0, len(x), bs)]
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=x.device)

    def _run_with_state(self, path, x_orig, y_orig, bs, return_labels):
        wanted = list(self.attacks_to_run)
        if path.exists():
            state = EvaluationState.from_disk(path)
            if set(wanted) != state.attacks_to_run:
                raise ValueError(f"the state in {path} was created for attacks {sorted(state.attacks_to_run)}, "
                                 f"not {sorted(wanted)}; use another state_path")
            self.logger.log(f"Restored state from {path}; only this run's adversarial examples are returned")
        else:
            state = EvaluationState(set(wanted), path=path)
            state.to_disk(force=True)
        if state.robust_flags is None:
            flags = self._predict(x_orig, bs).eq(y_orig.to(x_orig.device))
            state.clean_accuracy = flags.float().mean().item()
            state.robust_flags = flags
            if self.verbose:
                self.logger.log(f"initial accuracy: {state.clean_accuracy:.2%}")
        flags = state.robust_flags.clone().to(x_orig.device)
        x_adv = x_orig.clone().detach()
        try:
            for attack in [a for a in wanted if a not in state.run_attacks]:
                idx = flags.nonzero().flatten()
                if len(idx):
                    self.attacks_to_run = [attack]
                    xa, ya = super().run_standard_evaluation(x_orig[idx], y_orig[idx], bs=bs, return_labels=True)
                    fooled = ya.to(flags.device).ne(y_orig[idx].to(flags.device))
                    flags[idx[fooled]] = False
                    x_adv[idx[fooled]] = xa[fooled].detach().to(x_adv.device)
                state.robust_flags = flags
                state.add_run_attack(attack)
                if self.verbose:
                    self.logger.log(f"robust accuracy after {attack.upper()}: {flags.float().mean().item():.2%}")
        finally:
            self.attacks_to_run = wanted
        return (x_adv, self._predict(x_adv, bs)) if return_labels else x_adv
