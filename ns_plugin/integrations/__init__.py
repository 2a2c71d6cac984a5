"""Integrations: the only modules that write into other packages' namespaces (timm's model registry,
``torchattacks`` and its ``__all__``, robustbench's import needs, EasyRobust's training-script contract).

Layering: everything else in ns_plugin sits below this package and never imports it; each submodule
here imports the layers it plugs in. Importing this package (or ``ns_plugin``) changes nothing;
:func:`register` does.

* :mod:`.torchattacks` — attacks into ``torchattacks`` (namespace and ``__all__``), third-party attack plugins.
* :mod:`.timm` — ``ns_vit_digits`` and fine-tuned checkpoints as timm models (:func:`register_checkpoint`).
* :mod:`.robustbench` — the robustbench/AutoAttack install shims, the ``load_model`` naming, the offline
  ImageNet-layout folder.
* :mod:`.easyrobust` — ``train_one_epoch`` with the signature of EasyRobust's (and timm's) training scripts.
"""
from __future__ import annotations

import threading as _threading
from typing import Dict, List

#: one lock for every registration into a foreign namespace
_LOCK = _threading.RLock()


def register(*, torchattacks: bool = True, timm: bool = True, plugins: bool = True) -> Dict[str, List[str]]:
    """Plug ns_plugin into the ecosystem; idempotent (calling it again changes nothing).

    * torchattacks: ``torchattacks.PatchFool``, ``NullspaceNoise``, ``TargetedNullspace``, ``EmbeddingMatch`` (also
      appended to ``torchattacks.__all__``, so harnesses that loop over it see them) and ``torchattacks.DamageNet``
      (namespace only: it needs a data folder, so it cannot be built from the model alone);
    * timm: the embedded architecture as ``ns_vit_digits``;
    * third-party attacks declared under the ``ns_plugin.attacks`` entry-point group.

    ``torchattacks=False`` / ``timm=False`` / ``plugins=False`` skip a part. A name clash with an existing
    torchattacks or timm name raises :class:`~ns_plugin.errors.NSPluginError`.
    Returns ``{"attacks": [...], "timm": [...], "plugins": [...]}``.
    """
    from . import timm as _timm_int
    from . import torchattacks as _ta_int

    out: Dict[str, List[str]] = {"attacks": [], "timm": [], "plugins": []}
    with _LOCK:
        if torchattacks:
            out["attacks"] = _ta_int.register_builtin_attacks()
        if timm:
            out["timm"] = [_timm_int.register_timm_digits()]
        if plugins:
            out["plugins"] = _ta_int.load_attack_plugins()
    return out


__all__ = ["register"]
