"""Nodes: adapting a restorer to the user's own photos (diffusion-prior pseudo targets, then fine-tuning)."""
from __future__ import annotations

import os

from ..host import device as dev
from ..host import models as hm
from ..host import model_paths
from ..ops.common import CATEGORY, bchw_to_image, empty_faces, image_to_bchw, no_faces

PRIOR_DEFAULT = "iddpm_ffhq512_ema500000.pth"
_cache: dict = {}


def load_prior(name: str):
    """The DifFace FFHQ-512 prior from models/facemend_priors/ (cached per file and device)."""
    from ..pipelines.adapt.prior import load_prior_unet

    path = model_paths.find_file("facemend_priors", name)
    device = dev.compute_device()
    key = (os.path.abspath(path), os.path.getmtime(path), str(device))
    if key not in _cache:
        hm.unload(*_cache.values())
        _cache.clear()
        dev.free_memory(700 * 1024 ** 2, device)
        _cache[key] = hm.manage(load_prior_unet(path, device=device), "diffusion prior")
    return _cache[key]


def load_lpips(device):
    """LPIPS-VGG from models/facemend_priors/vgg16-397923af.pth or torchvision's cache; never downloads."""
    from ..pipelines.adapt.perceptual import VGG16_FILE, find_vgg16, load_lpips_vgg

    candidates = tuple(os.path.join(d, VGG16_FILE) for d in model_paths.search_dirs("facemend_priors"))
    return load_lpips_vgg(find_vgg16(candidates), device=device)


def _pseudo_config(start_step, reg_end_step, down_factor, apply_filter, seed, respacing="250", clip_denoised=True):
    from ..pipelines.adapt.pseudo_targets import PseudoTargetConfig

    return PseudoTargetConfig(start_step=int(start_step), reg_end_step=int(reg_end_step),
                              down_factor=int(down_factor), apply_filter=bool(apply_filter), seed=int(seed),
                              respacing=str(respacing).strip(), clip_denoised=bool(clip_denoised))


_PSEUDO_INPUTS = {
    "start_step": ("INT", {"default": 150, "min": 1, "max": 249, "tooltip":
                   "Noise level the restorer's output is diffused to, in respaced steps of 250 (official 150; "
                   "higher = more freedom for the prior, less fidelity). One prior call per step."}),
    "reg_end_step": ("INT", {"default": 90, "min": 1, "max": 249, "tooltip":
                     "The low frequencies are pinned to the noised reference while the step is >= this "
                     "(official 90: 60 constrained steps, the last 90 free)."}),
    "down_factor": ("INT", {"default": 8, "min": 1, "max": 64, "tooltip":
                    "Low-pass factor of the constraint (cubic, antialiased down/up): official 8 for "
                    "CodeFormer/GFPGAN-like restorers (general mode), 16 for SwinIR."}),
    "apply_filter": ("BOOLEAN", {"default": True, "tooltip":
                     "The low-frequency constraint (ILVR). Off: plain DifFace-style diffusion from the output."}),
    "seed": ("INT", {"default": 20000, "min": 0, "max": 0xFFFFFFFF, "tooltip":
             "Seed (official 20000); face i uses seed + i, so a face's target does not depend on its batch."}),
    "respacing": ("STRING", {"default": "250", "tooltip":
                  "Respacing of the 1000-step schedule (official \"250\"); start_step and reg_end_step count in "
                  "these respaced steps. \"ddimN\" is refused (the official code then drops the constraint)."}),
    "clip_denoised": ("BOOLEAN", {"default": True, "tooltip": "Clamp each predicted clean image to [-1, 1] "
                                                               "(official: on)."}),
}


class DiffusionPriorLoader:
    DESCRIPTION = ("Loads the DifFace FFHQ-512 diffusion prior (iddpm_ffhq512_ema500000.pth, models/facemend_priors/) "
                   "used to make pseudo targets for adapting a restorer. Non-commercial licence (S-Lab 1.0).")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("DIFFUSION_PRIOR",)
    RETURN_NAMES = ("prior",)

    @classmethod
    def INPUT_TYPES(cls):
        files = model_paths.list_files("facemend_priors") or [PRIOR_DEFAULT]
        files = [f for f in files if "vgg16" not in f] or [PRIOR_DEFAULT]
        return {"required": {"model": (files, {"tooltip": "The prior in models/facemend_priors/ "
                                                         "(iddpm_ffhq512_ema500000.pth, 640 MB)."})}}

    def load(self, model):
        return (load_prior(model),)


