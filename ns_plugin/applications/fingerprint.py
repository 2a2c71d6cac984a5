"""Model fingerprinting ("patenting") by the patch-embedding nullspace (OpenReview:d8VrVfNARSy §9).

OpenReview:d8VrVfNARSy §9 suggests that the nullspace "will be a unique property of any set of weights" and can serve to
"patent" a trained ViT without any extra step during training. We make that concrete:

* **Fingerprint**: the orthonormal basis ``N`` (``m x n``, ``n = c·rh·rw``) of the nullspace of the patch
  embedding *seen from pixels* (:func:`ns_plugin.nullspace.exact.exact_nullspace`, normaliser folded in), so it
  describes what the model computes from images and does not depend on how normalisation is split between the
  ``Normalize`` module and the conv weight. It is invariant to any invertible re-mixing ``W -> M W`` of the
  embedding (e.g. weight decay's global shrinking, or a permutation of the embedding channels).
* **Overlap**: ``tr(P_ref P_sus) / m_ref = ||N_ref N_sus^T||_F² / m_ref`` -- the mean squared cosine of the
  principal angles between the two nullspaces, i.e. the expected fraction of the energy of a random
  reference-nullspace noise that the suspect also ignores.
* **Score** (chance-corrected): for an *unrelated* ``m_sus``-dimensional subspace the overlap is ``m_sus / n``
  on average (for the tiny ViT, 128/192 = 0.67: a random subspace that large overlaps a lot), so
  ``score = (overlap - m_sus/n) / (min(m_ref, m_sus)/m_ref - m_sus/n)``: 1 for the same nullspace, about 0 for an
  unrelated one. Its spread for unrelated subspaces is tiny (standard deviation ~ 1/sqrt(m·r) for ``r = n - m``):
  :func:`null_distribution` samples it.
* **Test**: ``derived = score >= threshold``; :data:`DEFAULT_THRESHOLD` is justified by
  :func:`evaluate_fingerprint`, which builds derived models (copies, fine-tuned, pruned, head re-initialised)
  and unrelated ones (independently trained or re-initialised with other seeds) and reports true and false
  positive rates.

Limitations: the test only sees the patch embedding. A suspect whose patch embedding was re-initialised (and
then trained) is *not* recognised, and heavy changes of that single layer (e.g. pruning most of its weights)
lower the score towards chance.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from ..errors import NSPluginError
from ..nullspace.exact import PatchNullspace

#: Default decision threshold on the chance-corrected score. Measured with :func:`evaluate_fingerprint` on the
#: tiny ViT (``ns-plugin fingerprint --evaluate``): derived models scored 0.82 (patch embedding 50 % pruned) to
#: 1.0, unrelated ones at most 0.017, random subspaces -0.0001 ± 0.0076 (max 0.016). 0.5 sits in the middle of
#: that gap: pruning that leaves less than half of the nullspace alignment is treated as a different model.
DEFAULT_THRESHOLD = 0.5


#: A nullspace fingerprint is the patch-embedding nullspace itself (:class:`ns_plugin.nullspace.exact.PatchNullspace`:
#: ``basis``, patch geometry, ``to_dict``/``from_dict`` for saving).
Fingerprint = PatchNullspace


def fingerprint(model: nn.Module, *, tol: Optional[float] = None) -> Fingerprint:
    """The nullspace fingerprint of ``model`` (OpenReview:d8VrVfNARSy §9). Raises :class:`NSPluginError` when the model has no
    non-overlapping patch projection or its patch embedding is full rank (nullity 0: nothing to compare)."""
    from ..nullspace.exact import exact_nullspace
    if isinstance(model, PatchNullspace):
        return model
    ns = exact_nullspace(model, tol=tol)
    if ns.nullity == 0:
        raise NSPluginError(f"the patch embedding is full rank (embedding dim {ns.embed_dim} >= patch dim "
                            f"{ns.input_dim}): it has no nullspace, so there is no nullspace fingerprint")
    return ns


def _one_thread():
    from .watermark_solvers import _threads
    return _threads(1)


def similarity(reference, suspect) -> Dict[str, object]:
    """Compare two fingerprints (or models). Returns ``score`` (chance-corrected, 1 = same nullspace, ~0 =
    unrelated), ``overlap`` (mean cos² of the principal angles), ``chance`` (the overlap expected for an
    unrelated subspace), ``cos_min``/``cos_mean`` of the principal angles, ``comparable`` (False when the patch
    geometries differ: then score is 0 and ``reason`` says why)."""
    with _one_thread():   # tiny float64 linear algebra: one thread avoids oversubscription stalls
        return _similarity(fingerprint(reference), fingerprint(suspect))


def _similarity(a: Fingerprint, b: Fingerprint) -> Dict[str, object]:
    if a.input_dim != b.input_dim or tuple(a.patch_size) != tuple(b.patch_size) or a.in_chans != b.in_chans:
        return {"score": 0.0, "overlap": 0.0, "chance": 0.0, "cos_min": 0.0, "cos_mean": 0.0, "comparable": False,
                "reason": f"different patch geometry (reference {a.in_chans}x{a.patch_size[0]}x{a.patch_size[1]}, "
                          f"suspect {b.in_chans}x{b.patch_size[0]}x{b.patch_size[1]}): cannot derive from it",
                "nullity_reference": a.nullity, "nullity_suspect": b.nullity}
    n, ma, mb = a.input_dim, a.nullity, b.nullity
    cross = a.basis @ b.basis.T                                  # (ma, mb)
    overlap = float((cross ** 2).sum()) / ma
    cos = torch.linalg.svdvals(cross).clamp(0, 1)
    chance = mb / n
    best = min(ma, mb) / ma
    score = (overlap - chance) / (best - chance) if best - chance > 1e-12 else 0.0
    return {"score": float(score), "overlap": overlap, "chance": chance,
            "cos_min": float(cos[-1]) if ma <= mb else 0.0, "cos_mean": float(cos.mean()), "comparable": True,
            "nullity_reference": ma, "nullity_suspect": mb}


@dataclass
class FingerprintMatch:
    """Verdict of :func:`compare`: ``derived`` is ``score >= threshold``."""
    score: float
    threshold: float
    derived: bool
    details: Dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, object]:
        return {"score": self.score, "threshold": self.threshold, "derived": self.derived, **self.details}


def compare(reference, suspect, *, threshold: float = DEFAULT_THRESHOLD) -> FingerprintMatch:
    """Does ``suspect`` derive from ``reference``? Both are models (or :class:`Fingerprint`)."""
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
        raise NSPluginError(f"threshold must be a finite number, got {threshold!r}")
    s = similarity(reference, suspect)
    return FingerprintMatch(score=s["score"], threshold=float(threshold), derived=bool(s["score"] >= threshold),
                            details={k: v for k, v in s.items() if k != "score"})


def null_distribution(input_dim: int, nullity: int, *, samples: int = 200, seed: int = 0) -> Dict[str, float]:
    """Scores of pairs of independent uniformly random ``nullity``-dimensional subspaces of R^``input_dim``
    (what a model unrelated to the reference would get if its nullspace were generic): mean, std, max."""
    if not 0 < nullity < input_dim:
        raise NSPluginError(f"need 0 < nullity < input_dim, got nullity {nullity}, input_dim {input_dim}")
    g = torch.Generator().manual_seed(seed)
    scores = []
    with _one_thread():
        scores = _null_scores(input_dim, nullity, samples, g)
    t = torch.tensor(scores)
    return {"mean": float(t.mean()), "std": float(t.std()), "max": float(t.max()), "samples": samples}


def _null_scores(input_dim: int, nullity: int, samples: int, g: torch.Generator) -> List[float]:
    scores = []
    for _ in range(samples):
        q1, _ = torch.linalg.qr(torch.randn(input_dim, nullity, generator=g, dtype=torch.float64))
        q2, _ = torch.linalg.qr(torch.randn(input_dim, nullity, generator=g, dtype=torch.float64))
        ov = float(((q1.T @ q2) ** 2).sum()) / nullity
        c = nullity / input_dim
        scores.append((ov - c) / (1 - c))
    return scores


# ---------------------------------------------------------------------------------------------------------
# evaluation on models built here
# ---------------------------------------------------------------------------------------------------------
def finetune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int = 300, lr: float = 5e-4,
             batch_size: int = 64, seed: int = 1, freeze_patch_embed: bool = False,
             num_threads: Optional[int] = 1) -> nn.Module:
    """A fine-tuned copy of ``model``: ``steps`` AdamW steps (wd 0.05) of cross-entropy on ``(x, y)``, batches
    drawn with ``seed``; ``num_threads`` torch threads meanwhile (``None``: unchanged)."""
    from .watermark_solvers import _threads
    with _threads(num_threads):
        return _finetune(model, x, y, steps, lr, batch_size, seed, freeze_patch_embed)


def _finetune(model, x, y, steps, lr, batch_size, seed, freeze_patch_embed):
    import torch.nn.functional as F
    m = copy.deepcopy(model).train()
    g = torch.Generator().manual_seed(seed)
    params = [p for n, p in m.named_parameters() if not (freeze_patch_embed and "patch_embed" in n)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        loss = F.cross_entropy(m(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return m.eval()


@torch.no_grad()
def prune(model: nn.Module, amount: float, *, scope: str = "patch_embed") -> nn.Module:
    """A magnitude-pruned copy: zero the ``amount`` fraction of smallest-|w| weights of the patch embedding
    (``scope='patch_embed'``) or of all weight matrices/kernels, globally (``scope='global'``)."""
    if not 0 <= amount < 1:
        raise NSPluginError(f"prune amount must be in [0, 1), got {amount}")
    m = copy.deepcopy(model)
    from ..nullspace.exact import find_patch_projection
    _, conv = find_patch_projection(m)
    if scope == "patch_embed":
        ws = [conv.weight]
    elif scope == "global":
        ws = [p for n, p in m.named_parameters() if p.dim() >= 2]
    else:
        raise NSPluginError(f"scope must be 'patch_embed' or 'global', got {scope!r}")
    allw = torch.cat([w.abs().flatten() for w in ws])
    k = int(amount * allw.numel())
    if k:
        cut = allw.kthvalue(k).values
        for w in ws:
            w.mul_((w.abs() > cut).to(w.dtype))
    return m.eval()


@torch.no_grad()
def reinit_head(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy with the classifier head re-initialised (the rest, patch embedding included, kept)."""
    from ..models import unwrap
    m = copy.deepcopy(model)
    _, core = unwrap(m)
    head = getattr(core, "head", None)
    if not isinstance(head, nn.Linear):
        raise NSPluginError("model has no linear 'head' to re-initialise")
    g = torch.Generator().manual_seed(seed)
    head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.02)
    head.bias.zero_()
    return m


