"""Coarse face restoration: the batched restorer and its network architectures (archs/)."""
