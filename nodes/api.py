"""The one module that imports ComfyUI's node API. FaceMend's nodes are V3 nodes (io.ComfyNode) on the versioned
API `comfy_api.v0_0_2`: the newest numbered version in ComfyUI 0.3.64, the host the tests run. It first shipped
with ComfyUI 0.3.48; MIN_COMFYUI is the oldest version we test. Node modules import io/ui from here, so moving to
a newer numbered version is a change of this file only. Nothing here computes: that is ops/ (plain functions)."""
from __future__ import annotations

import os

from comfy_api.v0_0_2 import ComfyAPISync, ComfyExtension, io, ui  # noqa: F401  (re-exported)

from ..host import device as dev

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


def preview(images, cls=None, max_side: int = 512):
    """IMAGE [B,H,W,3] -> a node preview (ComfyUI's temp folder), downscaled so a batch of big photos stays cheap.
    None for an empty batch (no face found): nothing to show."""
    if images is None or images.shape[0] == 0:
        return None
    small = [dev.preview_image(images[i:i + 1], max_side) for i in range(images.shape[0])]
    import torch

    same = all(s.shape == small[0].shape for s in small)
    batch = torch.cat(small) if same else small[0]
    return ui.PreviewImage(batch, cls=cls)


def file_fingerprint(path: str | None) -> tuple:
    """What identifies a model file's content cheaply: a file replaced under the same name re-runs its loader."""
    if not path:
        return ("missing",)
    try:
        st = os.stat(path)
    except OSError:
        return ("missing", path)
    return (os.path.abspath(path), st.st_mtime_ns, st.st_size)


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
            from comfy_api.v0_0_2 import ComfyAPI

            _execution = object.__new__(create_sync_class(ComfyAPI.Execution))
            _execution._async_instance = ComfyAPI.Execution.get_instance()
    return _execution


def _report_progress(value: int, total: int, image) -> None:
    # The execution API: the node's progress bar and, with an image, its live preview.
    _sync_execution().set_progress(value, total, preview_image=image)


dev.set_progress_reporter(_report_progress)
