"""Attention and encode ops on the packed cache: pure-MLX twins here, fused kernels per backend."""
