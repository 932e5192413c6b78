"""What each node computes, as plain functions that import nothing of ComfyUI: one module per stage, the same
arguments as the node's inputs, the node's outputs as a tuple. nodes/ declares them as ComfyUI V3 nodes; the CLI,
the benchmarks and the tests call them directly. Device placement, ComfyUI model management (through host/) and
IMAGE/MASK layout live here; the math stays in pipelines/."""
