"""Proposition 1 of arXiv:2403.10476 (§3.2, proof in appendix B): sufficient conditions for an attention layer to
have an *encoder-level nullspace*, checked numerically on real timm attention layers.

For a self-attention layer with ``h`` heads and projections ``Q_i, K_i, V_i`` (each ``d x d_k``, so that
``head_i(X) = softmax(X Q_i K_i^T X^T / sqrt(d_k)) X V_i``), the proposition says that if

1. ``M_i = Q_i K_i^T`` is symmetric for every head,
2. the row space ``R(V_i^T)`` (= the column space of ``V_i``) lies in ``R(M_i)`` for every head,
3. for some heads ``m != n`` a non-zero row ``r_{m,k}`` of ``M_m`` lies in ``R(M_n)`` (colinearity),

then ``S = R(M_1) + ... + R(M_h)`` has dimension ``<= d - 1``, any ``w`` in ``S^perp`` is also orthogonal
to every ``V_i`` (condition 2), and ``W = c w^T`` (every token moved by a multiple of ``w``) satisfies
``head_i(X + W) = head_i(X)`` for all heads and all ``X`` (Eq. 10-11).

What this module does:

* :func:`head_matrices` reads ``Q_i, K_i, V_i`` (and the biases) out of a timm ``Attention`` (``attn.qkv``).
* :func:`check_conditions` measures each condition with a tolerance and reports *by how much* it fails
  (relative asymmetry, relative row-space residual, best colinearity residual), the dimension of ``S`` and
  of ``S^perp``, and, independently of the three conditions, the dimension of the space of ``w`` for which
  ``W = c w^T`` leaves every head unchanged (:func:`admissible_directions`; with biases this adds the
  constraint ``(K_i b^q_i) . w = 0``).
* :func:`construct_w` builds ``W`` as in appendix B and :func:`verify_heads` measures
  ``max |head_i(X + W) - head_i(X)|`` on random ``X``.
* :func:`remark1_attention` builds a timm ``Attention`` whose weights satisfy all three conditions through
  Remark 1 (``Q_i = B P``, ``K_i = B P^{-T} D`` with ``A = P D P^{-1}`` symmetric), a positive control.
* :func:`check_model` runs all of it for every attention layer of a model.

The proposition is about the attention layer on its own input: in a pre-norm ViT block that input is
``LayerNorm(x)``, so ``W`` found here is not a perturbation of the block input (LayerNorm is not additive).
With ``qk_norm`` the scores are ``LN(X Q) LN(X K)^T`` and the argument does not apply; the conditions are
still reported on the linear maps and :func:`verify_heads` measures the real behaviour.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..errors import NSPluginError

__all__ = ["HeadMatrices", "head_matrices", "attention_layers", "check_conditions", "admissible_directions",
           "construct_w", "head_outputs", "verify_heads", "remark1_attention", "check_model"]


@dataclass
class HeadMatrices:
    """Per-head projections of one attention layer in float64 (shapes ``(h, d, d_k)`` and ``(h, d_k)``)."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bq: torch.Tensor
    bk: torch.Tensor
    bv: torch.Tensor
    scale: float
    qk_norm: bool = False
    param_eps: float = float(torch.finfo(torch.float32).eps)
    extra: Dict = field(default_factory=dict)

    @property
    def num_heads(self) -> int:
        return int(self.q.shape[0])

    @property
    def dim(self) -> int:
        return int(self.q.shape[1])

    @property
    def head_dim(self) -> int:
        return int(self.q.shape[2])

    def scores_matrix(self) -> torch.Tensor:
        """``M_i = Q_i K_i^T`` for every head, ``(h, d, d)``."""
        return self.q @ self.k.transpose(1, 2)


def _is_attention(mod: nn.Module) -> bool:
    return isinstance(getattr(mod, "qkv", None), nn.Linear) and hasattr(mod, "num_heads")


