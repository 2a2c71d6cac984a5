"""Nullspace of vision transformers: exact (patch embedding) and approximate (encoder-level) noise."""
