"""ComfyUI V3 nodes, one module per stage; each module's NODES lists its io.ComfyNode classes. Node ids, display
names, input names and order, types and defaults are permanent API (tests/node_schemas.json): never rename them;
new inputs are optional and appended. Importing this package needs ComfyUI's node API (nodes/api.py); what the
nodes compute is in ops/, which does not."""
from ..host.models import host_oom
from . import api
from . import adapt, color, diffusion, face, identity, quality, restore, tune

NODE_CLASSES: dict = {}  # node id -> class, in menu order
NODE_DISPLAY_NAMES: dict = {}
for _module in (face, restore, tune, color, quality, diffusion, identity, adapt):
    for _cls in _module.NODES:
        # Out of memory reaches ComfyUI as its own exception type, so it unloads models after it.
        _cls.execute = classmethod(host_oom(_cls.execute.__func__))
        _schema = _cls.GET_SCHEMA()
        NODE_CLASSES[_schema.node_id], NODE_DISPLAY_NAMES[_schema.node_id] = _cls, _schema.display_name


class FaceMendExtension(api.ComfyExtension):
    async def get_node_list(self) -> list:
        return list(NODE_CLASSES.values())


async def comfy_entrypoint() -> FaceMendExtension:
    return FaceMendExtension()
