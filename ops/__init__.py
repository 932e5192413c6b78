"""What each node computes, as plain functions that import nothing of ComfyUI: one module per stage, the same
arguments as the node's inputs, the node's outputs as a tuple. nodes/ declares them as ComfyUI V3 nodes; the CLI,
the benchmarks and the tests call them directly. Device placement, ComfyUI model management (through host/) and
IMAGE/MASK layout live here; the math stays in pipelines/."""

STAGES = ("face", "restore", "tune", "color", "quality", "diffusion", "identity", "adapt")


def node_ops() -> dict:
    """Node id -> plain function (the node's inputs as keyword arguments, its outputs as a tuple), every stage:
    how the CLI's graph runs, gpu_check and the tests run a node without ComfyUI."""
    import importlib

    out: dict = {}
    for stage in STAGES:
        module = importlib.import_module(f"{__name__}.{stage}")
        out.update(getattr(module, "OPS", {}))
    return out
