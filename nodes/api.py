"""The one module that imports ComfyUI's node API. FaceMend's nodes are V3 nodes (io.ComfyNode) on the versioned
API `comfy_api.v0_0_2`: the newest numbered version in ComfyUI 0.3.64, the host the tests run. It first shipped
with ComfyUI 0.3.48; MIN_COMFYUI is the oldest version we test. Node modules import io/ui from here, so moving to
a newer numbered version is a change of this file only. Nothing here computes: that is ops/ (plain functions)."""
from __future__ import annotations

from comfy_api.v0_0_2 import ComfyAPI, ComfyAPISync, ComfyExtension, io, ui  # noqa: F401  (re-exported)

from ..host import device as dev
from ..ops.common import content_stamp as file_fingerprint  # noqa: F401  (re-exported: loaders' fingerprints)

API_VERSION = "v0_0_2"
MIN_COMFYUI = "0.3.64"
CATEGORY = "FaceMend"

# FaceMend's own types between nodes (public API: saved workflows connect by these names).
FaceDetector = io.Custom("FACE_DETECTOR")
FaceRestorer = io.Custom("FACE_RESTORER")
FaceAlignment = io.Custom("FACE_ALIGNMENT")
FaceID = io.Custom("FACE_ID")
IQAMetric = io.Custom("IQA_METRIC")
OneStepSR = io.Custom("ONESTEP_SR")
RestorerID = io.Custom("RESTORER_ID")
DiffusionPrior = io.Custom("DIFFUSION_PRIOR")


# Previews shown per run at most (the first ones): each is a PNG written on every run, 0.1-0.4 s apiece on a CPU,
# so a batch of hundreds of frames or faces would spend its time on pictures nobody looks through.
PREVIEW_MAX = 16


def preview(images, cls=None, max_side: int = 512):
    """IMAGE [B,H,W,3] -> a node preview (ComfyUI's temp folder) of the first PREVIEW_MAX images, downscaled so a
    batch of big photos stays cheap. None for an empty batch (no face found): nothing to show."""
    if images is None or images.shape[0] == 0:
        return None
    images = images[:PREVIEW_MAX]
    small = [dev.preview_image(images[i:i + 1], max_side) for i in range(images.shape[0])]
    import torch

    same = all(s.shape == small[0].shape for s in small)
    batch = torch.cat(small) if same else small[0]
    return ui.PreviewImage(batch, cls=cls)


_execution = None


def _sync_execution():
    """ComfyAPISync().execution; ComfyUI 0.3.64 builds none (its API module's annotations are strings, which its sync
    wrapper skips), so the Execution singleton is wrapped the way that wrapper would."""
    global _execution
    if _execution is None:
        api = ComfyAPISync()
        if hasattr(api, "execution"):
            _execution = api.execution
        else:
            from comfy_api.internal.async_to_sync import create_sync_class

            _execution = object.__new__(create_sync_class(ComfyAPI.Execution))
            _execution._async_instance = ComfyAPI.Execution.get_instance()
    return _execution


def _report_progress(value: int, total: int, image) -> None:
    # The execution API: the node's progress bar and, with an image, its live preview. Outside a running prompt (a
    # node function called in-process by a script or a test) there is no node to show it on.
    from comfy_execution.utils import get_executing_context

    if get_executing_context() is None:
        return
    _sync_execution().set_progress(value, total, preview_image=image)


dev.set_progress_reporter(_report_progress)


def combo_problem(cls, **values) -> str | None:
    """For validate_inputs: the first of `values` (combo input name -> value; None = linked, not checked) that is not
    among its input's options, as a message; None when all are. ComfyUI 0.3.64 checks no V3 combo against its
    options when a prompt is queued (it looks for a list where V3 declares "COMBO"), and no version checks an input
    named in validate_inputs: without this, a stale value in a saved workflow failed in the middle of the run."""
    # define_schema, not GET_SCHEMA: ComfyUI validates on a locked clone of the class, which GET_SCHEMA would modify
    options = {i.id: i.options for i in cls.define_schema().inputs if isinstance(i, io.Combo.Input)}
    for name, value in values.items():
        if value is not None and value not in options[name]:
            return f"{name}: '{value}' is not one of {options[name]}"
    return None