def head_matrices(attn: nn.Module) -> HeadMatrices:
    """Read ``Q_i, K_i, V_i`` (``d x d_k``: ``q = x Q_i + b^q_i``) and biases from a timm-style attention
    module with a fused ``qkv`` linear layer (ViT, DeiT, and friends)."""
    if not _is_attention(attn):
        raise NSPluginError(f"{type(attn).__name__} is not a timm-style attention layer with a fused `qkv` "
                            f"linear layer and `num_heads`; pass e.g. model.blocks[0].attn")
    w = attn.qkv.weight.detach().to("cpu", torch.float64)
    three_d, d = w.shape
    h = int(attn.num_heads)
    if three_d != 3 * d or d % h:
        raise NSPluginError(f"qkv weight has shape {tuple(w.shape)}, expected (3*dim, dim) with dim divisible "
                            f"by num_heads={h}; this attention layout is not supported")
    dk = d // h
    b = attn.qkv.bias
    b = b.detach().to("cpu", torch.float64) if b is not None else torch.zeros(3 * d, dtype=torch.float64)
    # timm: qkv(x).reshape(B, N, 3, h, dk): output row index = s*d + head*dk + j
    wq, wk, wv = (w[s * d:(s + 1) * d].reshape(h, dk, d).transpose(1, 2).contiguous() for s in range(3))
    bq, bk, bv = (b[s * d:(s + 1) * d].reshape(h, dk) for s in range(3))
    qk_norm = not isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity)
    scale = float(getattr(attn, "scale", dk ** -0.5))
    eps = float(torch.finfo(attn.qkv.weight.dtype).eps) if attn.qkv.weight.is_floating_point() else 1e-7
    return HeadMatrices(wq, wk, wv, bq, bk, bv, scale, qk_norm, eps)


def attention_layers(model: nn.Module) -> List[tuple]:
    """``[(name, module)]`` of the timm-style attention layers of ``model`` (in forward order)."""
    found = [(n, m) for n, m in model.named_modules() if _is_attention(m)]
    if not found:
        raise NSPluginError(f"{type(model).__name__} has no timm-style attention layers (a module with a fused "
                            f"`qkv` linear and `num_heads`); Proposition 1 applies to vision transformers")
    return found


