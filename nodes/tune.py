"""V3 node: per-image tuning -- classic ZSSR super-resolution or the NTIRE 2025 AIIA IQA-guided refinement. What it
computes is ops/tune.py."""
from __future__ import annotations

from ..ops import tune as op
from ..pipelines.tune import MODES
from .api import CATEGORY, FaceID, IQAMetric, io, preview


class PerImageTune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceMend_PerImageTune", display_name="FaceMend Per-Image Tune (ZSSR)", category=CATEGORY,
            description=("Tunes a small network on each image itself (no weights needed). zssr: 'Zero-Shot' "
                         "super-resolution x2/x4 (Shocher et al. 2018), learning from the image's own downscaled "
                         "copies. ntire_tune: same-size refinement as in the NTIRE 2025 AIIA entry, trained on "
                         "identity pairs from the image's multi-scale copies, keeping the best validated output. All "
                         "faces of the batch are tuned together, each with its own network, as many at once as fit "
                         "in the free memory (the report's groups say how many). Slow on a CPU: lower the steps "
                         "there."),
            inputs=[
                io.Image.Input("image", tooltip=("Images or face crops to tune; a batch is tuned together (one "
                                                 "network per image, run as one grouped network).")),
                io.Combo.Input("mode", options=list(MODES), default="zssr", tooltip=(
                    "zssr: classic zero-shot super-resolution (L1, plateau learning-rate policy, self-ensemble, "
                    "back-projection). ntire_tune: same-size refinement on identity pairs (L1 + optional "
                    "NR-IQA losses), best validated step kept, ID guard.")),
                io.Int.Input("scale", default=2, min=2, max=4, step=2, tooltip=(
                    "zssr only: upscale factor, 2 or 4 (x4 = two x2 steps, the paper's gradual SR). "
                    "Ignored by ntire_tune.")),
                io.Int.Input("steps", default=0, min=0, max=20000, tooltip=(
                    "Training iterations (per x2 step for zssr). 0 = the mode's default: zssr up to 3000 with the "
                    "paper's plateau policy, which usually stops earlier; ntire_tune 500. With a number below "
                    "3000 zssr compresses its learning-rate policy into it. On a CPU use 100-300.")),
                io.Float.Input("learning_rate", default=0.001, min=1e-6, max=0.1, step=0.0001, round=False,
                               tooltip="Adam start learning rate (both papers: 0.001)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, tooltip=(
                    "Random seed for weight init, crops and augmentation: same seed, same output.")),
                io.Int.Input("crop_size", default=128, min=16, max=1024, step=8, tooltip=(
                    "Training crop size (both papers: 128). Smaller is faster, e.g. 64 on a CPU.")),
                io.Int.Input("validation_interval", default=100, min=1, max=10000, tooltip=(
                    "ntire_tune: validate the whole image every this many steps and keep the "
                    "best-scoring output. zssr tests its reconstruction error on its own schedule.")),
                io.Float.Input("l1_weight", default=1.0, min=0.0, max=100.0, step=0.01, optional=True, tooltip=(
                    "ntire_tune: weight of the L1 identity loss.")),
                io.Float.Input("clipiqa_weight", default=0.1, min=0.0, max=10.0, step=0.01, optional=True, tooltip=(
                    "ntire_tune: weight of (1 - CLIP-IQA) in the loss (AIIA: 0.1). Used only when a "
                    "CLIP-IQA metric is connected (IQA nodes); otherwise the loss is L1 only and the "
                    "report says so.")),
                io.Float.Input("maniqa_weight", default=0.1, min=0.0, max=10.0, step=0.01, optional=True, tooltip=(
                    "ntire_tune: weight of (1 - MANIQA) in the loss (AIIA: 0.1). Used only when a "
                    "MANIQA metric is connected.")),
                io.Float.Input("id_threshold", default=0.6, min=-1.0, max=1.0, step=0.01, optional=True, tooltip=(
                    "ntire_tune: reject validated outputs whose ID similarity to the input is below this "
                    "(NTIRE gate: 0.3-0.6). Active when an ID model is connected.")),
                io.Int.Input("back_projection_iters", default=10, min=0, max=50, optional=True, tooltip=(
                    "zssr: back-projection iterations at test time (paper: 10; 0 for noisy "
                    "real photos, as the paper's real-image config).")),
                io.Boolean.Input("self_ensemble", default=True, optional=True, tooltip=(
                    "zssr: median of the 8 rotations/flips at test time (8x the test cost).")),
                IQAMetric.Input("clipiqa", optional=True, tooltip=(
                    "ntire_tune: a CLIP-IQA metric (IQA metric loader) for the (1 - CLIP-IQA) loss term and the "
                    "validation score.")),
                IQAMetric.Input("maniqa", optional=True, tooltip=(
                    "ntire_tune: a MANIQA metric (IQA metric loader) for the (1 - MANIQA) loss term and the "
                    "validation score.")),
                FaceID.Input("id_model", optional=True, tooltip=(
                    "ntire_tune: an ID model (ID model loader: AdaFace IR-50 or ArcFace) for the ID guard.")),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip=(
                    "The tuned images (zssr: scale x larger; ntire_tune: same size).")),
                io.String.Output(display_name="report_json", tooltip=(
                    "What ran, per image: iterations, losses, learning-rate changes or best step, seconds.")),
            ],
        )

    @classmethod
    def validate_inputs(cls, mode="zssr", scale=2):
        # Naming mode and scale here turns off ComfyUI's own checks of them: redo those, then refuse what used to
        # fail in the middle of the run (zssr x3).
        if mode not in MODES:
            return f"mode must be one of {', '.join(MODES)}, got {mode!r}"
        if not 2 <= int(scale) <= 4:
            return f"scale must be between 2 and 4, got {scale}"
        return op.refused_scale(mode, scale) or True

    @classmethod
    def execute(cls, image, mode="zssr", scale=2, steps=0, learning_rate=0.001, seed=0, crop_size=128,
                validation_interval=100, l1_weight=1.0, clipiqa_weight=0.1, maniqa_weight=0.1, id_threshold=0.6,
                back_projection_iters=10, self_ensemble=True, clipiqa=None, maniqa=None, id_model=None
                ) -> io.NodeOutput:
        out, report = op.per_image_tune(
            image, mode=mode, scale=scale, steps=steps, learning_rate=learning_rate, seed=seed, crop_size=crop_size,
            validation_interval=validation_interval, l1_weight=l1_weight, clipiqa_weight=clipiqa_weight,
            maniqa_weight=maniqa_weight, id_threshold=id_threshold, back_projection_iters=back_projection_iters,
            self_ensemble=self_ensemble, clipiqa=clipiqa, maniqa=maniqa, id_model=id_model)
        return io.NodeOutput(out, report, ui=preview(out, cls))


NODES = [PerImageTune]
