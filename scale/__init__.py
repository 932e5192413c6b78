"""Beyond one machine: the presets as a Ray Data pipeline (ray_engine), faces of several photos batched per
forward (batching). Ray does the scheduling, retries and backpressure; nothing here imports Ray at import time."""
