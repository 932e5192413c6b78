"""ComfyUI adapters, one module per stage. Node ids (the mapping keys) and input names are permanent API: never
rename them; new inputs are optional and appended."""
from ..host.models import host_oom
from . import adapt, color, diffusion, face, identity, quality, restore, tune

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _module in (face, restore, tune, color, quality, diffusion, identity, adapt):
    for _id, (_cls, _name) in _module.NODES.items():
        NODE_CLASS_MAPPINGS[_id] = _cls
        # Out of memory reaches ComfyUI as its own exception type, so it unloads models after it.
        setattr(_cls, _cls.FUNCTION, host_oom(getattr(_cls, _cls.FUNCTION)))
        NODE_DISPLAY_NAME_MAPPINGS[_id] = _name
