"""V3 node: colour fix of a restored image against a reference. What it computes is ops/color.py."""
from __future__ import annotations

from ..ops import color as op
from ..pipelines.color.fix import METHODS
from .api import PREVIEW_MAX, CATEGORY, combo_problem, io, preview


class ColorFix(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceMend_ColorFix", display_name="FaceMend Color Fix", category=CATEGORY,
            description=("Gives a restored image the colours of a reference (e.g. the input, or an earlier stage) "
                         "while keeping its details: wavelet (low frequencies from the reference) or AdaIN (channel "
                         "statistics)."),
            inputs=[
                io.Image.Input("image", tooltip="Restored images to correct."),
                io.Image.Input("reference", tooltip=(
                    "Colour reference: one image for all, or one per image; resized to each image's size when "
                    "sizes differ.")),
                io.Combo.Input("method", options=list(METHODS), default="wavelet", tooltip=(
                    "wavelet: 5-level wavelet low-frequency transfer (NTIRE 2025 AIIA); adain: mean/std "
                    "per channel; none: pass through.")),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.05, tooltip=(
                    "Blend between the uncorrected (0) and corrected (1) image.")),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def validate_inputs(cls, method=None):
        # A value that is not a choice (a stale saved workflow) is refused when queued, not in the middle of the run.
        return combo_problem(cls, method=method) or True

    @classmethod
    def execute(cls, image, reference, method="wavelet", strength=1.0) -> io.NodeOutput:
        (out,) = op.fix_colors(image, reference, method, strength)
        return io.NodeOutput(out, ui=preview(out[:PREVIEW_MAX], cls))


NODES = [ColorFix]
