"""Nullspace noise generators (seed 001 §3, seed 000 §3-5).

* :mod:`ns_plugin.nullspace.exact` -- the exact nullspace of the patch-embedding map (image-space noise).
* :mod:`ns_plugin.nullspace.approximate` -- the encoder-level ε-approximate nullspace noise (Eq. 6-8,
  Algorithm 1), its λ-regularised variant (Eq. 4), the input-level variant and quality metrics.
* :mod:`ns_plugin.nullspace.algebra` -- scaling / convex-combination behaviour of learnt noises (Fig. 5)
  and noise transfer between models.

Submodules are imported on first use; importing this package loads nothing heavy.
"""
