"""Output-preserving watermarking with the exact patch-embedding nullspace (OpenReview:d8VrVfNARSy §6, Eq. 7 and A.2;
arXiv:2403.10476 appendix E).

For every patch ``j`` of an image ``x`` and the same patch of a watermark image ``w``, Eq. 7 of OpenReview:d8VrVfNARSy
chooses nullspace coefficients ``λ`` (``c`` below) by

    min_c || Δx_j - B^T c ||_p    subject to    0 <= x_j + B^T c <= 1,      Δx_j = w_j - x_j,

where the rows of ``B`` (``nullity x c·rh·rw``, orthonormal) span the nullspace of the patch embedding in
*pixel* space (:func:`ns_plugin.nullspace.exact.exact_nullspace` folds the model's normaliser into the map).
The watermarked patch is ``x_j + B^T c``: its patch embedding -- hence the network output -- equals the
original's, while it moves as close to the watermark as the nullspace and the [0, 1] box allow. The
objective is the plain (not squared) ``l_p`` norm of the remaining difference, as written in Eq. 7.

Two solvers of the *same* problem are provided:

* ``solver="slsqp"``: the paper's reference (A.2): ``scipy.optimize.minimize(method="SLSQP")`` on ``c``
  for each patch, ``maxiter=5000`` by default, started at ``c = 0`` (feasible). We give SLSQP the analytic
  gradient of the objective and the constraint Jacobians, which only makes the baseline faster than an
  "out of the box" call with finite differences.
* ``solver="exact"`` (default): the problem written on the watermarked patch ``u = x_j + B^T c`` is
  ``min ||u - w_j||_p`` over ``{u : A u = A x_j} ∩ [0, 1]^n`` (``A``: orthonormal basis of the row space of
  the patch map, the orthogonal complement of the nullspace).

  - ``p = 2`` is the Euclidean projection of ``w_j`` onto that polyhedron. We solve its Lagrange dual
    ``max_y θ(y)``, ``u(y) = clip(w_j + A^T y, 0, 1)``, ``∇θ = A x_j - A u(y)``, with a regularised
    semismooth Newton method and Armijo line search, batched over all patches of all images (one
    ``r x r`` linear solve per patch and iteration, ``r`` = rank of the patch map). It stops when the
    equality residual ``max |A u - A x_j|`` is below ``tol`` (default 1e-10); the dual value then certifies
    the optimum (the reported duality gap).
  - ``p = 1`` is a linear program, ``min 1^T(s⁺ + s⁻)`` s.t. ``u - s⁺ + s⁻ = w_j``, ``A u = A x_j``,
    ``0 <= u <= 1``, ``s^± >= 0``, solved exactly by HiGHS (``scipy.optimize.linprog``) on block-diagonal
    patch by patch.

  Both finish by mapping back to coefficients ``c = B (u - x_j)`` and forming ``x_j + B^T c``, so the
  perturbation lies in the nullspace to float64 round-off whatever the solver's tolerance; pixels are then
  checked against [0, 1] (violations of round-off size are clamped; a larger one -- only possible if a solver
  did not converge -- is removed by shrinking ``c`` towards 0, which keeps the patch exactly in the nullspace).

``benchmarks/watermark_speed.py`` runs both solvers on the same patches and prints the time ratio and the
objectives.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..errors import NSPluginError

#: Solvers accepted by :func:`solve_patches` and :func:`watermark_images`.
SOLVERS = ("exact", "highs", "slsqp")


# ---------------------------------------------------------------------------------------------------------
# per-patch solvers
# ---------------------------------------------------------------------------------------------------------
def _objective(u: np.ndarray, w: np.ndarray, p: int) -> np.ndarray:
    r = u - w
    return np.abs(r).sum(-1) if p == 1 else np.sqrt((r * r).sum(-1))


def row_space(basis: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning the orthogonal complement of ``basis`` (the row space of the patch map)."""
    b = basis.to(torch.float64)
    n = b.shape[1]
    if b.shape[0] == 0:
        return torch.eye(n, dtype=torch.float64)
    _, _, vh = torch.linalg.svd(b, full_matrices=True)
    return vh[b.shape[0]:].contiguous()


