"""Adapting a restorer to a user's own photos (diffusion-prior pseudo targets, fine-tuning)."""
