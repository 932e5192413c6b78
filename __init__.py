"""FaceMend: real-world face restoration nodes for ComfyUI.

ComfyUI imports this folder as custom_nodes/<any name>/; tests and the CLI import it as `facemend`.
Importing does no downloads, loads no weights and touches no GPU.
"""
from .host.model_paths import register_comfy_folders
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

register_comfy_folders()

WEB_DIRECTORY = None
__version__ = "0.1.0"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
