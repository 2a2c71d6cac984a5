"""Analyses from the papers: Proposition 1's attention conditions (arXiv:2403.10476 §3.2, appendix B) and the
Jacobian / local null-space / embedding-matching study (arXiv:2401.15568 §3-4). Submodules load on first use."""
