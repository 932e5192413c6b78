"""ComfyUI adapters. Node ids (the mapping keys) and input names are permanent API: never rename them."""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
