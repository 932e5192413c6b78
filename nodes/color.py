"""Node: colour fix of a restored image against a reference."""
from __future__ import annotations

from ..host import device as dev
from ..pipelines.color.fix import METHODS, color_fix
from ..ops.common import CATEGORY, bchw_to_image, empty_faces, image_to_bchw, no_faces


class ColorFix:
    DESCRIPTION = ("Gives a restored image the colours of a reference (e.g. the input, or an earlier stage) while "
                   "keeping its details: wavelet (low frequencies from the reference) or AdaIN (channel statistics).")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "Restored images to correct."}),
            "reference": ("IMAGE", {"tooltip": "Colour reference: one image for all, or one per image; resized "
                                               "to each image's size when sizes differ."}),
            "method": (list(METHODS), {"default": "wavelet", "tooltip":
                       "wavelet: 5-level wavelet low-frequency transfer (NTIRE 2025 AIIA); adain: mean/std "
                       "per channel; none: pass through."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                         "Blend between the uncorrected (0) and corrected (1) image."}),
        }}

    def run(self, image, reference, method="wavelet", strength=1.0):
        if no_faces(image):  # no face crops to correct
            return (empty_faces(image),)
        device = dev.compute_device()
        x = image_to_bchw(image, device)
        ref = image_to_bchw(reference, device, "colour reference")
        dev.check_interrupt()
        return (bchw_to_image(color_fix(x, ref, method, strength)),)


NODES = {"FaceMend_ColorFix": (ColorFix, "FaceMend Color Fix")}
