"""Composed pipelines (presets) for the CLI and Python API: the same stages the nodes wrap, in the
order the shipped workflows wire them.

A preset is detect -> align -> [face stages on the crops] -> colour fix against the aligned input
crops -> paste-back. Presets grow as stages land; `demo` needs no downloaded weights at all.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .face.align import detect_and_align
from .color.fix import color_fix
from .face.paste import paste_faces
from .io.errors import InvalidImage

FaceStage = Callable[[torch.Tensor], torch.Tensor]  # [N,3,S,S] -> [N,3,S',S']


@dataclass
class PresetSpec:
    name: str
    description: str
    needs: tuple = ()  # model files the preset needs, as (folder, file name)
    upscale: int = 1   # output size factor
    # Each face's result is the same whichever faces share its forward (restorers): scale/ may batch the faces
    # of several photos together. False where a stage learns from all faces of its call (ZSSR, NTIRE tuning) or
    # draws noise for the whole batch (diffusion): their faces go per photo, as the local CLI runs them.
    faces_independent: bool = False


# Output size bound: the whole output photo (and a few float copies of it) is in memory at once. Measured with
# the demo preset on CPU: 46-70 bytes of peak memory per output pixel; 64 MP (e.g. 8192x8192) is about 3-4.5 GB.
MAX_OUTPUT_PIXELS = 64 * 1024 * 1024
BYTES_PER_OUTPUT_PIXEL = 60


def check_output_size(height: int, width: int, upscale: int, limit: int = MAX_OUTPUT_PIXELS,
                      what: str = "image") -> None:
    """Refuse, before any work, an image whose output would exceed `limit` pixels (0: no limit)."""
    oh, ow = height * upscale, width * upscale
    if limit and oh * ow > limit:
        gb = oh * ow * BYTES_PER_OUTPUT_PIXEL / 1024 ** 3
        raise InvalidImage(
            f"{what}: the x{upscale} output would be {ow}x{oh} ({oh * ow / 1e6:.0f} MP, about {gb:.0f} GB of memory "
            f"at its peak), over the {limit / 1024 ** 2:.0f} MP output limit. Downscale the input, use a preset "
            "without upscaling (fast), or raise the limit (--max-output-megapixels; 0 = none) if the memory is there.")


PRESETS = {
    "demo": PresetSpec("demo", "x2 face super-resolution with no model files: detect (embedded MTCNN) -> native "
                               "pixel crops -> ZSSR x2 per face (200 steps, faces tuned together) -> wavelet "
                               "colour fix -> paste into the x2 bicubic photo", upscale=2),
    "fast": PresetSpec("fast", "detect -> align -> GFPGAN (v1.4 by default) -> wavelet colour fix against the "
                               "input crops -> paste-back", needs=(("facerestore_models", "GFPGANv1.4.pth"),),
                       faces_independent=True),
    "ntire": PresetSpec("ntire", "the NTIRE 2025 AIIA chain: detect -> align -> GFPGAN (v1.4) -> TSD-SR one-step "
                                 "refinement at scale 1 (512 crops, fp16 on GPU) -> wavelet colour fix against the "
                                 "GFPGAN output -> paste-back",
                        needs=(("facerestore_models", "GFPGANv1.4.pth"),
                               ("diffusers", "stable-diffusion-3-medium-diffusers"), ("onestep_sr", "tsdsr"))),
    "ntire_full": PresetSpec("ntire_full", "the full NTIRE 2025 AIIA chain of its factsheet: detect -> align -> "
                             "GFPGAN v1.3 -> TSD-SR at scale 1 -> IQA-guided per-image tuning (L1 + 0.1 (1 - CLIP-IQA) "
                             "+ 0.1 (1 - MANIQA), ArcFace ID guard, best validated step kept) -> wavelet colour fix "
                             "against the GFPGAN output -> paste-back",
                             needs=(("facerestore_models", "GFPGANv1.3.pth"),
                                    ("diffusers", "stable-diffusion-3-medium-diffusers"), ("onestep_sr", "tsdsr"),
                                    ("facemend_iqa", "RN50.pt"), ("facemend_iqa", "ckpt_koniq10k.pt"),
                                    ("insightface", "models/buffalo_l/w600k_r50.onnx"))),
    "osdface": PresetSpec("osdface", "OSDFace, the one-step face diffusion prior: detect -> align (512) -> OSDFace "
                                     "(SD-2.1-base + its LoRA, prompt tokens from the face, one UNet step at t=399; fp16 "
                                     "on GPU) -> wavelet colour fix against the input crops -> paste-back",
                          needs=(("diffusers", "stable-diffusion-2-1-base"), ("onestep_sr", "osdface"))),
    "id_preserve": PresetSpec("id_preserve", "identity preservation from reference photos (--reference): detect -> "
                                             "align -> RestorerID (50 DDIM steps, CFG 4) with the reference's ArcFace "
                                             "+ CLIP tokens and the adaptive ID scale exp((9.5 - MUSIQ)/10) per face "
                                             "-> wavelet colour fix against the input crops -> paste-back",
                              needs=(("restorer_id", "RestorerIDFull.ckpt"),
                                     ("ipadapter", "ip-adapter-faceid-plus_sd15.bin"),
                                     ("clip_vision", "CLIP-ViT-H-14-laion2B-s32B-b79K"),
                                     ("diffusers", "stable-diffusion-v1-5"),
                                     ("insightface", "models/buffalo_l/w600k_r50.onnx"),
                                     ("facemend_iqa", "musiq_koniq_ckpt-e95806b9.pth"))),
}


@dataclass
class FaceRestorePipeline:
    detector: object
    face_stages: list = field(default_factory=list)  # list of (name, FaceStage)
    color_method: str = "wavelet"
    color_reference: str = "input"  # "input" (the aligned crops) or the name of a face stage whose output to use
    score_threshold: float = 0.8
    selection: str = "all"
    face_index: int = 0                  # with selection "index": which face, counting from the largest
    min_face_size: float = 16.0
    max_faces: int = 0
    crop_size: int = 512                # 0: the largest face's native resolution (align.native_crop_size)
    upscale: int = 1                     # output size factor: background bicubic, faces from the face stages
    detect_max_side: int = 1600
    feather: float = 0.10
    margin: float = 0.04
    interpolation: str = "bilinear"      # warps in and out; "bicubic" is sharper where faces are enlarged
    geometry: str = "ffhq"               # "native": unrotated pixel-exact crops (align.align_faces)
    max_output_pixels: int = MAX_OUTPUT_PIXELS  # per output image; 0 = no limit

    def __call__(self, images: torch.Tensor, hook=None) -> tuple[torch.Tensor, dict]:
        """images [B,3,H,W] on the pipeline's device -> (restored images, report with timings/faces)."""
        canvas, crops, alignment, report = self.detect(images)
        if len(alignment) == 0:
            return canvas, report
        restored = self.restore_crops(crops, report, hook)
        return self.paste(canvas, restored, alignment, report), report

    # The three phases of __call__, for callers that batch the faces of several photos together (scale/): the
    # face stages and the colour fix see only crops, so crops of different photos can share their forwards.
    def detect(self, images: torch.Tensor):
        """-> (canvas: the images at the output size, crops [N,3,S,S], FaceAlignment, report)."""
        check_output_size(images.shape[-2], images.shape[-1], self.upscale, self.max_output_pixels)
        report: dict = {"timings_s": {}}
        t0 = time.perf_counter()
        crops, alignment, _ = detect_and_align(
            images, self.detector, score_threshold=self.score_threshold, mode=self.selection, index=self.face_index,
            min_size=self.min_face_size, max_faces=self.max_faces, crop_size=self.crop_size,
            detect_max_side=self.detect_max_side, interpolation=self.interpolation,
            geometry=self.geometry)
        report["timings_s"]["detect_align"] = time.perf_counter() - t0
        report["faces"] = alignment.counts()
        canvas = images
        if self.upscale > 1:
            canvas = F.interpolate(images, scale_factor=self.upscale, mode="bicubic", align_corners=False).clamp(0, 1)
        return canvas, crops, alignment, report

    def restore_crops(self, crops: torch.Tensor, report: dict, hook=None) -> torch.Tensor:
        """The face stages then the colour fix on [N,3,S,S] crops; timings (and per-face stage figures) into report."""
        restored = crops
        outputs = {"input": crops}
        for name, stage in self.face_stages:
            if hook is not None:
                hook(0)
            t = time.perf_counter()
            restored = stage(restored)
            outputs[name] = restored
            report["timings_s"][name] = report["timings_s"].get(name, 0.0) + time.perf_counter() - t
            if getattr(stage, "last_report", None):  # per-face figures of stages that keep them (id_preserve)
                report[name] = stage.last_report
        if self.color_reference not in outputs:
            raise ValueError(f"colour reference {self.color_reference!r} is not 'input' or a stage of this pipeline "
                             f"({', '.join(outputs)})")
        t = time.perf_counter()
        restored = color_fix(restored, outputs[self.color_reference], self.color_method)
        report["timings_s"]["color_fix"] = report["timings_s"].get("color_fix", 0.0) + time.perf_counter() - t
        return restored

    def paste(self, canvas: torch.Tensor, restored: torch.Tensor, alignment, report: dict) -> torch.Tensor:
        t = time.perf_counter()
        out, _ = paste_faces(canvas, restored, alignment, margin=self.margin, feather=self.feather,
                             interpolation=self.interpolation)
        report["timings_s"]["paste"] = time.perf_counter() - t
        report["alignment"] = alignment.to_dict()
        return out
