"""Adapting a restorer to a user's own photos: diffusion-prior pseudo targets and fine-tuning."""
