"""V3 nodes: RestorerID loader, adaptive ID scale, and restoration of face crops from a reference photo. What they
compute is ops/identity.py."""
from __future__ import annotations

from ..ops import identity as op
from .api import CATEGORY, combo_problem, FaceDetector, FaceID, IQAMetric, RestorerID, file_fingerprint, io, preview


class RestorerIDLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceMend_RestorerIDLoader", display_name="FaceMend RestorerID Loader", category=CATEGORY,
            description=("Loads RestorerID (identity-preserving face restoration from a reference photo): "
                         "RestorerIDFull.ckpt from models/restorer_id/, ip-adapter-faceid-plus_sd15.bin from "
                         "models/ipadapter/, CLIP-ViT-H-14 from models/clip_vision/ (folder or file) and SD-1.5's text "
                         "encoder from a diffusers folder in models/diffusers/. The IP-Adapter-FaceID weights and the "
                         "insightface ArcFace models are non-commercial."),
            inputs=[
                io.Combo.Input("checkpoint", options=op.checkpoint_files(), default=op.DEFAULT_CKPT, tooltip=(
                    "RestorerIDFull.ckpt (or a safetensors conversion) in models/restorer_id/. Plain SD-1.5 "
                    "or GFPGAN files are refused with what they are.")),
                io.Combo.Input("ip_adapter", options=op.ip_adapter_files(), default=op.DEFAULT_IP_ADAPTER, tooltip=(
                    "ip-adapter-faceid-plus_sd15.bin in models/ipadapter/ (its image_proj part "
                    "turns the reference into ID tokens).")),
                io.Combo.Input("clip_vision", options=op.clip_vision_sources(), default=op.DEFAULT_CLIP_VISION,
                               tooltip=("CLIP-ViT-H-14 (laion2B) in models/clip_vision/: the transformers folder or "
                                        "the single safetensors file.")),
                io.Combo.Input("text_encoder", options=op.text_encoder_sources(), default=op.DEFAULT_TEXT_ENCODER,
                               tooltip=("A Stable Diffusion 1.5 diffusers folder in models/diffusers/ (only "
                                        "text_encoder/ and tokenizer/ are read), or an SD-1.5 single-file checkpoint "
                                        "in models/checkpoints/ (its text encoder, with ComfyUI's own SD-1 "
                                        "tokenizer).")),
                io.Combo.Input("precision", options=list(op.PRECISIONS), default="auto", tooltip=(
                    "auto: fp16 on GPUs (the official autocast setting), fp32 on CPU. GroupNorm runs in "
                    "fp32 either way.")),
            ],
            outputs=[RestorerID.Output(display_name="restorer_id")],
        )

    @classmethod
    def fingerprint_inputs(cls, checkpoint=op.DEFAULT_CKPT, ip_adapter=op.DEFAULT_IP_ADAPTER,
                           clip_vision=op.DEFAULT_CLIP_VISION, text_encoder=op.DEFAULT_TEXT_ENCODER, precision="auto"):
        # Replaced weights under the same names load again; unchanged files are not re-read.
        sources = op.locate_sources(checkpoint, ip_adapter, clip_vision, text_encoder)
        return tuple(file_fingerprint(path) for *_, path in sources) + (precision,)

    @classmethod
    def validate_inputs(cls, checkpoint=op.DEFAULT_CKPT, ip_adapter=op.DEFAULT_IP_ADAPTER,
                        clip_vision=op.DEFAULT_CLIP_VISION, text_encoder=op.DEFAULT_TEXT_ENCODER, precision=None):
        # Naming these inputs here turns off ComfyUI's own combo check for them: redo it, then say what is missing
        # before the run starts (it used to fail inside the loader).
        if combo_problem(cls, precision=precision):
            return combo_problem(cls, precision=precision)
        for name, value, options in (("checkpoint", checkpoint, op.checkpoint_files()),
                                     ("ip_adapter", ip_adapter, op.ip_adapter_files()),
                                     ("clip_vision", clip_vision, op.clip_vision_sources()),
                                     ("text_encoder", text_encoder, op.text_encoder_sources())):
            if value not in options:
                return f"{name}: {value!r} is not one of the choices ({', '.join(options)})"
        return op.missing_source(op.locate_sources(checkpoint, ip_adapter, clip_vision, text_encoder)) or True

    @classmethod
    def execute(cls, checkpoint, ip_adapter, clip_vision, text_encoder, precision="auto") -> io.NodeOutput:
        return io.NodeOutput(op.load_restorer_id(checkpoint, ip_adapter, clip_vision, text_encoder, precision))


