"""Home module of the timm model entrypoints that :func:`ns_plugin.register` creates.

timm's ``register_model`` files each entrypoint under the module that defines it and reads that module's
``default_cfgs`` for the pretrained config (mean/std, input size, weights file). ``ns_plugin.registry`` fills
``default_cfgs`` and this module's namespace when it registers ``ns_vit_digits`` and fine-tuned checkpoints;
importing this module registers nothing.
"""
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

#: model name -> pretrained config dict (timm ``PretrainedCfg`` fields), filled by ns_plugin.registry
default_cfgs: Dict[str, Dict[str, Any]] = {}

#: names of the entrypoints defined here (timm appends to it)
__all__: List[str] = ["PadClasses"]


class PadClasses(nn.Module):
    """Extends k logits to ``num_classes`` (robustbench asks ImageNet models for 1000 logits): the checkpoint's
    class j goes to output ``index[j]`` (default ``j``); the others get ``fill``. No parameters or buffers, so
    the state-dict keys of ``Sequential(Normalize, model, PadClasses)`` are those of our checkpoints."""

    def __init__(self, num_classes: int, fill: float = -1e4, index: Optional[Sequence[int]] = None):
        super().__init__()
        self.num_classes, self.fill = int(num_classes), float(fill)
        self.index = None if index is None else [int(i) for i in index]

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        out = logits.new_full((logits.shape[0], self.num_classes), self.fill)
        if self.index is None:
            out[:, :logits.shape[1]] = logits
        else:
            out[:, torch.as_tensor(self.index, device=logits.device)] = logits[:, :len(self.index)]
        return out

    def extra_repr(self) -> str:
        where = "" if self.index is None else f", index={self.index[:4]}{'...' if len(self.index) > 4 else ''}"
        return f"num_classes={self.num_classes}, fill={self.fill}{where}"
