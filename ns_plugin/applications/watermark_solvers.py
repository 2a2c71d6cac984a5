"""The per-patch solvers of Eq. 7 ("Nullspace of Vision Transformers and what does it tell us?",
OpenReview:d8VrVfNARSy §6 and A.2): the paper's SLSQP reference, HiGHS, and the exact batched solvers (semismooth
Newton for p = 2, interior point for p = 1). The problem and the solvers are described in
:mod:`ns_plugin.applications.watermark`, which turns them into watermarked images.
"""
from __future__ import annotations

import math
import time
from typing import Dict, Optional

import numpy as np
import torch

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
