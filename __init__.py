"""FaceMend: real-world face restoration nodes for ComfyUI.

ComfyUI imports this folder as custom_nodes/<any name>/; tests and the CLI import it as `facemend`.
Importing does no downloads, loads no weights and touches no GPU.
"""
__version__ = "0.1.0"
WEB_DIRECTORY = None
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

if __package__:
    from .host.model_paths import register_comfy_folders
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    register_comfy_folders()
else:
    # Loaded as a plain file, not as a package: pytest does this to the checkout folder when collecting the
    # tests under a folder name that is not an identifier (e.g. `facemend-ci`). There is nothing to register.
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