def _slsqp_one(xp: np.ndarray, wp: np.ndarray, B: np.ndarray, p: int, maxiter: int, ftol: float):
    from scipy.optimize import minimize

    Bt = B.T

    def fun(c):
        r = xp + Bt @ c - wp
        return float(np.abs(r).sum()) if p == 1 else float(np.sqrt(r @ r))

    def jac(c):
        r = xp + Bt @ c - wp
        if p == 1:
            return B @ np.sign(r)
        nr = math.sqrt(float(r @ r))
        return B @ r / nr if nr > 0 else np.zeros(B.shape[0])

    cons = [{"type": "ineq", "fun": lambda c: xp + Bt @ c, "jac": lambda c: Bt},
            {"type": "ineq", "fun": lambda c: 1.0 - xp - Bt @ c, "jac": lambda c: -Bt}]
    res = minimize(fun, np.zeros(B.shape[0]), jac=jac, method="SLSQP", constraints=cons,
                   options={"maxiter": int(maxiter), "ftol": float(ftol)})
    return res.x, int(res.nit), bool(res.success), str(res.message)


def _exact_p2(X: torch.Tensor, Wm: torch.Tensor, A: torch.Tensor, tol: float, max_iter: int):
    """Batched projection of rows of ``Wm`` onto ``{u: A u = A x} ∩ [0,1]^n`` (semismooth Newton on the dual).

    Returns ``(u, y, dual_values, iterations, residuals)``; ``residuals`` is ``max |A u - A x|`` per patch."""
    K, n = X.shape
    r = A.shape[0]
    b = X @ A.T                                   # (K, r) right-hand sides
    y = torch.zeros(K, r, dtype=torch.float64)
    eye = torch.eye(r, dtype=torch.float64)

    z, u, theta = _dual_rows(y, Wm, A, b)
    it = 0
    g = b - u @ A.T
    res = g.abs().amax(1)
    active = res > tol
    while bool(active.any()) and it < max_iter:
        it += 1
        idx = active.nonzero().squeeze(1)
        za, ga, ya, tha = z[idx], g[idx], y[idx], theta[idx]
        free = ((za > 0) & (za < 1)).to(torch.float64)          # generalized Jacobian of clip
        Af = A.unsqueeze(0) * free.unsqueeze(1)                   # (k, r, n)
        H = Af @ A.T
        gnorm = ga.norm(dim=1)
        mu = torch.clamp(gnorm, max=1e-2).clamp_min(1e-14)       # Levenberg-type regularisation
        step = torch.linalg.solve(H + mu[:, None, None] * eye, ga.unsqueeze(2)).squeeze(2)
        slope = (ga * step).sum(1)                                 # > 0: ascent direction
        t = torch.ones(len(idx), dtype=torch.float64)
        done = torch.zeros(len(idx), dtype=torch.bool)
        new_y, new_th = ya.clone(), tha.clone()
        for _ in range(40):                                        # Armijo backtracking, vectorised
            cand = ya + t[:, None] * step
            _, _, th = _dual_rows(cand, Wm[idx], A, b[idx])
            ok = (th >= tha + 1e-4 * t * slope - 1e-15 * (1 + tha.abs())) & ~done
            new_y[ok], new_th[ok] = cand[ok], th[ok]
            done |= ok
            if bool(done.all()):
                break
            t = torch.where(done, t, t * 0.5)
        # problems whose line search failed keep y (cannot improve at float precision): stop them
        y[idx] = new_y
        zz = Wm[idx] + new_y @ A
        uu = zz.clamp(0.0, 1.0)
        z[idx], u[idx], theta[idx] = zz, uu, new_th
        g[idx] = b[idx] - uu @ A.T
        res = g.abs().amax(1)
        stalled = torch.zeros(K, dtype=torch.bool)
        stalled[idx[~done]] = True
        active = (res > tol) & ~stalled
    return u, y, theta, it, res


def _dual_rows(y: torch.Tensor, Wm: torch.Tensor, A: torch.Tensor, b: torch.Tensor):
    """Dual value ``θ(y)`` of the p = 2 projection, with ``z = w + A^T y`` and ``u = clip(z, 0, 1)``."""
    z = Wm + y @ A
    u = z.clamp(0.0, 1.0)
    theta = 0.5 * ((u - Wm) ** 2).sum(1) - ((u @ A.T - b) * y).sum(1)
    return z, u, theta


