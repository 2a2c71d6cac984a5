"""Analyses from the seeds: Proposition 1's attention conditions (seed 001 §3.2, appendix B) and the
Jacobian / local null-space / embedding-matching study (seed 004 §3-4). Submodules load on first use."""
