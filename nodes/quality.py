"""V3 nodes: IQA metric loader and scoring, ID model loader (ArcFace / AdaFace) and ID similarity, best-of
selection, authenticity check. What they compute is ops/quality.py."""
from __future__ import annotations

import torch

from ..host.model_paths import find_optional_file
from ..ops import quality as op
from .api import CATEGORY, combo_problem, FaceAlignment, FaceID, FaceRestorer, IQAMetric, file_fingerprint, io, preview


def _not_in(name: str, value, choices) -> str | None:
    # ComfyUI skips its own combo check for inputs named in validate_inputs: redo it.
    return None if value in choices else f"{name}: '{value}' is not one of {', '.join(map(str, choices))}"


_UNWIRED = object()  # validate_inputs' default for an optional link: the input is not connected


def _linked(*values) -> bool:
    # An input fed by a link reaches validate_inputs as None: its value is known only when the graph runs.
    return any(v is None for v in values)


class IQAMetricLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceMend_IQALoader", display_name="FaceMend IQA Metric Loader", category=CATEGORY,
            description=("Loads a no-reference image-quality metric. niqe needs only niqe_pris_params.npz (12 KB); "
                         "clipiqa / maniqa / musiq are pyiqa's networks (optional 'iqa' extra, non-commercial "
                         "licence) with their weight files in models/facemend_iqa/. Nothing is downloaded."),
            inputs=[
                io.Combo.Input("metric", options=op.metric_names(), default="niqe", tooltip=(
                    "niqe (lower is better), clipiqa, maniqa (0..1), musiq (0..100): the NTIRE 2025 metrics. "
                    "Q-Align (~15 GB GPU memory) is not offered.")),
                io.Combo.Input("weights_file", options=op.iqa_weight_files(), default=op.DEFAULT_FILE, tooltip=(
                    "File in models/facemend_iqa/. default: the metric's official name "
                    "(niqe_pris_params.npz, RN50.pt, ckpt_koniq10k.pt, musiq_koniq_ckpt-e95806b9.pth).")),
                io.Combo.Input("niqe_variant", options=list(op.NIQE_VARIANTS), default="pyiqa", optional=True,
                               tooltip=("niqe only. pyiqa: pyiqa's niqe (YIQ luma), what the NTIRE challenge "
                                        "scored. matlab: BasicSR's calculate_niqe algorithm (YCbCr luma) in double "
                                        "precision.")),
            ],
            outputs=[IQAMetric.Output(display_name="metric")],
        )

    @classmethod
    def validate_inputs(cls, metric="niqe", weights_file=op.DEFAULT_FILE, niqe_variant=None):
        # Before the queue runs: a pyiqa metric without pyiqa installed, or a weights file that is not there.
        if niqe_variant is not None and niqe_variant not in op.NIQE_VARIANTS:
            return _not_in("niqe_variant", niqe_variant, list(op.NIQE_VARIANTS))
        if _linked(metric, weights_file):
            return True
        return (_not_in("metric", metric, op.metric_names())
                or _not_in("weights_file", weights_file, op.iqa_weight_files())
                or op.metric_problem(metric, weights_file) or True)

    @classmethod
    def fingerprint_inputs(cls, metric="niqe", weights_file=op.DEFAULT_FILE, niqe_variant="pyiqa"):
        # New weights under the same file name load again; an unchanged file is not re-read.
        path = find_optional_file(op.IQA_FOLDER, op.metric_file(metric, weights_file))
        return (metric, file_fingerprint(path), niqe_variant)

    @classmethod
    def execute(cls, metric, weights_file=op.DEFAULT_FILE, niqe_variant="pyiqa") -> io.NodeOutput:
        return io.NodeOutput(*op.load_metric(metric, weights_file, niqe_variant))


class IQAScore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceMend_IQAScore", display_name="FaceMend IQA Score", category=CATEGORY,
            description=("Scores every image of the batch with an IQA metric. Outputs the batch mean as FLOAT (wire "
                         "it into e.g. the adaptive ID scale) and a JSON report with each image's score."),
            inputs=[
                io.Image.Input("image", tooltip="Images or face crops to score (NIQE needs at least 96x192)."),
                IQAMetric.Input("metric", tooltip="From the FaceMend IQA metric loader."),
                io.Int.Input("batch_size", default=4, min=1, max=256, optional=True,
                             tooltip="Images per metric call (lower it if the GPU runs out of memory)."),
            ],
            outputs=[
                io.Float.Output(display_name="mean_score",
                                tooltip="Mean score over the batch (see the metric's direction in the report)."),
                io.String.Output(display_name="report_json",
                                 tooltip="metric, lower_better, mean, per-image scores, seconds."),
            ],
        )

    @classmethod
    def execute(cls, image, metric, batch_size=4) -> io.NodeOutput:
        return io.NodeOutput(*op.iqa_score(image, metric, batch_size))


class IDModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = op.id_model_files()
        return io.Schema(
            node_id="FaceMend_IDModelLoader", display_name="FaceMend ID Model Loader (ArcFace / AdaFace)",
            category=CATEGORY,
            description=("Loads a face-recognition model for ID similarity and the ID gate: AdaFace IR-50 "
                         "(adaface_ir50_ms1mv2.ckpt in models/adaface/: the model the NTIRE 2025/2026 challenges "
                         "gate with, aligned as the organisers do) or an ArcFace ONNX from models/insightface/ "
                         "(buffalo_l's w600k_r50.onnx, antelopev2's glintr100.onnx; non-commercial insightface "
                         "models on onnxruntime; a proxy for the challenge's number)."),
            inputs=[
                io.Combo.Input("model", options=files, default=op.id_model_default(files), tooltip=(
                    "adaface_ir50_ms1mv2.ckpt (models/adaface/, the NTIRE gate's model) or an ArcFace "
                    "recognition ONNX under models/insightface/ (e.g. models/buffalo_l/w600k_r50.onnx). "
                    "Detection models of the same packs (det_10g.onnx, scrfd) are refused.")),
            ],
            outputs=[FaceID.Output(display_name="id_model")],
        )

    @classmethod
    def validate_inputs(cls, model=op.DEFAULT_ID_MODEL):
        # A missing file (or onnxruntime for an ArcFace ONNX) is named before the queue runs.
        if _linked(model):
            return True
        return _not_in("model", model, op.id_model_files()) or op.id_model_problem(model) or True

    @classmethod
    def fingerprint_inputs(cls, model=op.DEFAULT_ID_MODEL):
        return file_fingerprint(find_optional_file(op.id_folder(model), model))

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        return io.NodeOutput(*op.load_id_model(model))


