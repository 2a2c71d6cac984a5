"""Applications of the nullspace: output-preserving watermarking and model fingerprinting (seed 000 §6, §9)."""