def _exact_p1(X: np.ndarray, Wm: np.ndarray, A: np.ndarray, progress: bool):
    """One LP per patch, solved by HiGHS. Returns ``(u, status_ok)``.

    With ``w`` in [0, 1] the LP is written on ``u = w + s⁺ - s⁻`` alone: ``min 1^T(s⁺ + s⁻)`` s.t.
    ``A s⁺ - A s⁻ = A (x - w)``, ``0 <= s⁺ <= 1 - w``, ``0 <= s⁻ <= w``. Those bounds are equivalent to
    ``0 <= u <= 1`` at an optimum (where ``s⁺_i s⁻_i = 0``), so the LP has only ``r`` equality rows."""
    from scipy.optimize import linprog
    from tqdm.auto import tqdm

    K, n = X.shape
    U = X.copy()
    ok = np.ones(K, dtype=bool)
    Aeq = np.hstack([A, -A])
    cost = np.ones(2 * n)
    for k in tqdm(range(K), desc="watermark LP (HiGHS)", disable=not progress):
        w = Wm[k]
        bounds = np.concatenate([np.stack([np.zeros(n), 1.0 - w], 1), np.stack([np.zeros(n), w], 1)])
        res = linprog(cost, A_eq=Aeq, b_eq=A @ (X[k] - w), bounds=bounds, method="highs",
                      options={"primal_feasibility_tolerance": 1e-9, "dual_feasibility_tolerance": 1e-9})
        if res.status != 0 or res.x is None:
            ok[k] = False
            continue
        U[k] = w + res.x[:n] - res.x[n:]
    return U, ok


def _ipm_p1(X: torch.Tensor, Wm: torch.Tensor, A: torch.Tensor, tol: float = 1e-9, max_iter: int = 100):
    """Batched Mehrotra predictor-corrector interior-point method for the p = 1 LP of every patch.

    LP per patch (``z = [s⁺; s⁻]``, ``Ā = [A, -A]``): ``min 1^T z`` s.t. ``Ā z = A (x - w)``,
    ``0 <= z <= [1 - w; w]``. Variables whose upper bound is 0 (watermark pixels at 0 or 1) are fixed at 0.
    Each iteration solves one ``r x r`` system ``A (Θ⁺ + Θ⁻) A^T`` per patch. Stops when the relative primal and
    dual residuals and the duality gap are all below ``tol``. Returns ``(u, iterations, max_gap, converged)``."""
    K, n = X.shape
    dt = torch.float64
    b = (X - Wm) @ A.T                                          # (K, r)
    ub = torch.cat([1.0 - Wm, Wm], 1)                           # (K, 2n)
    free = (ub > 1e-12).to(dt)
    ubs = torch.where(free > 0, ub, torch.ones_like(ub))      # dummy bound 1 for fixed variables
    z = 0.5 * ubs
    t = ubs - z
    s = torch.full_like(z, 1.5)
    q = torch.full_like(z, 0.5)
    y = torch.zeros(K, A.shape[0], dtype=dt)
    c = free                                                    # cost 1 on free variables
    nfree = free.sum(1).clamp_min(1)
    eye = torch.eye(A.shape[0], dtype=dt)
    done = torch.zeros(K, dtype=torch.bool)
    bnorm = 1 + b.norm(dim=1)

    def Abar(v):                                                # (K, 2n) -> (K, r)
        return (v[:, :n] - v[:, n:]) @ A.T

    def AbarT(v):                                               # (K, r) -> (K, 2n)
        g = v @ A
        return torch.cat([g, -g], 1)

    def max_step(v, dv):
        neg = dv < 0
        ratio = torch.where(neg & (free > 0), -v / torch.where(neg, dv, -torch.ones_like(dv)),
                            torch.full_like(v, float("inf")))
        return ratio.amin(1).clamp(max=1.0)

    it, gap_max = 0, float("inf")
    for it in range(1, max_iter + 1):
        rp = b - Abar(z * free)
        ru = (ubs - z - t) * free
        rd = (c - AbarT(y) - s + q) * free
        mu = ((z * s + t * q) * free).sum(1) / (2 * nfree)
        obj_p = (c * z).sum(1)
        gap = (2 * nfree * mu) / (1 + obj_p.abs())
        conv = (rp.norm(dim=1) / bnorm < tol) & (ru.abs().amax(1) < tol) & (rd.abs().amax(1) < tol) & (gap < tol)
        done = done | conv
        if bool(done.all()):
            break
        theta = free / (s / z + q / t)
        M = (A.unsqueeze(0) * (theta[:, :n] + theta[:, n:]).unsqueeze(1)) @ A.T + 1e-14 * eye
        L, info = torch.linalg.cholesky_ex(M)

        def solve(r_zs, r_tq):
            rho = rd - r_zs / z + (r_tq - q * ru) / t
            rhs = rp + Abar(theta * rho)
            dy = torch.cholesky_solve(rhs.unsqueeze(2), L).squeeze(2)
            dz = theta * (AbarT(dy) - rho)
            dt_ = (ru - dz) * free
            ds = (r_zs - s * dz) / z * free
            dq = (r_tq - q * dt_) / t * free
            return dz, dt_, dy, ds, dq

        dz, dt_, dy, ds, dq = solve(-z * s, -t * q)             # affine scaling (predictor)
        ap = torch.minimum(max_step(z, dz), max_step(t, dt_))
        ad = torch.minimum(max_step(s, ds), max_step(q, dq))
        mu_aff = (((z + ap[:, None] * dz) * (s + ad[:, None] * ds) + (t + ap[:, None] * dt_) * (q + ad[:, None] * dq))
                  * free).sum(1) / (2 * nfree)
        sigma = (mu_aff / mu.clamp_min(1e-300)).clamp(0, 1) ** 3
        sm = (sigma * mu)[:, None]
        dz, dt_, dy, ds, dq = solve(sm - z * s - dz * ds, sm - t * q - dt_ * dq)   # corrector
        ap = (0.995 * torch.minimum(max_step(z, dz), max_step(t, dt_))).clamp(max=1.0)
        ad = (0.995 * torch.minimum(max_step(s, ds), max_step(q, dq))).clamp(max=1.0)
        ap = torch.where(done, torch.zeros_like(ap), ap)[:, None]
        ad = torch.where(done, torch.zeros_like(ad), ad)[:, None]
        z, t = z + ap * dz, t + ap * dt_
        y, s, q = y + ad * dy, s + ad * ds, q + ad * dq
        gap_max = float(gap.max())
    zf = (z * free).clamp(min=0)
    zf = torch.minimum(zf, ub.clamp_min(0))
    u = Wm + zf[:, :n] - zf[:, n:]
    return u, it, gap_max, done