class PseudoTargets:
    DESCRIPTION = ("Makes pseudo targets for your own faces without ground truth (Kuai et al., WACV 2025): the "
                   "restorer's output is noised, then denoised by the FFHQ prior while its low frequencies are "
                   "kept. Slow: 150 prior steps per face (minutes per face on a CPU).")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("pseudo_targets", "restored")
    OUTPUT_TOOLTIPS = ("One target per face, same size as the input.", "The restorer's output (the reference).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "face_crops": ("IMAGE", {"tooltip": "Aligned faces (FFHQ template, 512x512; other sizes are resized)."}),
            "restorer": ("FACE_RESTORER", {"tooltip": "The restorer to adapt; its output is the reference."}),
            "prior": ("DIFFUSION_PRIOR", {"tooltip": "From the FaceMend Diffusion Prior Loader."}),
            **_PSEUDO_INPUTS,
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip":
                           "Faces sampled together: one prior call for all of them on a GPU; on the CPU the prior "
                           "runs face by face (faster per face there)."}),
        }}

    def run(self, face_crops, restorer, prior, start_step=150, reg_end_step=90, down_factor=8, apply_filter=True,
            seed=20000, respacing="250", clip_denoised=True, batch_size=1):
        from ..pipelines.adapt.pseudo_targets import PseudoTargetGenerator

        if no_faces(face_crops):  # no faces found: no targets to make
            return (empty_faces(face_crops), empty_faces(face_crops))
        with hm.on_device(restorer, prior):
            x = image_to_bchw(face_crops, restorer.device, "face crops")
            gen = PseudoTargetGenerator(prior, _pseudo_config(start_step, reg_end_step, down_factor, apply_filter,
                                                              seed, respacing, clip_denoised))
            progress = dev.Progress(x.shape[0] * (gen.num_model_calls + 1))
            hook = dev.step_hook(progress)
            dev.check_interrupt()
            restored = restorer(x, seed=0, callback=hook)
            targets = gen(restored, batch_size=batch_size, callback=hook)
        return (bchw_to_image(targets), bchw_to_image(restored))


