"""Applications of nullspace noise (watermarking, targeted noise, saliency, fingerprinting)."""
