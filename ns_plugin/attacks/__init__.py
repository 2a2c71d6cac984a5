"""torchattacks attacks for ViTs, one per file, in torchattacks' style (every argument but the model defaulted,
inputs and outputs images in [0, 1]).

=====================  ==========================================================================
``PatchFool``          Fu et al., ICLR 2022: attention-aware patch attack (+ mild / sparse variants)
``NullspaceNoise``     exact patch-embedding nullspace noise: predictions unchanged (sanity check)
``TargetedNullspace``  OpenReview:d8VrVfNARSy §7 / A.3: look like a target, be classified like the source
``EmbeddingMatch``     arXiv:2401.15568 Eq. 3-4: match a target's representation by gradient descent
``DamageNet``          a pre-generated adversarial set (folder of images + labels) served as an attack
=====================  ==========================================================================

Importing this package imports torchattacks but changes nothing in it; ``ns_plugin.register()`` adds the
attacks to the ``torchattacks`` namespace and ``torchattacks.__all__``. FGSM and CW, as used in the papers,
come from torchattacks itself.
"""
from .._lazy import lazy_attributes as _lazy_attributes

#: attack name -> module defining it (loaded on first use)
ATTACKS = {
    "PatchFool": "ns_plugin.attacks.patchfool",
    "NullspaceNoise": "ns_plugin.attacks.nullspace_noise",
    "TargetedNullspace": "ns_plugin.attacks.targeted_nullspace",
    "EmbeddingMatch": "ns_plugin.attacks.embedding_match",
    "DamageNet": "ns_plugin.attacks.damagenet",
}

#: attacks that build from the model alone (``torchattacks.__all__`` members); DamageNet needs a data folder
MODEL_ONLY = ("PatchFool", "NullspaceNoise", "TargetedNullspace", "EmbeddingMatch")

__all__ = list(ATTACKS)


__getattr__, __dir__ = _lazy_attributes(__name__, ATTACKS, __all__)
