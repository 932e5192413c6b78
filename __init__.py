"""FaceMend: real-world face restoration nodes for ComfyUI.

ComfyUI imports this folder as custom_nodes/<any name>/ and registers the nodes through `comfy_entrypoint` (V3 node
schema); tests and the CLI import it as `facemend`, which imports nothing of ComfyUI. Importing does no downloads,
loads no weights and touches no GPU.
"""
import logging
import sys

__version__ = "0.1.0"
WEB_DIRECTORY = None
MIN_COMFYUI = "0.3.64"  # the oldest ComfyUI tested; its versioned node API comfy_api.v0_0_2 first shipped in 0.3.48


def _hosted() -> bool:
    # ComfyUI has loaded its model management before it imports custom nodes; the CLI and the tests have not.
    return "comfy.model_management" in sys.modules


if __package__ and _hosted():
    from .host.model_paths import register_comfy_folders

    register_comfy_folders()
    try:
        import comfy_api.v0_0_2  # noqa: F401
    except ImportError:
        logging.error("FaceMend needs ComfyUI %s or newer (the versioned node API comfy_api.v0_0_2); this ComfyUI has "
                      "none, so FaceMend's nodes are not loaded. Update ComfyUI.", MIN_COMFYUI)
        # No nodes, but a pack ComfyUI loads without a second warning ("Skip ... lack of NODE_CLASS_MAPPINGS").
        NODE_CLASS_MAPPINGS: dict = {}
    else:
        # Registered through comfy_entrypoint alone: ComfyUI ignores it where NODE_CLASS_MAPPINGS exists.
        from .nodes import comfy_entrypoint  # noqa: F401
