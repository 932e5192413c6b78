"""V3 nodes: face restorer loader and restore. What they compute is ops/restore.py."""
from __future__ import annotations

from ..host.model_paths import find_optional_file
from ..ops import restore as op
from ..ops.common import model_file_problem
from .api import CATEGORY, FaceRestorer, combo_problem, file_fingerprint, io, preview


class FaceRestorerLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceMend_RestorerLoader", display_name="FaceMend Face Restorer Loader", category=CATEGORY,
            description=("Loads a face restorer from models/facerestore_models/: GFPGAN v1.3 / v1.4, CodeFormer, "
                         "RestoreFormer / RestoreFormer++ (.ckpt), GPEN-BFR 256/512/1024/2048, in .pth/.ckpt or "
                         ".safetensors; the architecture is recognised from the weights."),
            inputs=[
                io.Combo.Input("model", options=op.restorer_files(), tooltip=(
                    "Restorer weights in models/facerestore_models/ (e.g. GFPGANv1.4.pth, codeformer.pth, "
                    "RestoreFormer++.ckpt, GPEN-BFR-512.pth).")),
                io.Combo.Input("precision", options=list(op.PRECISIONS), default="auto", tooltip=(
                    "auto: fp16 on GPUs that support it, fp32 on CPU. GFPGAN in fp16 stays within 1/255 "
                    "of fp32 on most pixels.")),
            ],
            outputs=[FaceRestorer.Output(display_name="restorer")],
        )

    @classmethod
    def validate_inputs(cls, model=None, precision=None):
        # Before the run: a file that is not there, named with the folders searched and where to get it; a value
        # that is not a choice (model_file_problem checks the list too). None: linked, nothing to check.
        return (combo_problem(cls, precision=precision)
                or (model is not None and model_file_problem(op.FOLDER, model, op.restorer_files())) or True)

    @classmethod
    def fingerprint_inputs(cls, model, precision="auto"):
        # The same file name with new weights in it loads again; an unchanged file is not re-read.
        return (file_fingerprint(find_optional_file(op.FOLDER, model)), precision)

    @classmethod
    def execute(cls, model, precision="auto") -> io.NodeOutput:
        return io.NodeOutput(op.load_restorer(model, precision))


class RestoreFaces(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceMend_RestoreFaces", display_name="FaceMend Restore Faces", category=CATEGORY,
            description=("Restores aligned face crops (from Detect + Align) in batches on the GPU. Output has the same "
                         "size and order as the input, so Paste Back can put the faces back."),
            inputs=[
                io.Image.Input("face_crops", tooltip=(
                    "Aligned faces (512x512 for GFPGAN/CodeFormer/RestoreFormer, the model's size for GPEN; other "
                    "sizes are resized in and back out).")),
                FaceRestorer.Input("restorer", tooltip="From the FaceMend face restorer loader."),
                io.Float.Input("visibility", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Blend of restored (1) and input (0) faces."),
                io.Float.Input("fidelity", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="CodeFormer's w: higher keeps more of the input's identity. Ignored by GFPGAN."),
                io.Int.Input("batch_size", default=0, min=0, max=64, tooltip=(
                    "Faces per network call; halved automatically on out-of-memory. 0 = automatic: 8 on "
                    "a GPU, 1 on a CPU (batching is no faster there and multiplies memory).")),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, tooltip=(
                    "Seed of GFPGAN's noise inputs (the official code draws them at random every run).")),
            ],
            outputs=[io.Image.Output(display_name="restored_faces")],
        )

    @classmethod
    def execute(cls, face_crops, restorer, visibility=1.0, fidelity=0.5, batch_size=0, seed=0) -> io.NodeOutput:
        (out,) = op.restore_faces(face_crops, restorer, visibility, fidelity, batch_size, seed)
        return io.NodeOutput(out, ui=preview(out, cls))


NODES = [FaceRestorerLoader, RestoreFaces]