class AdaptiveIDScale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceMend_AdaptiveIDScale", display_name="FaceMend Adaptive ID Scale (RestorerID)",
            category=CATEGORY,
            description=("RestorerID's adaptive ID scale: lambda = exp((alpha - MUSIQ) / beta) from the MUSIQ score of "
                         "the degraded input (wire the IQA score node's mean_score with metric musiq). Low quality "
                         "leans on the reference (MUSIQ 9.5 -> 1.0), good quality hardly (27.6 -> 0.164, 40 -> "
                         "0.047)."),
            inputs=[
                io.Float.Input("musiq", force_input=True, min=0.0, max=100.0, tooltip=(
                    "MUSIQ (KonIQ, 0..100) of the LQ input: wire the IQA score node's mean_score (metric musiq). "
                    "There is no default score: an unwired input is an error.")),
                io.Combo.Input("mode", options=["adaptive", "fixed"], default="adaptive", tooltip=(
                    "adaptive: exp((alpha - musiq) / beta); fixed: always fixed_scale.")),
                io.Float.Input("alpha", default=9.5, min=-100.0, max=100.0, step=0.1, tooltip=(
                    "MUSIQ at which the scale is 1 (official 9.5).")),
                io.Float.Input("beta", default=10.0, min=0.1, max=100.0, step=0.1, tooltip=(
                    "MUSIQ points per factor e (official 10).")),
                io.Float.Input("min_scale", default=0.0, min=0.0, max=10.0, step=0.01, optional=True, tooltip=(
                    "Lower clamp (0: none, as the official code).")),
                io.Float.Input("max_scale", default=0.0, min=0.0, max=10.0, step=0.01, optional=True, tooltip=(
                    "Upper clamp (0: none; the official code lets very bad inputs exceed 1).")),
                io.Float.Input("fixed_scale", default=0.75, min=0.0, max=10.0, step=0.01, optional=True, tooltip=(
                    "The scale in fixed mode (0.75 is what RestorerID was trained with).")),
            ],
            outputs=[io.Float.Output(display_name="id_scale")],
        )

    @classmethod
    def validate_inputs(cls, mode=None):
        # ComfyUI 0.3.64 checks no V3 combo when a prompt is queued: a stale choice is refused here, not mid-run.
        return combo_problem(cls, mode=mode) or True

    @classmethod
    def execute(cls, musiq=None, mode="adaptive", alpha=9.5, beta=10.0, min_scale=0.0, max_scale=0.0,
                fixed_scale=op.FIXED_ID_SCALE) -> io.NodeOutput:
        return io.NodeOutput(*op.adaptive_scale(musiq, mode, alpha, beta, min_scale, max_scale, fixed_scale))


