"""ns_plugin: nullspace methods for vision transformers, plugged into timm, torchattacks, robustbench
and EasyRobust.

Importing the package does nothing but define names (heavy modules load on first use);
``ns_plugin.register()`` is what plugs things into the ecosystem.

Papers: "Approximate Nullspace Augmented Finetuning for Robust Vision Transformers" and "Nullspace of
Vision Transformers and what does it tell us?" (Liu et al.).
"""
__version__ = "0.1.0"

from ._lazy import lazy_attributes as _lazy_attributes  # noqa: E402  (no heavy imports)
from .errors import NSPluginError  # noqa: E402  (tiny, no heavy imports)

# public name -> module that defines it (loaded lazily)
_LAZY = {
    # data, models, checkpoints (the embedded default and EasyRobust's conventions)
    "load_digits": "ns_plugin.data",
    "image_folder": "ns_plugin.data",
    "create_model": "ns_plugin.models",
    "build_default_model": "ns_plugin.models",
    "Normalize": "ns_plugin.models",
    "train_default_model": "ns_plugin.embedded",
    "default_model": "ns_plugin.embedded",
    "save_checkpoint": "ns_plugin.checkpoint",
    "load_checkpoint": "ns_plugin.checkpoint",
    "read_checkpoint": "ns_plugin.checkpoint",
    # exact nullspace (arXiv:2403.10476 §3.1) and the approximate, encoder-level noise (§3.2-4)
    "exact_nullspace": "ns_plugin.nullspace.exact",
    "verify_invariance": "ns_plugin.nullspace.exact",
    "inject_noise": "ns_plugin.anatomy",
    "token_shape": "ns_plugin.anatomy",
    "search_noise": "ns_plugin.nullspace.search",
    "search_input_noise": "ns_plugin.nullspace.search",
    "noise_quality": "ns_plugin.nullspace.metrics",
    "mse_probability": "ns_plugin.nullspace.metrics",
    # fine-tuning (Algorithm 1 and the baselines), the plugin hooks, the comparison harness
    "train": "ns_plugin.training",
    "load_config": "ns_plugin.training",
    "register": "ns_plugin.integrations",
    "register_checkpoint": "ns_plugin.integrations.timm",
    "train_one_epoch": "ns_plugin.integrations.easyrobust",
    "run_comparison": "ns_plugin.evaluation.harness",
    # applications
    "watermark_images": "ns_plugin.applications.watermark",
    "fingerprint": "ns_plugin.applications.fingerprint",
    "targeted_triplets": "ns_plugin.applications.targeted",
    "saliency_maps": "ns_plugin.applications.saliency",
}

__all__ = ["NSPluginError", "__version__", *_LAZY]


__getattr__, __dir__ = _lazy_attributes(__name__, _LAZY, __all__)
