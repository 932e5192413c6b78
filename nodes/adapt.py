"""V3 nodes: adapting a restorer to the user's own photos (diffusion-prior pseudo targets, then fine-tuning). What
they compute is ops/adapt.py."""
from __future__ import annotations

import torch

from ..host.model_paths import ModelFileNotFound, find_optional_file, missing_file_message
from ..ops import adapt as op
from ..pipelines.io.images import side_by_side
from .api import CATEGORY, DiffusionPrior, combo_problem, FaceRestorer, file_fingerprint, io, preview

# The STRING inputs pass multiline=None: no "multiline" key in /object_info, as the V1 schema (single-line either way).
_NOT_CONNECTED = object()  # validate_inputs' default for face_crops: ComfyUI passes a linked one as None

# The pseudo-target settings both nodes take: (name, min, max) of the INT ones, checked again in validate_inputs.
_INT_RANGES = {"start_step": (1, 249), "reg_end_step": (1, 249), "down_factor": (1, 64)}


def _pseudo_inputs() -> list:
    return [
        io.Int.Input("start_step", default=150, min=1, max=249, tooltip=(
            "Noise level the restorer's output is diffused to, in respaced steps of 250 (official 150; "
            "higher = more freedom for the prior, less fidelity). One prior call per step.")),
        io.Int.Input("reg_end_step", default=90, min=1, max=249, tooltip=(
            "The low frequencies are pinned to the noised reference while the step is >= this "
            "(official 90: 60 constrained steps, the last 90 free).")),
        io.Int.Input("down_factor", default=8, min=1, max=64, tooltip=(
            "Low-pass factor of the constraint (cubic, antialiased down/up): official 8 for "
            "CodeFormer/GFPGAN-like restorers (general mode), 16 for SwinIR.")),
        io.Boolean.Input("apply_filter", default=True, tooltip=(
            "The low-frequency constraint (ILVR). Off: plain DifFace-style diffusion from the output.")),
        io.Int.Input("seed", default=20000, min=0, max=0xFFFFFFFF, tooltip=(
            "Seed (official 20000); face i uses seed + i, so a face's target does not depend on its batch.")),
        io.String.Input("respacing", default="250", multiline=None, tooltip=(
            "Respacing of the 1000-step schedule (official \"250\"); start_step and reg_end_step count in "
            "these respaced steps. \"ddimN\" is refused (the official code then drops the constraint).")),
        io.Boolean.Input("clip_denoised", default=True, tooltip="Clamp each predicted clean image to [-1, 1] "
                                                                "(official: on)."),
    ]


def _check_pseudo(start_step, reg_end_step, down_factor, apply_filter, respacing):
    """The pseudo-target settings checked before the run: the ranges ComfyUI no longer checks for the inputs named
    in validate_inputs, then what the generator would refuse mid-run (respacing, start step beyond it, ...).
    A linked input arrives as None (its value is not known before the run): its checks are left to the run."""
    values = {"start_step": start_step, "reg_end_step": reg_end_step, "down_factor": down_factor}
    for key, (lo, hi) in _INT_RANGES.items():
        if values[key] is not None and not lo <= int(values[key]) <= hi:
            return f"{key} must be between {lo} and {hi}, got {values[key]}"
    if None in (start_step, reg_end_step, down_factor, apply_filter, respacing):
        return None
    return op.refused_pseudo_settings(start_step, reg_end_step, down_factor, apply_filter, respacing)


class DiffusionPriorLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceMend_DiffusionPriorLoader", display_name="FaceMend Diffusion Prior Loader",
            category=CATEGORY,
            description=("Loads the DifFace FFHQ-512 diffusion prior (iddpm_ffhq512_ema500000.pth, "
                         "models/facemend_priors/) used to make pseudo targets for adapting a restorer. "
                         "Non-commercial licence (S-Lab 1.0)."),
            inputs=[io.Combo.Input("model", options=op.prior_files(), tooltip=(
                "The prior in models/facemend_priors/ (iddpm_ffhq512_ema500000.pth, 640 MB)."))],
            outputs=[DiffusionPrior.Output(display_name="prior")],
        )

    @classmethod
    def validate_inputs(cls, model=op.PRIOR_DEFAULT):
        # Naming `model` turns off ComfyUI's combo check: redo it, then name a missing file before the run (the
        # choices show the default name when the folder is empty). Linked (None): checked by the loader itself.
        if model is None:
            return True
        if model not in op.prior_files():
            return f"model: {model!r} is not one of the priors in models/{op.PRIOR_FOLDER}/"
        try:
            found = find_optional_file(op.PRIOR_FOLDER, model)
        except ModelFileNotFound as exc:
            return str(exc)
        return True if found else missing_file_message(op.PRIOR_FOLDER, model)

    @classmethod
    def fingerprint_inputs(cls, model=op.PRIOR_DEFAULT):
        # The same file name with new weights in it loads again; an unchanged file is not re-read.
        if model is None:  # linked: what feeds it decides
            return ()
        try:
            return file_fingerprint(find_optional_file(op.PRIOR_FOLDER, model))
        except ModelFileNotFound:
            return ("refused", model)

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        return io.NodeOutput(op.load_prior(model))