def evaluate_fingerprint(reference: Optional[nn.Module] = None, *, threshold: float = DEFAULT_THRESHOLD,
                         finetune_steps: int = 200, n_seeds: int = 2, independent_epochs: int = 8,
                         progress: bool = True) -> Dict[str, object]:
    """True and false positive rates of :func:`compare` on models built here.

    Derived (should be detected): the reference itself, fine-tuned copies (``finetune_steps`` steps on the
    digits, seeds 1..n, lr 5e-4 and 2e-3), copies with the head re-initialised and fine-tuned, copies with
    the patch embedding magnitude-pruned by 10/30/50 %, a copy pruned globally by 50 %, and a fine-tuned +
    pruned copy. Unrelated (should not be detected): independently trained models (seeds 1..n,
    ``independent_epochs`` epochs) and randomly initialised ones (seeds 1..n). Also reports the scores of
    random subspaces (:func:`null_distribution`) and, as a documented blind spot, a copy whose patch embedding
    was re-initialised and then fine-tuned.

    Returns ``{"rows": [{"name", "derived", "score", "detected"}...], "tpr", "fpr", "min_derived_score",
    "max_unrelated_score", "threshold", "null": ...}``.
    """
    from tqdm.auto import tqdm
    from ..data import load_digits
    from ..embedded import default_model
    from ..models import build_default_model

    if reference is None:
        reference, _ = default_model(progress=progress)
    splits = load_digits()
    x, y = splits.train.tensors
    ref_fp = fingerprint(reference)
    specs: List = [("same weights", True, lambda: copy.deepcopy(reference))]
    for s in range(1, n_seeds + 1):
        specs.append((f"fine-tuned {finetune_steps} steps lr 5e-4 seed {s}", True,
                      lambda s=s: finetune(reference, x, y, steps=finetune_steps, lr=5e-4, seed=s)))
    specs.append((f"fine-tuned {finetune_steps} steps lr 2e-3", True,
                  lambda: finetune(reference, x, y, steps=finetune_steps, lr=2e-3, seed=11)))
    specs.append((f"head re-initialised + fine-tuned {finetune_steps} steps", True,
                  lambda: finetune(reinit_head(reference, 5), x, y, steps=finetune_steps, lr=5e-4, seed=12)))
    for a in (0.1, 0.3, 0.5):
        specs.append((f"patch_embed pruned {int(a * 100)}%", True, lambda a=a: prune(reference, a)))
    specs.append(("globally pruned 50%", True, lambda: prune(reference, 0.5, scope="global")))
    specs.append(("fine-tuned + patch_embed pruned 30%", True,
                  lambda: prune(finetune(reference, x, y, steps=finetune_steps, lr=5e-4, seed=13), 0.3)))
    for s in range(1, n_seeds + 1):
        specs.append((f"independently trained seed {s}", False,
                      lambda s=s: default_model(seed=s, epochs=independent_epochs, progress=False)[0]))
        specs.append((f"random init seed {s}", False, lambda s=s: build_default_model(seed=s).eval()))
    rows = []
    for name, derived, make in tqdm(specs, desc="fingerprint suite", disable=not progress):
        sim = similarity(ref_fp, make())
        rows.append({"name": name, "derived": derived, "score": round(sim["score"], 5),
                     "overlap": round(sim["overlap"], 5), "detected": bool(sim["score"] >= threshold)})
    # blind spot: the one layer the fingerprint reads is replaced
    blind = copy.deepcopy(reference)
    from ..nullspace.exact import find_patch_projection
    _, conv = find_patch_projection(blind)
    with torch.no_grad():
        torch.manual_seed(99)
        conv.reset_parameters()
    blind = finetune(blind, x, y, steps=finetune_steps, lr=5e-4, seed=14)
    blind_score = similarity(ref_fp, blind)["score"]
    pos = [r for r in rows if r["derived"]]
    neg = [r for r in rows if not r["derived"]]
    nul = null_distribution(ref_fp.input_dim, ref_fp.nullity, samples=100)
    return {"rows": rows, "threshold": threshold,
            "tpr": sum(r["detected"] for r in pos) / max(1, len(pos)),
            "fpr": sum(r["detected"] for r in neg) / max(1, len(neg)),
            "n_derived": len(pos), "n_unrelated": len(neg),
            "min_derived_score": min(r["score"] for r in pos), "max_unrelated_score": max(r["score"] for r in neg),
            "null": nul, "blind_spot_patch_embed_reinit_score": round(blind_score, 5)}
