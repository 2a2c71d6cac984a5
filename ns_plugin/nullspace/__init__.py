"""Nullspace noise generators (arXiv:2403.10476 §3, OpenReview:d8VrVfNARSy §3-5).

* :mod:`ns_plugin.nullspace.exact` -- the exact nullspace of the patch-embedding map (image-space noise).
* :mod:`ns_plugin.nullspace.search` -- the encoder-level ε-approximate nullspace noise search (Eq. 6-8,
  Algorithm 1) and its input-level variant.
* :mod:`ns_plugin.nullspace.metrics` -- the MSE probability (Alg. 1 line 8) and noise quality.
* :mod:`ns_plugin.nullspace.regularized` -- the λ-regularised objective (Eq. 4) and the ``lim`` sweep.
* :mod:`ns_plugin.nullspace.algebra` -- scaling / convex-combination behaviour of learnt noises (Fig. 5)
  and noise transfer between models.

Submodules are imported on first use; importing this package loads nothing heavy.
"""
