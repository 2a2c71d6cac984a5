"""Home module of the timm model entrypoints that :func:`ns_plugin.register` creates.

timm's ``register_model`` files each entrypoint under the module that defines it and reads that module's
``default_cfgs`` for the pretrained config (mean/std, input size, weights file). ``ns_plugin.registry`` fills
``default_cfgs`` and this module's namespace when it registers ``ns_vit_digits`` and fine-tuned checkpoints;
importing this module registers nothing.
"""
from typing import Any, Dict, List

import torch
from torch import nn

#: model name -> pretrained config dict (timm ``PretrainedCfg`` fields), filled by ns_plugin.registry
default_cfgs: Dict[str, Dict[str, Any]] = {}

#: names of the entrypoints defined here (timm appends to it)
__all__: List[str] = ["PadClasses"]


class PadClasses(nn.Module):
    """Extends k logits to ``num_classes`` (robustbench asks ImageNet models for 1000 logits): class j < k is
    the checkpoint's class j; the others get ``fill``. No parameters or buffers, so the state-dict keys of
    ``Sequential(Normalize, model, PadClasses)`` are those of our checkpoints."""

    def __init__(self, num_classes: int, fill: float = -1e4):
        super().__init__()
        self.num_classes, self.fill = int(num_classes), float(fill)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        out = logits.new_full((logits.shape[0], self.num_classes), self.fill)
        out[:, :logits.shape[1]] = logits
        return out

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, fill={self.fill}"