class PseudoTargets(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceMend_PseudoTargets", display_name="FaceMend Pseudo Targets (diffusion prior)",
            category=CATEGORY,
            description=("Makes pseudo targets for your own faces without ground truth (Kuai et al., WACV 2025): "
                         "the restorer's output is noised, then denoised by the FFHQ prior while its low "
                         "frequencies are kept. Slow: 150 prior steps per face (minutes per face on a CPU)."),
            inputs=[
                io.Image.Input("face_crops", tooltip=(
                    "Aligned faces (FFHQ template, 512x512; other sizes are resized).")),
                FaceRestorer.Input("restorer", tooltip="The restorer to adapt; its output is the reference."),
                DiffusionPrior.Input("prior", tooltip="From the FaceMend Diffusion Prior Loader."),
                *_pseudo_inputs(),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip=(
                    "Faces sampled together: one prior call for all of them on a GPU; on the CPU the prior "
                    "runs face by face (faster per face there).")),
            ],
            outputs=[
                io.Image.Output(display_name="pseudo_targets", tooltip="One target per face, same size as the input."),
                io.Image.Output(display_name="restored", tooltip="The restorer's output (the reference)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, start_step=150, reg_end_step=90, down_factor=8, apply_filter=True, respacing="250"):
        return _check_pseudo(start_step, reg_end_step, down_factor, apply_filter, respacing) or True

    @classmethod
    def execute(cls, face_crops, restorer, prior, start_step=150, reg_end_step=90, down_factor=8, apply_filter=True,
                seed=20000, respacing="250", clip_denoised=True, batch_size=1) -> io.NodeOutput:
        targets, restored = op.pseudo_targets(face_crops, restorer, prior, start_step, reg_end_step, down_factor,
                                              apply_filter, seed, respacing, clip_denoised, batch_size)
        return io.NodeOutput(targets, restored, ui=preview(targets, cls))


def before_after(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """IMAGE [1,H,W,3] pair -> IMAGE [1,H,2W+gap,3]: the face as the restorer gave it, then as the adapted one does."""
    pair = side_by_side(before[0].permute(2, 0, 1), after[0].permute(2, 0, 1),
                        labels=("before adapting", "after adapting"))
    return pair.permute(1, 2, 0)[None]


class AdaptRestorer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceMend_AdaptRestorer", display_name="FaceMend Adapt Restorer (fine-tune on your photos)",
            category=CATEGORY, is_output_node=True,
            description=("Adapts a restorer (GFPGAN v1.3/v1.4, GPEN) to your own photos: pseudo targets from the "
                         "diffusion prior, then fine-tuning with L1 + LPIPS. Saves a NEW model in "
                         "models/facerestore_models/ (never overwrites); checkpoints and the pseudo targets go to "
                         "output/facemend_adapt/<name>/, and re-running with the same settings resumes there after "
                         "an interruption. Departures from the official recipe: the GAN term is off unless "
                         "gan_weight > 0 (official 0.1, with FFHQ faces as its real side), and micro-batches are "
                         "drawn with replacement (the official loader shuffles epochs)."),
            inputs=[
                FaceRestorer.Input("restorer", tooltip="The restorer to adapt (GFPGAN v1.3/v1.4, GPEN)."),
                DiffusionPrior.Input("prior", tooltip="From the FaceMend Diffusion Prior Loader."),
                io.String.Input("name", default="my_album", multiline=None, tooltip=(
                    "Name of the new model: facerestore_models/<name>.safetensors. Refused if it exists.")),
                io.Int.Input("steps", default=2000, min=1, max=100000, tooltip=(
                    "Optimiser steps (official 20000 for ~2500 faces; a few hundred faces: 1000-3000).")),
                io.Float.Input("learning_rate", default=2e-5, min=1e-7, max=1e-2, step=1e-6, round=False,
                               tooltip="AdamW learning rate (official 2e-5), cosine-annealed."),
                io.Float.Input("lpips_weight", default=0.1, min=0.0, max=10.0, step=0.01, tooltip=(
                    "Weight of LPIPS-VGG (official 0.1, summed over the micro-batch). 0: L1 only, no "
                    "VGG file needed.")),
                io.Int.Input("micro_batch", default=4, min=1, max=64, tooltip="Faces per forward pass."),
                io.Int.Input("accumulate", default=4, min=1, max=64, tooltip=(
                    "Micro-batches per optimiser step (official batch 16 = 4 x 4).")),
                io.Int.Input("checkpoint_every", default=250, min=1, max=100000, tooltip=(
                    "Save the training state every N steps (resume point).")),
                io.Combo.Input("precision", options=["fp32", "bf16", "fp16"], default="fp32", tooltip=(
                    "Autocast on a GPU (bf16 needs Ampere or newer); a CPU always trains in fp32.")),
                *_pseudo_inputs(),
                io.Image.Input("face_crops", optional=True, tooltip=(
                    "Aligned faces to adapt to. Or give a folder below.")),
                io.String.Input("folder", default="", optional=True, multiline=None, tooltip=(
                    "A folder of aligned square face crops (used when face_crops is not connected).")),
                io.Float.Input("gan_weight", default=0.0, min=0.0, max=10.0, step=0.01, optional=True, tooltip=(
                    "Adversarial loss weight (official 0.1 with the GAN on; 0 = off). Trains a Real-ESRGAN "
                    "U-Net discriminator from scratch alongside.")),
                io.String.Input("gan_real_folder", default="", optional=True, multiline=None, tooltip=(
                    "Clean aligned faces for the discriminator's 'real' side (e.g. FFHQ crops). Empty: "
                    "the pseudo targets (the official fallback).")),
            ],
            outputs=[
                io.String.Output(display_name="model_name", tooltip=(
                    "File name of the adapted restorer in facerestore_models/ (for the restorer loader).")),
                io.Image.Output(display_name="loss_curve", tooltip="The training loss per step."),
                FaceRestorer.Output(display_name="adapted_restorer", tooltip=(
                    "The adapted restorer, loaded from the saved file (wire it to Restore Faces).")),
            ],
        )

    @classmethod
    def validate_inputs(cls, name="my_album", start_step=150, reg_end_step=90, down_factor=8, apply_filter=True,
                        respacing="250", face_crops=_NOT_CONNECTED, folder="", gan_weight=0.0, gan_real_folder="",
                        precision=None):
        # What used to fail after minutes of pseudo targets or at the end of training is refused before the run.
        # The INT/FLOAT inputs named here lose ComfyUI's own range check: _check_pseudo and the gan_weight line
        # redo it. A linked input arrives as None (its value is made later): its checks are left to the run; an
        # optional input that is not connected is not passed at all, so face_crops keeps _NOT_CONNECTED then, and
        # only then is the folder read.
        if combo_problem(cls, precision=precision):
            return combo_problem(cls, precision=precision)
        if gan_weight is not None and not 0.0 <= float(gan_weight) <= 10.0:
            return f"gan_weight must be between 0 and 10, got {gan_weight}"
        if face_crops is _NOT_CONNECTED and folder is not None and not str(folder).strip():
            return "connect face_crops or give a folder of aligned face crops"
        uses_folder = face_crops is _NOT_CONNECTED and folder is not None
        uses_gan_folder = gan_weight is not None and float(gan_weight) > 0 and gan_real_folder is not None
        return ((op.refused_name(name) if name is not None else None)
                or _check_pseudo(start_step, reg_end_step, down_factor, apply_filter, respacing)
                or (op.refused_folder(folder) if uses_folder else None)
                or (op.refused_folder(gan_real_folder, "GAN real-face folder") if uses_gan_folder else None)
                or True)

    @classmethod
    def fingerprint_inputs(cls, prior=None, folder="", gan_real_folder="", **_):
        # Photos added to, changed in or removed from the folders make the node run again (the folder names alone
        # would not change); the prior's identity comes with its loader's own fingerprint, through the link.
        return (op.folder_listing(folder), op.folder_listing(gan_real_folder))

    @classmethod
    def execute(cls, restorer, prior, name, steps=2000, learning_rate=2e-5, lpips_weight=0.1, micro_batch=4,
                accumulate=4, checkpoint_every=250, precision="fp32", start_step=150, reg_end_step=90,
                down_factor=8, apply_filter=True, seed=20000, respacing="250", clip_denoised=True, face_crops=None,
                folder="", gan_weight=0.0, gan_real_folder="") -> io.NodeOutput:
        res = op.adapt(restorer, prior, name, steps, learning_rate, lpips_weight, micro_batch, accumulate,
                       checkpoint_every, precision, start_step, reg_end_step, down_factor, apply_filter, seed,
                       respacing, clip_denoised, face_crops, folder, gan_weight, gan_real_folder)
        # On the node: the loss curve and the first face before | after adapting, and where the model went.
        pair = before_after(res.before, res.after)
        shown = [preview(im, cls, max_side=max(im.shape[1:3])) for im in (res.loss_curve, pair)]
        ui = {"images": [v for p in shown for v in p.values], "animated": (False,),
              "text": [f"saved {res.path}"]}
        return io.NodeOutput(*res.outputs, ui=ui)


NODES = [DiffusionPriorLoader, PseudoTargets, AdaptRestorer]