def _row_basis(m: torch.Tensor, rtol: float) -> torch.Tensor:
    """Orthonormal basis (rows) of the row space of ``m`` with singular values > rtol * s_max."""
    _, s, vh = torch.linalg.svd(m, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return vh[:0]
    return vh[: int((s > rtol * s[0]).sum())]


def _default_rank_tol(hm: "HeadMatrices") -> float:
    """Relative rank cut-off: ``10 * d * eps`` of the dtype the weights were stored in (float32 weights
    carry ~1e-7 relative rounding, so a float64 cut-off would call every matrix full rank)."""
    return 10 * hm.dim * hm.param_eps


def admissible_directions(hm: HeadMatrices, *, tol: float = 1e-8) -> Dict[str, torch.Tensor]:
    """Directions ``w`` for which ``W = c w^T`` (any per-token multiples ``c``) leaves every head unchanged.

    Derived from Eq. 10-11 with timm's biases: ``M_i w = 0``, ``M_i^T w = 0``, ``V_i^T w = 0`` and
    ``(K_i b^q_i) . w = 0`` for every head (the term ``c_i (w Q_i) . b^k_i`` is constant along each softmax
    row and cancels). Each block of constraints is scaled to unit Frobenius norm and stacked; ``w`` is
    admissible when the stacked map sends it to ``<= tol``.

    Returns ``{"basis": (k, d) orthonormal rows, "singular_values": ascending singular values of the
    stacked constraints (the smallest is how far the layer is from having any such w), "directions": all d
    right singular vectors in the same (ascending) order}``.
    """
    blocks = []
    m = hm.scores_matrix()
    for i in range(hm.num_heads):
        kb = (hm.k[i] @ hm.bq[i])[None]
        for blk in (m[i], m[i].T, hm.v[i].T, kb):
            n = torch.linalg.norm(blk)
            if float(n) > 0:
                blocks.append(blk / n)
    c = torch.cat(blocks, 0)
    _, s, vh = torch.linalg.svd(c, full_matrices=True)
    d = hm.dim
    sv = torch.zeros(d, dtype=torch.float64)
    sv[: s.numel()] = s
    order = torch.argsort(sv)
    sv, vh = sv[order], vh[order]
    return {"basis": vh[sv <= tol].contiguous(), "singular_values": sv, "directions": vh}


def check_conditions(hm_or_attn, *, tol: float = 1e-6, rank_tol: Optional[float] = None) -> Dict:
    """Check the three conditions of Proposition 1 (arXiv:2403.10476 §3.2) numerically for one attention layer.

    Args:
        hm_or_attn: a timm attention module or :class:`HeadMatrices`.
        tol: relative tolerance for "holds" (asymmetry, row-space residual, colinearity residual).
        rank_tol: singular values ``<= rank_tol * s_max`` count as zero when forming row spaces
            (default ``10 * d * eps`` of the weights' dtype).

    Returns a dict: ``asymmetry`` (per head ``||M - M^T||_F / ||M||_F``), ``rowspace_residual`` (per head
    ``||(I - P_{R(M_i)}) V_i||_F / ||V_i||_F``), ``colinearity`` (best ``||(I - P_{R(M_n)}) r_{m,k}|| /
    ||r_{m,k}||`` over pairs and rows, with the pair and row), the three booleans ``cond1/2/3``, ``holds``,
    ``rank`` per head, ``dim_S`` and ``dim_S_perp`` (the room the proof's W lives in), and
    ``admissible_dim`` / ``admissible_gap`` from :func:`admissible_directions`.
    """
    hm = hm_or_attn if isinstance(hm_or_attn, HeadMatrices) else head_matrices(hm_or_attn)
    if tol < 0:
        raise NSPluginError(f"tol must be >= 0, got {tol}")
    d, h = hm.dim, hm.num_heads
    rank_tol = _default_rank_tol(hm) if rank_tol is None else rank_tol
    m = hm.scores_matrix()
    norms = torch.linalg.norm(m, dim=(1, 2)).clamp_min(1e-300)
    asym = (torch.linalg.norm(m - m.transpose(1, 2), dim=(1, 2)) / norms).tolist()
    bases = [_row_basis(m[i], rank_tol) for i in range(h)]
    ranks = [int(b.shape[0]) for b in bases]
    resid = []
    for i in range(h):
        v = hm.v[i]
        p = bases[i].T @ (bases[i] @ v)
        resid.append(float(torch.linalg.norm(v - p) / torch.linalg.norm(v).clamp_min(1e-300)))
    best = {"residual": math.inf, "m": None, "n": None, "row": None}
    for a, b in itertools.permutations(range(h), 2):
        rows = m[a]
        rn = torch.linalg.norm(rows, dim=1)
        keep = rn > rank_tol * float(rn.max().clamp_min(1e-300))
        if not bool(keep.any()):
            continue
        proj = (rows @ bases[b].T) @ bases[b]
        r = torch.linalg.norm(rows - proj, dim=1) / rn.clamp_min(1e-300)
        r[~keep] = math.inf
        k = int(torch.argmin(r))
        if float(r[k]) < best["residual"]:
            best = {"residual": float(r[k]), "m": a, "n": b, "row": k}
    s_basis = _row_basis(torch.cat(bases, 0), rank_tol) if sum(ranks) else torch.zeros(0, d, dtype=torch.float64)
    adm = admissible_directions(hm, tol=tol)
    c1 = max(asym) <= tol
    c2 = max(resid) <= tol
    c3 = h > 1 and best["residual"] <= tol
    return {
        "num_heads": h, "dim": d, "head_dim": hm.head_dim, "qk_norm": hm.qk_norm, "tol": tol,
        "asymmetry": asym, "rowspace_residual": resid, "colinearity": best, "rank": ranks,
        "cond1": c1, "cond2": c2, "cond3": c3, "holds": bool(c1 and c2 and c3 and not hm.qk_norm),
        "dim_S": int(s_basis.shape[0]), "dim_S_perp": d - int(s_basis.shape[0]),
        "admissible_dim": int(adm["basis"].shape[0]), "admissible_gap": float(adm["singular_values"][0]),
    }


def construct_w(hm_or_attn, n_tokens: int, *, method: str = "proof", tol: float = 1e-6,
                generator: Optional[torch.Generator] = None, rank_tol: Optional[float] = None) -> torch.Tensor:
    """Build ``W`` (``n_tokens x d``, float64) with every row a random multiple of one direction ``w``.

    ``method="proof"`` takes ``w`` in ``S^perp`` as in appendix B (valid when the conditions hold);
    ``method="admissible"`` takes the direction that best satisfies the exact constraints of
    :func:`admissible_directions` (the smallest singular vector: exact when ``admissible_dim > 0``,
    otherwise the least-violating direction, useful to measure *how far* a layer is from invariance).
    Raises :class:`NSPluginError` when ``method="proof"`` and ``S`` is the whole space (no ``w``).
    """
    hm = hm_or_attn if isinstance(hm_or_attn, HeadMatrices) else head_matrices(hm_or_attn)
    d = hm.dim
    if n_tokens < 1:
        raise NSPluginError(f"n_tokens must be >= 1, got {n_tokens}")
    if method == "proof":
        rank_tol = _default_rank_tol(hm) if rank_tol is None else rank_tol
        m = hm.scores_matrix()
        s_basis = _row_basis(torch.cat([_row_basis(m[i], rank_tol) for i in range(hm.num_heads)], 0), rank_tol)
        if s_basis.shape[0] >= d:
            raise NSPluginError(f"the row spaces of Q_i K_i^T span all {d} dimensions (dim S = {d}): no W exists "
                                f"by the construction of appendix B; use method='admissible' to measure the gap")
        _, _, vh = torch.linalg.svd(s_basis if s_basis.shape[0] else torch.zeros(1, d, dtype=torch.float64),
                                    full_matrices=True)
        w = vh[s_basis.shape[0]] if s_basis.shape[0] else vh[0]
    elif method == "admissible":
        w = admissible_directions(hm, tol=tol)["directions"][0]
    else:
        raise NSPluginError(f"method must be 'proof' or 'admissible', got {method!r}")
    c = torch.randn(n_tokens, 1, generator=generator, dtype=torch.float64)
    return c * w[None]


def head_outputs(hm: HeadMatrices, x: torch.Tensor, attn: Optional[nn.Module] = None) -> torch.Tensor:
    """``head_i(X)`` for every head: ``(B, h, N, d_k)`` (Eq. 11 with timm's biases, scale and qk_norm).

    ``x`` is the attention layer's input ``(B, N, d)``. Pass ``attn`` when the layer uses ``qk_norm`` so its
    q/k norms are applied.
    """
    x = x.to(torch.float64)
    q = torch.einsum("bnd,hdk->bhnk", x, hm.q) + hm.bq[None, :, None]
    k = torch.einsum("bnd,hdk->bhnk", x, hm.k) + hm.bk[None, :, None]
    v = torch.einsum("bnd,hdk->bhnk", x, hm.v) + hm.bv[None, :, None]
    if hm.qk_norm:
        if attn is None:
            raise NSPluginError("this layer uses qk_norm: pass attn= so its q/k norms are applied")
        import copy
        a64 = copy.deepcopy(attn).to(torch.float64)
        q, k = a64.q_norm(q), a64.k_norm(k)
    att = torch.softmax(q @ k.transpose(-1, -2) * hm.scale, dim=-1)
    return att @ v


@torch.no_grad()
def verify_heads(hm_or_attn, w: torch.Tensor, *, n_random: int = 4, n_tokens: Optional[int] = None,
                 x: Optional[torch.Tensor] = None, scale: float = 1.0,
                 generator: Optional[torch.Generator] = None) -> Dict[str, float]:
    """Measure ``max_i |head_i(X + W) - head_i(X)|`` (Eq. 11) on random ``X ~ N(0, scale^2)``.

    ``w`` is ``(N, d)`` (from :func:`construct_w`). Returns the largest absolute change of any head output,
    the same relative to the largest head output, and the largest change of the full module output
    (``proj`` of the concatenated heads) when a module was given.
    """
    attn = None if isinstance(hm_or_attn, HeadMatrices) else hm_or_attn
    hm = hm_or_attn if attn is None else head_matrices(attn)
    w = w.to(torch.float64)
    n = w.shape[0] if n_tokens is None else n_tokens
    if w.shape != (n, hm.dim):
        raise NSPluginError(f"W must have shape (n_tokens, {hm.dim}), got {tuple(w.shape)}")
    if x is None:
        x = torch.randn(n_random, n, hm.dim, generator=generator, dtype=torch.float64) * scale
    x = x.to(torch.float64)
    a, b = head_outputs(hm, x, attn), head_outputs(hm, x + w, attn)
    out = {"max_head_diff": float((a - b).abs().max()),
           "rel_head_diff": float((a - b).abs().max() / a.abs().max().clamp_min(1e-300)),
           "w_norm": float(torch.linalg.norm(w))}
    if attn is not None:
        import copy
        m64 = copy.deepcopy(attn).to(torch.float64).eval()
        out["max_module_diff"] = float((m64(x) - m64(x + w)).abs().max())
    return out


def remark1_attention(dim: int = 64, num_heads: int = 4, *, shared: Sequence[int] = (0, 1),
                      qkv_bias: bool = True, seed: int = 0) -> nn.Module:
    """A timm ``Attention`` whose weights satisfy all three conditions (arXiv:2403.10476 Remark 1).

    For each head ``i``: ``A_i = P_i D_i P_i^T`` (random orthogonal ``P_i``, diagonal ``D_i``) is symmetric,
    ``Q_i = B_i P_i`` and ``K_i = B_i P_i^{-T} D_i`` give ``Q_i K_i^T = B_i A_i B_i^T`` (condition 1);
    ``V_i = B_i C_i`` puts the value columns inside ``R(Q_i K_i^T)`` (condition 2); the heads listed in
    ``shared`` use the same ``B`` so their score matrices share a row space (condition 3). Query biases are
    zero (so the bias term of :func:`admissible_directions` vanishes); key/value biases are random.
    """
    from timm.models.vision_transformer import Attention

    if dim % num_heads:
        raise NSPluginError(f"dim={dim} must be divisible by num_heads={num_heads}")
    if num_heads < 2 or len(set(shared)) < 2 or not all(0 <= s < num_heads for s in shared):
        raise NSPluginError(f"shared must name >= 2 distinct heads in [0, {num_heads}); got {tuple(shared)}")
    g = torch.Generator().manual_seed(seed)
    dk = dim // num_heads
    attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
    common = torch.randn(dim, dk, generator=g, dtype=torch.float64) / math.sqrt(dim)
    qs, ks, vs = [], [], []
    for i in range(num_heads):
        b = common if i in shared else torch.randn(dim, dk, generator=g, dtype=torch.float64) / math.sqrt(dim)
        p, _ = torch.linalg.qr(torch.randn(dk, dk, generator=g, dtype=torch.float64))
        dg = torch.diag(torch.rand(dk, generator=g, dtype=torch.float64) + 0.5)
        qs.append(b @ p)
        ks.append(b @ torch.linalg.inv(p).T @ dg)
        vs.append(b @ torch.randn(dk, dk, generator=g, dtype=torch.float64))
    blocks = [torch.cat([t.T for t in ts], 0) for ts in (qs, ks, vs)]  # (d, d) each: rows = head outputs
    with torch.no_grad():
        attn.qkv.weight.copy_(torch.cat(blocks, 0).float())
        if qkv_bias:
            bias = torch.randn(3 * dim, generator=g, dtype=torch.float64) * 0.1
            bias[:dim] = 0
            attn.qkv.bias.copy_(bias.float())
    return attn.eval()


def check_model(model: nn.Module, *, tol: float = 1e-6, n_random: int = 4, n_tokens: int = 17,
                seed: int = 0) -> List[Dict]:
    """Run :func:`check_conditions` on every attention layer of ``model`` and, for each layer, verify
    ``head(X + W) = head(X)`` on ``n_random`` random inputs of ``n_tokens`` tokens with ``W`` from the
    proof (when the conditions hold) or the least-violating admissible direction (reporting by how much
    the heads change), next to the same check along a random direction of the same size
    (``verify_random``). Returns one dict per layer (``layer`` = module name)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, attn in attention_layers(model):
        rep = check_conditions(attn, tol=tol)
        rep["layer"] = name
        method = "proof" if rep["holds"] else "admissible"
        w = construct_w(attn, n_tokens, method=method, tol=tol, generator=g)
        w = w / torch.linalg.norm(w).clamp_min(1e-300) * math.sqrt(n_tokens)
        rep["w_method"] = method
        x = torch.randn(n_random, n_tokens, rep["dim"], generator=g, dtype=torch.float64)
        rep["verify"] = verify_heads(attn, w, x=x)
        # baseline: the same token multiples along a random unit direction, on the same X
        r = torch.randn(rep["dim"], generator=g, dtype=torch.float64)
        u = w[int(w.norm(dim=1).argmax())]
        coeff = w @ (u / u.norm())  # the per-token multiples c of W = c w^T
        wr = coeff[:, None] * (r / r.norm())[None]
        rep["verify_random"] = verify_heads(attn, wr, x=x)
        out.append(rep)
    return out