class IDSimilarity(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from ..pipelines.quality.ntire_score import ID_THRESHOLDS

        return io.Schema(
            node_id="FaceMend_IDSimilarity", display_name="FaceMend ID Similarity", category=CATEGORY,
            description=("Identity similarity between each input face and its restored version, both warped with "
                         "the input's five landmarks as the NTIRE check does (AdaFace IR-50: the organisers' "
                         "alignment and model, their number; ArcFace: a proxy). Counts faces below the threshold, "
                         "or below the subset's threshold of an NTIRE protocol (which fails a submission with more "
                         "than 10)."),
            inputs=[
                io.Image.Input("input_faces", tooltip="The faces before restoration (aligned crops)."),
                io.Image.Input("restored_faces", tooltip="The same faces after restoration, same size and order."),
                FaceID.Input("id_model", tooltip="From the FaceMend ID model loader."),
                io.Float.Input("threshold", default=0.6, min=-1.0, max=1.0, step=0.01, optional=True, tooltip=(
                    "Low-ID threshold when protocol is custom. NTIRE 2025: CelebA 0.5, LFW / CelebChild 0.6, "
                    "WIDER / WebPhoto 0.3 (2026: WIDER 0.2, WebPhoto 0.25).")),
                FaceAlignment.Input("face_alignment", optional=True, tooltip=(
                    "Optional: the alignment of these crops, whose detected landmarks are then used. "
                    "Without it the crops are taken as FFHQ-aligned (landmarks = the template).")),
                io.Combo.Input("protocol", options=list(op.PROTOCOL_CHOICES), default="custom", optional=True,
                               tooltip=("custom: the threshold above. ntire2025 / ntire2026: the threshold of the "
                                        "subset below in that year's eval.py, and the challenge's rule (more than "
                                        "10 low faces fail).")),
                io.Combo.Input("subset", options=list(ID_THRESHOLDS), default="CelebA", optional=True,
                               tooltip="The NTIRE test subset these faces are from (used with an NTIRE protocol)."),
            ],
            outputs=[
                io.Float.Output(display_name="mean_similarity",
                                tooltip="Mean similarity over the faces (1 = same embedding)."),
                io.Int.Output(display_name="low_id_count", tooltip="Faces whose similarity is below the threshold."),
                io.String.Output(display_name="report_json",
                                 tooltip="Per-face similarity, threshold, low flags, which model and protocol."),
            ],
        )

    @classmethod
    def validate_inputs(cls, protocol=None, subset=None):
        # ComfyUI 0.3.64 checks no V3 combo when a prompt is queued: a stale choice is refused here, not mid-run.
        return combo_problem(cls, protocol=protocol, subset=subset) or True

    @classmethod
    def execute(cls, input_faces, restored_faces, id_model, threshold=0.6, face_alignment=None, protocol="custom",
                subset="CelebA") -> io.NodeOutput:
        return io.NodeOutput(*op.id_similarity(input_faces, restored_faces, id_model, threshold, face_alignment,
                                               protocol, subset))


class BestOf(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceMend_BestOf", display_name="FaceMend Best-Of Selection", category=CATEGORY,
            description=("Picks, per face, the best of several candidate restorations by an IQA metric, among the "
                         "candidates whose identity stays close to the input (when an ID model and the input faces "
                         "are connected). If no candidate of a face passes the ID gate, the one with the highest ID "
                         "similarity is taken and the report says so."),
            inputs=[
                io.Image.Input("candidates_1", tooltip="First candidate batch (e.g. restorer A's faces)."),
                io.Image.Input("candidates_2",
                               tooltip="Second candidate batch: the same faces, same size and order."),
                IQAMetric.Input("metric", tooltip=("Quality metric deciding between candidates (its direction is "
                                                   "respected: NIQE lower, others higher).")),
                io.Image.Input("candidates_3", optional=True, tooltip="Optional third candidate batch."),
                io.Image.Input("candidates_4", optional=True, tooltip="Optional fourth candidate batch."),
                io.Image.Input("input_faces", optional=True,
                               tooltip="The faces before restoration, for the ID gate."),
                FaceID.Input("id_model", optional=True, tooltip=(
                    "ID model (ID model loader: AdaFace IR-50, the NTIRE gate's, or an ArcFace proxy) for the ID "
                    "gate (needs input_faces).")),
                io.Float.Input("id_threshold", default=0.6, min=-1.0, max=1.0, step=0.01, optional=True,
                               tooltip="Candidates whose ID similarity to the input is below this are not chosen."),
            ],
            outputs=[
                io.Image.Output(display_name="best", tooltip="One image per face: the chosen candidate."),
                io.String.Output(display_name="report_json", tooltip=(
                    "Per face: every candidate's score (and ID similarity), the choice, the gate result.")),
            ],
        )

    @classmethod
    def validate_inputs(cls, input_faces=_UNWIRED, id_model=_UNWIRED):
        # The ID gate takes both or neither, said when the prompt is queued (a wired input arrives here as None,
        # an unwired one not at all). A host that passed neither would leave the check to the run, as before.
        if (input_faces is _UNWIRED) != (id_model is _UNWIRED):
            return "the ID gate needs both input_faces and id_model (connect both or neither)"
        return True

    @classmethod
    def execute(cls, candidates_1, candidates_2, metric, candidates_3=None, candidates_4=None, input_faces=None,
                id_model=None, id_threshold=0.6) -> io.NodeOutput:
        best, report = op.best_of(candidates_1, candidates_2, metric, candidates_3, candidates_4, input_faces,
                                  id_model, id_threshold)
        return io.NodeOutput(best, report, ui=preview(best, cls))


class Authenticity(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceMend_Authenticity", display_name="FaceMend Authenticity Check (f(f(x)))",
            category=CATEGORY,
            description=("Authenticity check (IDM, ICCV 2023): restores the faces, then restores the result again, "
                         "and reports whether the second pass keeps or improves quality and how far the identity "
                         "drifts between f(x) and f(f(x)). An authentic restorer should be (nearly) idempotent."),
            inputs=[
                io.Image.Input("face_crops", tooltip="Aligned faces to restore (as for Restore Faces)."),
                FaceRestorer.Input("restorer", tooltip="From the FaceMend face restorer loader."),
                IQAMetric.Input("metric", tooltip="Quality metric for f(x) and f(f(x))."),
                FaceID.Input("id_model", optional=True, tooltip=(
                    "ID model (ID model loader: AdaFace IR-50 or an ArcFace proxy) for the identity drift.")),
                io.Float.Input("fidelity", default=0.5, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="CodeFormer's w (ignored by GFPGAN)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, optional=True, tooltip="Seed of both passes."),
            ],
            outputs=[
                io.Image.Output(display_name="restored", tooltip="f(x)"),
                io.Image.Output(display_name="restored_twice", tooltip="f(f(x))"),
                io.Float.Output(display_name="quality_gain", tooltip=(
                    "Mean score(f(f(x))) - score(f(x)), positive = better (metric's direction respected).")),
                io.Float.Output(display_name="id_drift",
                                tooltip="Mean 1 - ID similarity(f(x), f(f(x))); 0 without an ID model."),
                io.String.Output(display_name="report_json",
                                 tooltip="Per face: scores of x, f(x), f(f(x)), ID similarities, authentic flag."),
            ],
        )

    @classmethod
    def execute(cls, face_crops, restorer, metric, id_model=None, fidelity=0.5, seed=0) -> io.NodeOutput:
        out = op.check_authenticity(face_crops, restorer, metric, id_model, fidelity, seed)
        fx, ffx = out[0], out[1]
        # Each face's f(x) beside its f(f(x)): what the check compares, side by side.
        shown = torch.cat([fx, ffx], dim=2) if fx.shape[0] else fx
        return io.NodeOutput(*out, ui=preview(shown, cls))


NODES = [IQAMetricLoader, IQAScore, IDModelLoader, IDSimilarity, BestOf, Authenticity]