class AdaptRestorer:
    DESCRIPTION = ("Adapts a restorer (GFPGAN v1.3/v1.4, GPEN) to your own photos: pseudo targets from the diffusion "
                   "prior, then fine-tuning with L1 + LPIPS. Saves a NEW model in models/facerestore_models/ "
                   "(never overwrites); checkpoints and the pseudo targets go to output/facemend_adapt/<name>/, "
                   "and re-running with the same settings resumes there after an interruption. Departures from "
                   "the official recipe: the GAN term is off unless gan_weight > 0 (official 0.1, with FFHQ faces "
                   "as its real side), and micro-batches are drawn with replacement (the official loader "
                   "shuffles epochs).")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "IMAGE", "FACE_RESTORER")
    RETURN_NAMES = ("model_name", "loss_curve", "adapted_restorer")
    OUTPUT_TOOLTIPS = ("File name of the adapted restorer in facerestore_models/ (for the restorer loader).",
                       "The training loss per step.",
                       "The adapted restorer, loaded from the saved file (wire it to Restore Faces).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "restorer": ("FACE_RESTORER", {"tooltip": "The restorer to adapt (GFPGAN v1.3/v1.4, GPEN)."}),
            "prior": ("DIFFUSION_PRIOR", {"tooltip": "From the FaceMend Diffusion Prior Loader."}),
            "name": ("STRING", {"default": "my_album", "tooltip":
                     "Name of the new model: facerestore_models/<name>.safetensors. Refused if it exists."}),
            "steps": ("INT", {"default": 2000, "min": 1, "max": 100000, "tooltip":
                      "Optimiser steps (official 20000 for ~2500 faces; a few hundred faces: 1000-3000)."}),
            "learning_rate": ("FLOAT", {"default": 2e-5, "min": 1e-7, "max": 1e-2, "step": 1e-6, "round": False,
                                        "tooltip": "AdamW learning rate (official 2e-5), cosine-annealed."}),
            "lpips_weight": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip":
                             "Weight of LPIPS-VGG (official 0.1, summed over the micro-batch). 0: L1 only, no "
                             "VGG file needed."}),
            "micro_batch": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip": "Faces per forward pass."}),
            "accumulate": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip":
                           "Micro-batches per optimiser step (official batch 16 = 4 x 4)."}),
            "checkpoint_every": ("INT", {"default": 250, "min": 1, "max": 100000, "tooltip":
                                 "Save the training state every N steps (resume point)."}),
            "precision": (["fp32", "bf16", "fp16"], {"default": "fp32", "tooltip":
                          "Autocast on a GPU (bf16 needs Ampere or newer); a CPU always trains in fp32."}),
            **_PSEUDO_INPUTS,
        }, "optional": {
            "face_crops": ("IMAGE", {"tooltip": "Aligned faces to adapt to. Or give a folder below."}),
            "folder": ("STRING", {"default": "", "tooltip":
                       "A folder of aligned square face crops (used when face_crops is not connected)."}),
            "gan_weight": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip":
                           "Adversarial loss weight (official 0.1 with the GAN on; 0 = off). Trains a Real-ESRGAN "
                           "U-Net discriminator from scratch alongside."}),
            "gan_real_folder": ("STRING", {"default": "", "tooltip":
                                "Clean aligned faces for the discriminator's 'real' side (e.g. FFHQ crops). Empty: "
                                "the pseudo targets (the official fallback)."}),
        }}

    def run(self, restorer, prior, name, **kwargs):
        import torch

        # ComfyUI runs nodes under torch.inference_mode(): fine-tuning needs autograd, and tensors made in that
        # mode (the LPIPS weights, the faces) cannot enter it. Found by running the template in a real ComfyUI.
        # ComfyUI loads the models first, in the mode it runs nodes in: a move made outside inference mode would
        # give the loaders' inference-mode weights a normal tensor's key over an inference tensor's storage (no
        # version counter: the restorer's first view fails).
        with hm.on_device(restorer, prior), torch.inference_mode(False), torch.enable_grad():
            return self._run(restorer, prior, name, **kwargs)

    def _run(self, restorer, prior, name, steps=2000, learning_rate=2e-5, lpips_weight=0.1, micro_batch=4,
             accumulate=4, checkpoint_every=250, precision="fp32", start_step=150, reg_end_step=90, down_factor=8,
             apply_filter=True, seed=20000, respacing="250", clip_denoised=True, face_crops=None, folder="",
             gan_weight=0.0, gan_real_folder=""):
        from ..pipelines.adapt.finetune import FinetuneConfig
        from ..pipelines.adapt.pseudo_targets import PseudoTargetGenerator
        from ..pipelines.adapt.run import adapt_restorer, load_face_folder
        from ..pipelines.io.errors import FaceMendError
        from ..pipelines.io.images import read_image

        name = str(name).strip()
        if not name or os.sep in name or "/" in name or name.startswith("."):
            raise FaceMendError(f"model name {name!r}: give a plain file name without folders")
        if face_crops is not None:
            faces = image_to_bchw(face_crops, "cpu", "face crops").clone()
        elif str(folder).strip():
            faces = load_face_folder(str(folder).strip(), restorer.input_size)
        else:
            raise FaceMendError("connect face_crops or give a folder of aligned face crops")
        out_path = model_paths.expected_path("facerestore_models", f"{name}.safetensors")
        work_dir = os.path.join(model_paths.output_directory(), "facemend_adapt", name)
        cfg = FinetuneConfig(steps=int(steps), lr=float(learning_rate), lr_min=min(5e-6, float(learning_rate)),
                             lpips_weight=float(lpips_weight), micro_batch=int(micro_batch),
                             accumulate=int(accumulate), checkpoint_every=int(checkpoint_every), precision=precision,
                             gan_weight=float(gan_weight), d_lr=float(learning_rate))
        gan_real = load_face_folder(str(gan_real_folder).strip(), restorer.input_size) \
            if float(gan_weight) > 0 and str(gan_real_folder).strip() else None
        gen = PseudoTargetGenerator(prior, _pseudo_config(start_step, reg_end_step, down_factor, apply_filter, seed,
                                                          respacing, clip_denoised))
        lp = load_lpips(restorer.device) if cfg.lpips_weight > 0 else None
        progress = dev.Progress(faces.shape[0] * gen.num_model_calls + cfg.steps)
        result, _ = adapt_restorer(faces, restorer, gen, lp, cfg, name, out_path, work_dir,
                                   hook=dev.step_hook(progress), gan_real=gan_real)
        from ..pipelines.restore.restorer import FaceRestorer

        plot = read_image(result.plot_path)[0]
        adapted = hm.manage(FaceRestorer.from_file(result.output_path, device=restorer.device,
                                                   dtype=restorer.requested_dtype), f"FaceRestorer {name}")
        return {"ui": {"text": [f"saved {result.output_path}"]},
                "result": (os.path.basename(result.output_path), bchw_to_image(plot), adapted)}


NODES = {
    "FaceMend_DiffusionPriorLoader": (DiffusionPriorLoader, "FaceMend Diffusion Prior Loader"),
    "FaceMend_PseudoTargets": (PseudoTargets, "FaceMend Pseudo Targets (diffusion prior)"),
    "FaceMend_AdaptRestorer": (AdaptRestorer, "FaceMend Adapt Restorer (fine-tune on your photos)"),
}