class _threads:
    """Temporarily limit torch's intra-op threads (small batched ops are much faster single-threaded,
    especially on a loaded machine); restores the previous setting."""

    def __init__(self, n: Optional[int]):
        self.n, self.old = n, None

    def __enter__(self):
        if self.n:
            self.old = torch.get_num_threads()
            torch.set_num_threads(int(self.n))

    def __exit__(self, *exc):
        if self.old is not None:
            torch.set_num_threads(self.old)


def _finish(X: torch.Tensor, U: torch.Tensor, B: torch.Tensor, Wm: torch.Tensor, p: int):
    """Map solutions back to coefficients, make the nullspace and box constraints exact, evaluate."""
    from ..nullspace.exact import box_scale
    C = (U - X) @ B.T                          # (K, m) coefficients
    V = C @ B                                  # nullspace perturbation
    out = X + V
    lo, hi = out.amin(1), out.amax(1)
    bad = (lo < -1e-7) | (hi > 1 + 1e-7)      # larger than round-off or a solver tolerance
    if bool(bad.any()):                        # shrink towards x: stays in the nullspace and the box
        Xb, Vb = X[bad], V[bad]
        s = box_scale(Xb, Vb, tiny=1e-300).clamp(max=1)
        C[bad] = C[bad] * s[:, None]
        V[bad] = C[bad] @ B
        out[bad] = Xb + V[bad]
    out = out.clamp(0.0, 1.0)
    obj = torch.as_tensor(_objective(out.numpy(), Wm.numpy(), p))
    return out, C, obj, int(bad.sum())


