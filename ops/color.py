"""Colour fix of restored images against a reference: what the node FaceMend_ColorFix computes."""
from __future__ import annotations

from ..host import device as dev
from ..pipelines.color.fix import color_fix
from .common import bchw_to_image, empty_faces, image_to_bchw, no_faces


def fix_colors(image, reference, method="wavelet", strength=1.0):
    """(image with the reference's colours,): wavelet / AdaIN / none, blended by strength; an empty batch passes."""
    if no_faces(image):  # no face crops to correct
        return (empty_faces(image),)
    device = dev.compute_device()
    x = image_to_bchw(image, device)
    ref = image_to_bchw(reference, device, "colour reference")
    dev.check_interrupt()
    return (bchw_to_image(color_fix(x, ref, method, strength)),)


# Node id -> what it computes (keyword arguments = the node's inputs; returns the node's outputs as a tuple).
OPS = {"FaceMend_ColorFix": fix_colors}