class RestorerIDRestore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceMend_RestorerIDRestore", display_name="FaceMend RestorerID Restore (reference photo)",
            category=CATEGORY,
            description=("Restores aligned face crops (512 px from Detect + Align) with RestorerID, keeping the "
                         "identity of a reference photo of the same person: the official 50-step DDIM sampler with "
                         "CFG 4. The reference face is found with the detector and embedded with the ArcFace model; "
                         "several reference photos (a batch) are averaged. Follow with Color Fix (wavelet) against "
                         "the input crops, as the official inference does."),
            inputs=[
                io.Image.Input("face_crops", tooltip="Aligned face crops (all faces of a batch run together)."),
                RestorerID.Input("restorer_id", tooltip="From the FaceMend RestorerID loader."),
                io.Image.Input("reference", tooltip=("One or more photos of the same person (a batch of same-size "
                                                     "photos); the largest face of each is used.")),
                FaceDetector.Input("detector", tooltip="Finds the face and its 5 landmarks in the reference."),
                FaceID.Input("id_model", tooltip="ArcFace model (w600k_r50.onnx of buffalo_l, as RestorerID uses)."),
                io.Float.Input("id_scale", default=0.75, min=0.0, max=10.0, step=0.01, tooltip=(
                    "Weight of the reference's ID attention, used when scale_mode is fixed, or in auto mode "
                    "when no MUSIQ metric is wired and its weights are not in models/facemend_iqa/ (the "
                    "report then says so).")),
                io.Int.Input("seed", default=42, min=0, max=0xFFFFFFFF, tooltip=(
                    "Seed of the posterior sample, start noise and per-step noise.")),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="DDIM steps (official 50)."),
                io.Float.Input("cfg", default=4.0, min=1.0, max=20.0, step=0.1, tooltip=(
                    "Classifier-free guidance (official 4; 1 runs the conditional branch only, twice as fast).")),
                IQAMetric.Input("musiq_metric", optional=True, tooltip=(
                    "A MUSIQ metric: each face gets its own scale exp((alpha - MUSIQ(face)) / beta) instead of "
                    "id_scale.")),
                io.Float.Input("alpha", default=9.5, min=-100.0, max=100.0, step=0.1, optional=True, tooltip=(
                    "Adaptive scale alpha (with musiq_metric).")),
                io.Float.Input("beta", default=10.0, min=0.1, max=100.0, step=0.1, optional=True, tooltip=(
                    "Adaptive scale beta (with musiq_metric).")),
                # multiline None: no "multiline" key, as the V1 schema (single-line either way)
                io.String.Input("prompt", default=op.DEFAULT_PROMPT, optional=True, multiline=None,
                                tooltip="Positive prompt (official)."),
                io.String.Input("negative_prompt", default=op.DEFAULT_NEGATIVE_PROMPT, optional=True,
                                multiline=None, tooltip="Negative prompt (official)."),
                io.Int.Input("batch_size", default=0, min=0, max=64, optional=True, tooltip=(
                    "Faces per sampler run (0: 1 on CPU, 8 on GPU). Face k always draws its noise from "
                    "seed + k, so the result does not depend on it.")),
                io.Combo.Input("scale_mode", options=list(op.SCALE_MODES), default="auto", optional=True, tooltip=(
                    "auto: the adaptive scale exp((alpha - MUSIQ(face)) / beta) per face from musiq_metric, "
                    "or from MUSIQ's weights in models/facemend_iqa/ when nothing is wired; id_scale only "
                    "when neither is there (named in the report). adaptive: an error without MUSIQ. "
                    "fixed: always id_scale.")),
                io.Combo.Input("color_fix", options=list(op.COLOR_FIXES), default="none", optional=True, tooltip=(
                    "Colour fix against the input crops in the official order (on the unclamped decode, "
                    "then clamp): use wavelet here instead of a following Color Fix node. none: the decode "
                    "clamped to [0,1] (for a Color Fix node after).")),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="Restored face crops."),
                io.String.Output(display_name="report_json", tooltip=(
                    "Per face: ID scale, MUSIQ (when a metric is wired), ArcFace similarity to the reference "
                    "before and after; the reference faces used.")),
            ],
        )

    @classmethod
    def validate_inputs(cls, scale_mode=None, color_fix=None):
        # ComfyUI 0.3.64 checks no V3 combo when a prompt is queued: a stale choice is refused here, not mid-run.
        return combo_problem(cls, scale_mode=scale_mode, color_fix=color_fix) or True

    @classmethod
    def execute(cls, face_crops, restorer_id, reference, detector, id_model, id_scale=0.75, seed=42, steps=50,
                cfg=4.0, musiq_metric=None, alpha=9.5, beta=10.0, prompt=op.DEFAULT_PROMPT,
                negative_prompt=op.DEFAULT_NEGATIVE_PROMPT, batch_size=0, scale_mode="auto",
                color_fix="none") -> io.NodeOutput:
        out, report = op.restore_with_reference(
            face_crops, restorer_id, reference, detector, id_model, id_scale=id_scale, seed=seed, steps=steps,
            cfg=cfg, musiq_metric=musiq_metric, alpha=alpha, beta=beta, prompt=prompt,
            negative_prompt=negative_prompt, batch_size=batch_size, scale_mode=scale_mode, color_fix=color_fix)
        return io.NodeOutput(out, report, ui=preview(out, cls))


NODES = [RestorerIDLoader, AdaptiveIDScale, RestorerIDRestore]