def solve_patches(x_patches: torch.Tensor, w_patches: torch.Tensor, basis: torch.Tensor, *, p: int = 1,
                  solver: str = "exact", maxiter: int = 5000, ftol: float = 1e-6, tol: float = 1e-10,
                  num_threads: Optional[int] = 1, progress: bool = False) -> Dict[str, object]:
    """Solve Eq. 7 of OpenReview:d8VrVfNARSy for a batch of patches.

    Args:
        x_patches: ``(K, n)`` source patches in [0, 1] (``n = c·rh·rw``).
        w_patches: ``(K, n)`` watermark patches in [0, 1].
        basis: ``(m, n)`` orthonormal nullspace basis of the patch map (``PatchNullspace.basis``).
        p: 1 or 2, the norm of Eq. 7.
        solver: ``"exact"`` (batched semismooth Newton for p = 2, batched interior-point LP for p = 1),
            ``"highs"`` (p = 1 only: HiGHS simplex per patch, a vertex solution; slower) or ``"slsqp"`` (the
            paper's SciPy SLSQP, one call per patch).
        maxiter, ftol: SLSQP options (paper: 5000 iterations; SciPy's default ``ftol`` 1e-6).
        tol: stopping tolerance of the p = 2 Newton solver on ``max |A u - A x|`` (default 1e-10); the p = 1
            interior-point method stops at relative residuals and duality gap ``10·tol``.
        num_threads: torch threads while solving (default 1; ``None`` keeps the current setting).

    Returns:
        dict with ``patches`` (``(K, n)`` watermarked patches, float64), ``coefficients`` (``(K, m)``),
        ``objective`` (``(K,)`` the Eq. 7 value ``||u - w||_p`` of each returned patch), ``seconds``,
        ``nullspace_residual`` (max ``|A (u - x)|``: 0 up to round-off), ``box_violation`` (max distance
        outside [0, 1], 0 after the final clamp), ``shrunk`` (patches whose solution had to be shrunk; 0 when
        the solver converged) and solver details (``iterations``, ``not_converged``, ``duality_gap`` for
        p = 2, ``relative_gap`` for p = 1; for SLSQP ``raw_patches``/``raw_objective``/``raw_box_violation`` of
        its own iterates before the fix-up).
    """
    if p not in (1, 2):
        raise NSPluginError(f"p must be 1 or 2 (the norm of Eq. 7), got {p!r}")
    if solver not in SOLVERS:
        raise NSPluginError(f"unknown watermark solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if solver == "highs" and p != 1:
        raise NSPluginError("solver 'highs' solves the p = 1 linear program only; use solver='exact' for p = 2")
    X = torch.as_tensor(x_patches).detach().to("cpu", torch.float64)
    Wm = torch.as_tensor(w_patches).detach().to("cpu", torch.float64)
    B = torch.as_tensor(basis).detach().to("cpu", torch.float64)
    if X.dim() != 2 or X.shape != Wm.shape or B.dim() != 2 or B.shape[1] != X.shape[1]:
        raise NSPluginError(f"patch shapes do not match: x {tuple(X.shape)}, watermark {tuple(Wm.shape)}, "
                            f"basis {tuple(B.shape)}; expected (K, n), (K, n), (m, n)")
    if B.shape[0] == 0:
        raise NSPluginError("the patch embedding has no exact nullspace (nullity 0): nothing can be watermarked "
                            "without changing the output; use a model whose patch dimension c·r² exceeds its "
                            "embedding dimension")
    if not (torch.isfinite(X).all() and torch.isfinite(Wm).all()):
        raise NSPluginError("image or watermark patches contain NaN or inf")
    if X.numel() and (float(X.min()) < 0 or float(X.max()) > 1):
        raise NSPluginError("source patches must lie in [0, 1] (the box of Eq. 7 must contain the source image)")
    if Wm.numel() and (float(Wm.min()) < 0 or float(Wm.max()) > 1):
        raise NSPluginError(f"watermark values must lie in [0, 1], got [{float(Wm.min()):.3g}, {float(Wm.max()):.3g}]; "
                            f"pass an image in [0, 1]")
    info: Dict[str, object] = {"solver": solver, "p": p, "n_problems": int(X.shape[0])}
    A = row_space(B)
    with _threads(num_threads):
        return _solve(X, Wm, B, A, p, solver, maxiter, ftol, tol, progress, info)


def _solve(X, Wm, B, A, p, solver, maxiter, ftol, tol, progress, info):
    t0 = time.perf_counter()
    if solver == "slsqp":
        from tqdm.auto import tqdm
        Bn = B.numpy()
        U = torch.empty_like(X)
        nits, fails = [], 0
        for k in tqdm(range(X.shape[0]), desc=f"watermark SLSQP p={p}", disable=not progress):
            c, nit, success, _ = _slsqp_one(X[k].numpy(), Wm[k].numpy(), Bn, p, maxiter, ftol)
            U[k] = X[k] + torch.from_numpy(Bn.T @ c)
            nits.append(nit)
            fails += not success
        # SLSQP's own iterate (before our exactness fix-up), to report its constraint violation honestly
        raw_obj = torch.as_tensor(_objective(U.numpy(), Wm.numpy(), p))
        info.update(raw_patches=U.clone(), iterations=int(np.max(nits)) if nits else 0,
                    mean_iterations=float(np.mean(nits)) if nits else 0.,
                    not_converged=fails, raw_objective=raw_obj,
                    raw_box_violation=float(torch.maximum(-U.min(), U.max() - 1).clamp_min(0)))
    elif p == 2:
        U, y, theta, it, res = _exact_p2(X, Wm, A, tol, max_iter=200)
        info.update(iterations=it, dual_value=theta,
                    not_converged=int((res > max(tol, 1e-8)).sum()))
    elif solver == "highs":
        Un, ok = _exact_p1(X.numpy(), Wm.numpy(), A.numpy(), progress)
        U = torch.from_numpy(Un)
        info.update(not_converged=int((~ok).sum()))
    else:
        U, it, gap, done = _ipm_p1(X, Wm, A, tol=min(max(tol, 1e-12), 1e-6) * 10, max_iter=100)
        info.update(iterations=it, relative_gap=gap, not_converged=int((~done).sum()))
    out, C, obj, shrunk = _finish(X, U, B, Wm, p)
    info["seconds"] = time.perf_counter() - t0
    if solver == "exact" and p == 2:
        # duality gap of 1/2||u-w||^2: primal minus dual (>= 0 up to round-off)
        info["duality_gap"] = float((0.5 * obj ** 2 - info.pop("dual_value")).abs().max())
    info.update(patches=out, coefficients=C, objective=obj, shrunk=shrunk,
                nullspace_residual=float(((out - X) @ A.T).abs().max()),
                box_violation=float(torch.maximum(-out.min(), out.max() - 1).clamp_min(0)))
    return info


# ---------------------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------------------
@dataclass
class WatermarkResult:
    """Output of :func:`watermark_images`.

    ``images``: watermarked images ``(N, C, H, W)`` float32 in [0, 1]; ``noise``: ``images - originals``
    (float64, in the nullspace patch by patch); ``coefficients``: ``(N, P, nullity)``; ``objective``:
    ``(N, P)`` Eq. 7 values; ``info``: solver details (seconds, residuals, iterations).
    """
    images: torch.Tensor
    noise: torch.Tensor
    coefficients: torch.Tensor
    objective: torch.Tensor
    p: int
    solver: str
    info: Dict[str, object] = field(default_factory=dict)


def _nullspace_of(model_or_ns):
    from ..nullspace.exact import PatchNullspace, exact_nullspace
    if isinstance(model_or_ns, PatchNullspace):
        return model_or_ns
    if not isinstance(model_or_ns, nn.Module):
        raise NSPluginError(f"expected a model or a PatchNullspace, got {type(model_or_ns).__name__}")
    return exact_nullspace(model_or_ns)


def watermark_images(model, images: torch.Tensor, watermark: torch.Tensor, *, p: int = 1, solver: str = "exact",
                     maxiter: int = 5000, tol: float = 1e-10, progress: bool = False) -> WatermarkResult:
    """Watermark a batch of images with Eq. 7 of OpenReview:d8VrVfNARSy (§6, A.2), keeping the patch embedding unchanged.

    Args:
        model: the classifier (``Sequential(Normalize, ViT)``; any model with a non-overlapping patch
            projection) or a precomputed :class:`~ns_plugin.nullspace.exact.PatchNullspace` (pixel space).
        images: ``(N, C, H, W)`` in [0, 1], the size the model expects.
        watermark: ``(C, H, W)``, ``(1, C, H, W)`` (one watermark for all) or ``(N, C, H, W)``, same size as
            the images (use :func:`load_watermark` / :func:`fit_watermark` to resize a file).
        p: the norm of Eq. 7 (the paper prefers p = 1, the default here too).
        solver: ``"exact"`` (default) or ``"slsqp"`` (the paper's reference, slow).

    Returns:
        :class:`WatermarkResult`.
    """
    from ..models import check_images

    ns = _nullspace_of(model)
    if ns.nullity == 0:
        raise NSPluginError("the model's patch embedding has no exact nullspace (nullity 0): nothing can be "
                            "watermarked without changing the output")
    check_images(images, model if isinstance(model, nn.Module) else None, what="images")
    wm = watermark.unsqueeze(0) if isinstance(watermark, torch.Tensor) and watermark.dim() == 3 else watermark
    if not isinstance(wm, torch.Tensor) or wm.dim() != 4:
        raise NSPluginError("watermark must be a (C, H, W) or (N, C, H, W) tensor")
    if tuple(wm.shape[1:]) != tuple(images.shape[1:]) or wm.shape[0] not in (1, images.shape[0]):
        raise NSPluginError(f"watermark has shape {tuple(wm.shape)} but the images are {tuple(images.shape)}; "
                            f"resize it with ns_plugin.applications.watermark.fit_watermark (the CLI resizes)")
    if not torch.isfinite(wm).all():
        raise NSPluginError("watermark contains NaN or inf values")
    wm = wm.expand_as(images)
    size = tuple(images.shape[-2:])
    X = ns.to_patches(images.detach().cpu().to(torch.float64))
    Wp = ns.to_patches(wm.detach().cpu().to(torch.float64))
    n, P, d = X.shape
    sol = solve_patches(X.reshape(-1, d), Wp.reshape(-1, d), ns.basis, p=p, solver=solver, maxiter=maxiter,
                        tol=tol, progress=progress)
    out = ns.from_patches(sol.pop("patches").reshape(n, P, d), size)
    coeffs = sol.pop("coefficients").reshape(n, P, -1)
    obj = sol.pop("objective").reshape(n, P)
    sol.pop("raw_objective", None)
    sol.pop("raw_patches", None)
    noise = out - images.detach().cpu().to(torch.float64)
    sol["embedding_residual"] = ns.embedding_residual(noise)
    return WatermarkResult(images=out.to(images.dtype).to(images.device), noise=noise, coefficients=coeffs,
                           objective=obj, p=p, solver=solver, info=sol)


# ---------------------------------------------------------------------------------------------------------
# evaluation (A.2) and the figure (Fig. 4 of OpenReview:d8VrVfNARSy / Fig. 6 of arXiv:2403.10476)
# ---------------------------------------------------------------------------------------------------------
def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [0, 1] (peak 1)."""
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-20))


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round to 8-bit levels, as saving to PNG does."""
    return (x.double() * 255).round() / 255


@torch.no_grad()
def evaluate_watermark(model: nn.Module, images: torch.Tensor, watermarked: torch.Tensor,
                       watermark: torch.Tensor) -> Dict[str, float]:
    """The A.2 figures of OpenReview:d8VrVfNARSy on a batch: prediction match (% of watermarked images given the source
    image's class), mean |Δ p(source class)| (in %), PSNR of the watermarked images against the watermark and
    against the originals; the same after 8-bit quantisation (saving as PNG), which leaves the nullspace; and
    the model's float32 behaviour (the float64 numbers show the exact invariance)."""
    model = model.eval()
    dev = next(model.parameters()).device
    wm = watermark.unsqueeze(0) if watermark.dim() == 3 else watermark
    wm = wm.expand_as(images)

    def probs(m, x, dtype):
        return m(x.to(dev, dtype)).softmax(1).double().cpu()

    out: Dict[str, float] = {"n_images": int(len(images))}
    import copy
    m64 = copy.deepcopy(model).double()
    for tag, m, dtype in (("", model, torch.float32), ("_float64", m64, torch.float64)):
        p0 = probs(m, images, dtype)
        src = p0.argmax(1)
        for suffix, xw in (("", watermarked), ("_uint8", quantize(watermarked))):
            if tag and suffix:
                continue
            p1 = probs(m, xw, dtype)
            key = tag + suffix
            out["pred_match" + key] = 100.0 * float((p1.argmax(1) == src).double().mean())
            out["mean_abs_dprob" + key] = 100.0 * float((p1.gather(1, src[:, None]) - p0.gather(1, src[:, None]))
                                                        .abs().mean())
            out["max_abs_dprob" + key] = 100.0 * float((p1 - p0).abs().max())
    out["psnr_vs_watermark"] = float(psnr(watermarked, wm).mean())
    out["psnr_original_vs_watermark"] = float(psnr(images, wm).mean())
    out["psnr_vs_original"] = float(psnr(watermarked, images).mean())
    return out


def _atomic_savefig(fig, out: Path, dpi: int = 110) -> None:
    from ..io import atomic_savefig
    atomic_savefig(fig, out, dpi=dpi)


def watermark_figure(out: Union[str, Path], watermark: torch.Tensor, images: torch.Tensor,
                     watermarked: torch.Tensor, *, titles: Optional[Sequence[str]] = None,
                     max_rows: int = 4) -> Path:
    """Fig. 4 of OpenReview:d8VrVfNARSy / Fig. 6 of arXiv:2403.10476: (a) watermark, (b) originals, (c) watermarked, (d) |noise|
    (normalised per image). Written atomically (PNG/PDF from the suffix)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    k = min(len(images), max_rows)
    wm = watermark.unsqueeze(0) if watermark.dim() == 3 else watermark
    show = lambda t: t.detach().double().cpu().permute(1, 2, 0).clamp(0, 1).numpy().squeeze()  # noqa: E731
    fig, axes = plt.subplots(k, 4, figsize=(8, 2.2 * k), squeeze=False)
    for i in range(k):
        noise = (watermarked[i].double() - images[i].double()).abs().cpu()
        noise = noise / noise.max().clamp_min(1e-12)
        panels = [(wm[min(i, len(wm) - 1)], "(a) watermark"), (images[i], "(b) original"),
                  (watermarked[i], "(c) watermarked"), (noise, "(d) |noise| (scaled)")]
        for j, (im, name) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(show(im), cmap="gray" if im.shape[0] == 1 else None, vmin=0, vmax=1)
            ax.set_title(name if not titles or j != 2 else f"{name}\n{titles[i]}", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    try:
        _atomic_savefig(fig, out)
    finally:
        plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------------------
# watermark images: files and built-in ones
# ---------------------------------------------------------------------------------------------------------
def fit_watermark(wm: torch.Tensor, channels: int, size: Tuple[int, int]) -> torch.Tensor:
    """Bring a watermark ``(C, H, W)`` in [0, 1] to ``channels`` x ``size``: grey is repeated over the
    channels, RGB is averaged to grey for 1-channel models, and other sizes are **resized** (bilinear with
    antialiasing; the aspect ratio is not kept)."""
    import torch.nn.functional as F
    if wm.dim() != 3:
        raise NSPluginError(f"watermark must be a (C, H, W) image, got shape {tuple(wm.shape)}")
    if wm.shape[0] != channels:
        if wm.shape[0] == 1:
            wm = wm.expand(channels, -1, -1)
        elif channels == 1:
            wm = wm.mean(0, keepdim=True)
        else:
            raise NSPluginError(f"watermark has {wm.shape[0]} channels but the model takes {channels}")
    if tuple(wm.shape[-2:]) != tuple(size):
        wm = F.interpolate(wm[None].float(), size=tuple(size), mode="bilinear", align_corners=False,
                           antialias=True)[0].clamp(0, 1)
    return wm.contiguous()


def read_image(path: Union[str, Path], what: str = "image") -> torch.Tensor:
    """Read an image file as ``(C, H, W)`` float in [0, 1] (grey stays 1 channel; alpha is composited on
    white)."""
    from PIL import Image, UnidentifiedImageError
    path = Path(path)
    if not path.is_file():
        raise NSPluginError(f"{what} file {str(path)!r} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "P", "PA"):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im).convert("RGB")
            elif im.mode not in ("L", "RGB"):
                im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise NSPluginError(f"cannot read {what} {str(path)!r} as an image: {e}") from None
    t = torch.from_numpy(arr.copy())
    return t[None] if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def write_image(path: Union[str, Path], x: torch.Tensor) -> Path:
    """Write ``(C, H, W)`` in [0, 1] as an 8-bit image (format from the suffix), atomically.

    Note: 8-bit rounding moves each pixel by up to 1/510, which leaves the nullspace; keep the float tensor
    (``--save-tensor``) when exact output preservation matters."""
    from PIL import Image
    path = Path(path)
    arr = (x.detach().double().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr[0].numpy() if arr.shape[0] == 1 else arr.permute(1, 2, 0).numpy()
    from ..io import atomic_write
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    try:
        return atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format=fmt),
                            suffix=path.suffix or ".png")
    except (ValueError, OSError) as e:
        raise NSPluginError(f"cannot write image {str(path)!r}: {e}") from None


def text_watermark(text: str = "NS", size: Tuple[int, int] = (32, 32), channels: int = 3) -> torch.Tensor:
    """A built-in watermark: black ``text`` on white, rendered with PIL's default font, ``(C, H, W)``."""
    from PIL import Image, ImageDraw, ImageFont
    h, w = size
    big = Image.new("L", (8 * w, 8 * h), 255)
    draw = ImageDraw.Draw(big)
    try:
        font = ImageFont.load_default(size=int(5 * h / max(1, len(text.splitlines()))))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    box = draw.multiline_textbbox((0, 0), text, font=font, align="center")
    tw, th = box[2] - box[0], box[3] - box[1]
    draw.multiline_text(((8 * w - tw) / 2 - box[0], (8 * h - th) / 2 - box[1]), text, fill=0, font=font,
                        align="center")
    small = big.resize((w, h), Image.LANCZOS)
    t = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)[None]
    return t.expand(channels, h, w).contiguous()
