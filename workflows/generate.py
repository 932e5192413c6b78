"""Writes the shipped workflows from one description per graph, so UI and API files cannot drift apart. A test
regenerates them and compares with the committed files.

    example_workflows/<name>.json   UI graphs (ComfyUI's templates browser lists this folder; drag into ComfyUI):
                                    loaders above the chain, a group per stage, a Note listing the model files.
    workflows/api/<name>.json       API graphs (POST to /prompt; `python -m facemend api`).
    workflows/<name>.json, workflows/<name>_api.json
                                    the first three graphs as shipped before (public API: links and scripts
                                    point at them), written byte-identically by the legacy writer below.

To add a graph, add an entry to WORKFLOWS (node ids, widgets by name, links) and, when it has a loader this file
does not know, a row in NOTE_MODELS. Positions, groups and the Note are computed.

    python workflows/generate.py      # rewrite every file after changing a graph below

It reads the node schemas from FaceMend's V3 node classes, which import ComfyUI's node API: it runs only where
ComfyUI is importable ($COMFYUI_DIR, or the pinned checkout fetched by tests/fetch_official.py, with its
requirements installed by tests/setup_comfyui.py); elsewhere it exits with the command to run.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Widget order of the ComfyUI core nodes we use (their INPUT_TYPES need ComfyUI to import).
CORE_WIDGETS = {
    "LoadImage": [("image", "COMBO"), ("upload", "IMAGEUPLOAD")],
    "SaveImage": [("filename_prefix", "STRING")],
    "ImageScaleBy": [("upscale_method", "COMBO"), ("scale_by", "FLOAT")],
}
CORE_OUTPUTS = {"LoadImage": [("IMAGE", "IMAGE"), ("MASK", "MASK")], "SaveImage": [],
                "ImageScaleBy": [("IMAGE", "IMAGE")]}
CORE_LINK_INPUTS = {"LoadImage": [], "SaveImage": [("images", "IMAGE")], "ImageScaleBy": [("image", "IMAGE")]}

# LoadImage -> embedded detector -> detect + align: nodes 1-3 of every shipped graph.
_DETECT_NODES = {
    1: ("LoadImage", {"image": "example.png", "upload": "image"}, {}),
    2: ("FaceMend_DetectorLoader", {"model": "mtcnn (embedded)", "precision": "fp32", "anchors": "auto"}, {}),
    3: ("FaceMend_DetectAlign", {"selection": "all", "face_index": 0, "score_threshold": 0.8, "min_face_size": 16,
                                 "max_faces": 0, "crop_size": 512, "detect_max_side": 1600, "border": "constant",
                                 "interpolation": "bilinear", "crop_geometry": "ffhq"},
        {"image": (1, 0), "detector": (2, 0)}),
}
# The demo crops each face's own pixels (no resampling) for ZSSR, pasted onto the x2 bicubic photo.
_NATIVE_DETECT_NODES = {**_DETECT_NODES, 3: (_DETECT_NODES[3][0], {**_DETECT_NODES[3][1], "interpolation": "bicubic",
                                                                   "crop_geometry": "native"}, _DETECT_NODES[3][2])}

# Each workflow: node id -> (class_type, widget values by name, links by input name -> (node id, output slot)).
WORKFLOWS = {
    "facemend_demo": {
        "title": "FaceMend demo: x2 face super-resolution with no model files: detect -> native face crops -> "
                 "ZSSR x2 -> colour fix -> paste onto the x2 bicubic photo",
        "nodes": {
            **_NATIVE_DETECT_NODES,
            4: ("FaceMend_PerImageTune", {"mode": "zssr", "scale": 2, "steps": 200, "learning_rate": 0.001,
                                          "seed": 0, "crop_size": 64, "validation_interval": 100,
                                          "l1_weight": 1.0, "clipiqa_weight": 0.1, "maniqa_weight": 0.1,
                                          "id_threshold": 0.6, "back_projection_iters": 10,
                                          "self_ensemble": False},
                {"image": (3, 0)}),
            5: ("FaceMend_ColorFix", {"method": "wavelet", "strength": 1.0},
                {"image": (4, 0), "reference": (3, 0)}),
            6: ("ImageScaleBy", {"upscale_method": "bicubic", "scale_by": 2.0}, {"image": (1, 0)}),
            7: ("FaceMend_PasteBack", {"feather": 0.1, "margin": 0.04, "interpolation": "bicubic"},
                {"image": (6, 0), "face_crops": (5, 0), "alignment": (3, 1)}),
            8: ("SaveImage", {"filename_prefix": "facemend_demo"}, {"images": (7, 0)}),
        },
    },
    "facemend_fast": {
        "title": "FaceMend fast: detect -> GFPGAN -> wavelet colour fix against the input faces -> paste back",
        "nodes": {
            **_DETECT_NODES,
            4: ("FaceMend_RestorerLoader", {"model": "GFPGANv1.4.pth", "precision": "auto"}, {}),
            5: ("FaceMend_RestoreFaces", {"visibility": 1.0, "fidelity": 0.5, "batch_size": 0, "seed": 0},
                {"face_crops": (3, 0), "restorer": (4, 0)}),
            6: ("FaceMend_ColorFix", {"method": "wavelet", "strength": 1.0},
                {"image": (5, 0), "reference": (3, 0)}),
            7: ("FaceMend_PasteBack", {"feather": 0.1, "margin": 0.04, "interpolation": "bilinear"},
                {"image": (1, 0), "face_crops": (6, 0), "alignment": (3, 1)}),
            8: ("SaveImage", {"filename_prefix": "facemend_fast"}, {"images": (7, 0)}),
        },
    },
    "facemend_ntire": {
        "title": "FaceMend ntire: detect -> GFPGAN -> TSD-SR one-step refinement (scale 1) -> wavelet colour fix "
                 "against the GFPGAN output -> paste back",
        "nodes": {
            **_DETECT_NODES,
            4: ("FaceMend_RestorerLoader", {"model": "GFPGANv1.4.pth", "precision": "auto"}, {}),
            5: ("FaceMend_RestoreFaces", {"visibility": 1.0, "fidelity": 0.5, "batch_size": 0, "seed": 0},
                {"face_crops": (3, 0), "restorer": (4, 0)}),
            6: ("FaceMend_OneStepSRLoader", {"backend": "tsdsr", "base_model": "stable-diffusion-3-medium-diffusers",
                                             "lora": "tsdsr", "precision": "auto", "prompt": ""}, {}),
            7: ("FaceMend_OneStepSR", {"scale": 1, "tile_size": 0, "tile_overlap": -1, "seed": 0,
                                       "blend": "gaussian", "vae_tile_size": 1024, "max_batch": 4},
                {"image": (5, 0), "sr_model": (6, 0)}),
            8: ("FaceMend_ColorFix", {"method": "wavelet", "strength": 1.0},
                {"image": (7, 0), "reference": (5, 0)}),
            9: ("FaceMend_PasteBack", {"feather": 0.1, "margin": 0.04, "interpolation": "bilinear"},
                {"image": (1, 0), "face_crops": (8, 0), "alignment": (3, 1)}),
            10: ("SaveImage", {"filename_prefix": "facemend_ntire"}, {"images": (9, 0)}),
        },
    },
    "facemend_ntire_full": {
        "title": "FaceMend ntire_full: the full NTIRE 2025 AIIA chain: detect -> GFPGAN v1.3 -> TSD-SR one-step "
                 "refinement (scale 1) -> IQA-guided per-image tuning (L1 + CLIP-IQA + MANIQA losses, ID guard, best "
                 "validated step kept) -> wavelet colour fix against the GFPGAN output -> paste back",
        "nodes": {
            **_DETECT_NODES,
            4: ("FaceMend_RestorerLoader", {"model": "GFPGANv1.3.pth", "precision": "auto"}, {}),
            5: ("FaceMend_RestoreFaces", {"visibility": 1.0, "fidelity": 0.5, "batch_size": 0, "seed": 0},
                {"face_crops": (3, 0), "restorer": (4, 0)}),
            6: ("FaceMend_OneStepSRLoader", {"backend": "tsdsr", "base_model": "stable-diffusion-3-medium-diffusers",
                                             "lora": "tsdsr", "precision": "auto", "prompt": ""}, {}),
            7: ("FaceMend_OneStepSR", {"scale": 1, "tile_size": 0, "tile_overlap": -1, "seed": 0,
                                       "blend": "gaussian", "vae_tile_size": 1024, "max_batch": 4},
                {"image": (5, 0), "sr_model": (6, 0)}),
            8: ("FaceMend_IQALoader", {"metric": "clipiqa", "weights_file": "default", "niqe_variant": "pyiqa"},
                {}),
            9: ("FaceMend_IQALoader", {"metric": "maniqa", "weights_file": "default", "niqe_variant": "pyiqa"},
                {}),
            10: ("FaceMend_IDModelLoader", {"model": "models/buffalo_l/w600k_r50.onnx"}, {}),
            11: ("FaceMend_PerImageTune", {"mode": "ntire_tune", "scale": 2, "steps": 0, "learning_rate": 0.001,
                                           "seed": 0, "crop_size": 128, "validation_interval": 100,
                                           "l1_weight": 1.0, "clipiqa_weight": 0.1, "maniqa_weight": 0.1,
                                           "id_threshold": 0.6, "back_projection_iters": 10, "self_ensemble": False},
                 {"image": (7, 0), "clipiqa": (8, 0), "maniqa": (9, 0), "id_model": (10, 0)}),
            12: ("FaceMend_ColorFix", {"method": "wavelet", "strength": 1.0},
                 {"image": (11, 0), "reference": (5, 0)}),
            13: ("FaceMend_PasteBack", {"feather": 0.1, "margin": 0.04, "interpolation": "bilinear"},
                 {"image": (1, 0), "face_crops": (12, 0), "alignment": (3, 1)}),
            14: ("SaveImage", {"filename_prefix": "facemend_ntire_full"}, {"images": (13, 0)}),
        },
    },
    "facemend_osdface": {
        "title": "FaceMend osdface: detect -> align (512) -> OSDFace one-step face diffusion (SD-2.1-base + LoRA, "
                 "prompt tokens from the face) -> wavelet colour fix against the input faces -> paste back",
        "nodes": {
            **_DETECT_NODES,
            4: ("FaceMend_OSDFaceLoader", {"base_model": "stable-diffusion-2-1-base", "osdface_folder": "osdface",
                                           "precision": "auto", "lora_mode": "merged", "tokens": "embedding change",
                                           "latent": "sample"}, {}),
            5: ("FaceMend_OneStepSR", {"scale": 1, "tile_size": 0, "tile_overlap": -1, "seed": 0,
                                       "blend": "gaussian", "vae_tile_size": 1024, "max_batch": 4},
                {"image": (3, 0), "sr_model": (4, 0)}),
            6: ("FaceMend_ColorFix", {"method": "wavelet", "strength": 1.0},
                {"image": (5, 0), "reference": (3, 0)}),
            7: ("FaceMend_PasteBack", {"feather": 0.1, "margin": 0.04, "interpolation": "bilinear"},
                {"image": (1, 0), "face_crops": (6, 0), "alignment": (3, 1)}),
            8: ("SaveImage", {"filename_prefix": "facemend_osdface"}, {"images": (7, 0)}),
        },
    },
    "facemend_adapt": {
        "title": "FaceMend adapt: fine-tune GFPGAN on a folder of your aligned faces (diffusion-prior pseudo "
                 "targets), then restore a photo with the adapted model",
        "nodes": {
            **_DETECT_NODES,
            4: ("FaceMend_RestorerLoader", {"model": "GFPGANv1.4.pth", "precision": "fp32"}, {}),
            5: ("FaceMend_DiffusionPriorLoader", {"model": "iddpm_ffhq512_ema500000.pth"}, {}),
            6: ("FaceMend_AdaptRestorer", {"name": "my_album", "steps": 2000, "learning_rate": 2e-5,
                                           "lpips_weight": 0.1, "micro_batch": 4, "accumulate": 4,
                                           "checkpoint_every": 250, "precision": "fp32", "start_step": 150,
                                           "reg_end_step": 90, "down_factor": 8, "apply_filter": True,
                                           "seed": 20000, "respacing": "250", "clip_denoised": True,
                                           "folder": "album_faces", "gan_weight": 0.0,
                                           "gan_real_folder": ""},
                {"restorer": (4, 0), "prior": (5, 0)}),
            7: ("FaceMend_RestoreFaces", {"visibility": 1.0, "fidelity": 0.5, "batch_size": 0, "seed": 0},
                {"face_crops": (3, 0), "restorer": (6, 2)}),
            8: ("FaceMend_PasteBack", {"feather": 0.1, "margin": 0.04, "interpolation": "bilinear"},
                {"image": (1, 0), "face_crops": (7, 0), "alignment": (3, 1)}),
            9: ("SaveImage", {"filename_prefix": "facemend_adapt"}, {"images": (8, 0)}),
            10: ("SaveImage", {"filename_prefix": "facemend_adapt_loss"}, {"images": (6, 1)}),
        },
    },
    "facemend_id_preserve": {
        "title": "FaceMend id_preserve: detect -> align -> RestorerID with a reference photo of the person and the "
                 "adaptive ID scale exp((9.5 - MUSIQ)/10) per face -> wavelet colour fix -> paste back",
        "note": "Load a photo of the same person (any size; the largest face is used) in the second LoadImage: "
                "it is RestorerID's reference.",
        "nodes": {
            **_DETECT_NODES,
            # The reference photo: example.png (ComfyUI ships it) so the template opens without a missing-file warning;
            # the Note and the README say to load a photo of the same person here.
            4: ("LoadImage", {"image": "example.png", "upload": "image"}, {}),
            5: ("FaceMend_IDModelLoader", {"model": "models/buffalo_l/w600k_r50.onnx"}, {}),
            6: ("FaceMend_IQALoader", {"metric": "musiq", "weights_file": "default", "niqe_variant": "pyiqa"},
                {}),
            7: ("FaceMend_RestorerIDLoader", {"checkpoint": "RestorerIDFull.ckpt",
                                              "ip_adapter": "ip-adapter-faceid-plus_sd15.bin",
                                              "clip_vision": "CLIP-ViT-H-14-laion2B-s32B-b79K",
                                              "text_encoder": "stable-diffusion-v1-5", "precision": "auto"}, {}),
            8: ("FaceMend_RestorerIDRestore", {"id_scale": 0.75, "seed": 42, "steps": 50, "cfg": 4.0, "alpha": 9.5,
                                               "beta": 10.0, "prompt": "best quality, high quality",
                                               "negative_prompt": "cartoon, 3d, paint, monochrome, lowres, bad "
                                                                  "anatomy, worst quality, low quality",
                                               "batch_size": 0, "color_fix": "wavelet", "scale_mode": "auto"},
                # the wavelet fix inside the node: on the unclamped decode, then the clamp (the official order)
                {"face_crops": (3, 0), "restorer_id": (7, 0), "reference": (4, 0), "detector": (2, 0),
                 "id_model": (5, 0), "musiq_metric": (6, 0)}),
            10: ("FaceMend_PasteBack", {"feather": 0.1, "margin": 0.04, "interpolation": "bilinear"},
                 {"image": (1, 0), "face_crops": (8, 0), "alignment": (3, 1)}),
            11: ("SaveImage", {"filename_prefix": "facemend_id_preserve"}, {"images": (10, 0)}),
        },
    },
}


def _node_classes() -> dict:
    """node id -> the node's schema as ComfyUI serves it (/object_info: a V3 class's GET_NODE_INFO_V1(); during the
    migration, a dictionary-API class's as ComfyUI's server builds it). FaceMend's nodes are V3 nodes that import
    ComfyUI's node API, so this runs only where ComfyUI is importable: $COMFYUI_DIR or the pinned checkout
    (`python tests/fetch_official.py Comfy-Org/ComfyUI`) with its requirements (`python tests/setup_comfyui.py`)."""
    if str(HERE.parent / "tests") not in sys.path:
        sys.path.insert(0, str(HERE.parent / "tests"))
    import conftest  # registers this checkout as `facemend` (and finds ComfyUI as the tests do)
    from node_specs import node_infos

    found = conftest.comfyui_dir()
    if found is None:
        raise SystemExit("workflows/generate.py " + conftest.comfyui_skip_reason())
    if str(found) not in sys.path:
        sys.path.append(str(found))
    import facemend.nodes

    return node_infos(facemend.nodes)


def _specs(info) -> dict:
    return {**info["input"].get("required", {}), **info["input"].get("optional", {})}


def _schema(class_type, classes):
    """(widgets [(name, type)], link inputs [(name, type)], outputs [(name, type)]) in ComfyUI's order."""
    from node_specs import kind

    if class_type in CORE_WIDGETS:
        return CORE_WIDGETS[class_type], CORE_LINK_INPUTS[class_type], CORE_OUTPUTS[class_type]
    info = classes[class_type]
    widgets, links = [], []
    for name, s in _specs(info).items():
        k = kind(s)  # V1 writes a combo as its list of choices, V3 as "COMBO"
        (widgets if k in ("COMBO", "INT", "FLOAT", "STRING", "BOOLEAN") else links).append((name, k))
    return widgets, links, list(zip(info["output_name"], info["output"]))


def _has_control_widget(class_type, name, kind, classes) -> bool:
    """ComfyUI's frontend adds a 'control after generate' widget after INT inputs named seed/noise_seed or
    flagged control_after_generate, and reads two widgets_values for them (a UI file without the second
    value loads with every later widget shifted by one)."""
    if kind != "INT" or class_type not in classes:
        return False
    opts = _specs(classes[class_type])[name]
    return bool(len(opts) > 1 and opts[1].get("control_after_generate")) or name in ("seed", "noise_seed")


def api_format(wf, classes) -> dict:
    out = {}
    for nid, (ctype, widgets, links) in wf["nodes"].items():
        inputs = {}
        for name, _ in _schema(ctype, classes)[0]:
            if name in widgets and name != "upload":
                inputs[name] = widgets[name]
        for name, (src, slot) in links.items():
            inputs[name] = [str(src), slot]
        out[str(nid)] = {"class_type": ctype, "inputs": inputs, "_meta": {"title": ctype}}
    return out


def legacy_ui_format(wf, classes) -> dict:
    """The UI layout shipped before example_workflows/ (one row), kept for the legacy workflows/*.json files."""
    nodes, link_rows, link_id = [], [], 0
    out_links: dict = {}
    order = list(wf["nodes"])
    for nid, (ctype, widgets, links) in wf["nodes"].items():
        w_spec, l_spec, _ = _schema(ctype, classes)
        types = dict(l_spec)
        inputs = []
        for name, kind in l_spec:
            link = None
            if name in links:
                link_id += 1
                src, slot = links[name]
                src_type = _schema(wf["nodes"][src][0], classes)[2][slot][1]
                link_rows.append([link_id, src, slot, nid, len(inputs), src_type])
                out_links.setdefault((src, slot), []).append(link_id)
                link = link_id
            inputs.append({"name": name, "type": types[name], "link": link})
        values = []
        for n, kind in w_spec:
            values.append(widgets.get(n))
            if _has_control_widget(ctype, n, kind, classes):
                values.append("fixed")  # the frontend's "control after generate" widget takes the next slot
        nodes.append({"id": nid, "type": ctype, "widgets": values, "inputs": inputs})
    result = []
    for i, n in enumerate(nodes):
        outputs = [{"name": name, "type": kind, "links": out_links.get((n["id"], slot), []), "slot_index": slot}
                   for slot, (name, kind) in enumerate(_schema(n["type"], classes)[2])]
        result.append({"id": n["id"], "type": n["type"], "pos": [60 + 340 * order.index(n["id"]), 120 + 40 * (i % 2)],
                       "size": [315, 180], "flags": {}, "order": i, "mode": 0, "inputs": n["inputs"],
                       "outputs": outputs, "properties": {"Node name for S&R": n["type"]},
                       "widgets_values": n["widgets"]})
    return {"last_node_id": max(wf["nodes"]), "last_link_id": link_id, "nodes": result, "links": link_rows,
            "groups": [], "config": {}, "extra": {"facemend_title": wf["title"]}, "version": 0.4}


REGISTRY_ID = "facemend"  # the Comfy registry id (pyproject [project] name), as ComfyUI saves it per node
CORE_REGISTRY = ("comfy-core", "0.3.64")
LEGACY: tuple = ()  # also written in the pre-0.2 places and layout

# What each loader input needs on disk: (class_type, input) -> models/ folder, or a callable(value) -> text|None.
NOTE_MODELS = {
    ("FaceMend_DetectorLoader", "model"): lambda v: None if "embedded" in v else f"models/facedetection/{v}",
    ("FaceMend_RestorerLoader", "model"): lambda v: f"models/facerestore_models/{v}",
    ("FaceMend_OneStepSRLoader", "base_model"): lambda v: (f"models/diffusers/{v}/ (the diffusers folder; or "
                                                           f"sd3_medium.safetensors in models/checkpoints/)"),
    ("FaceMend_OneStepSRLoader", "lora"): lambda v: f"models/onestep_sr/{v}" + ("/" if "." not in v else ""),
    ("FaceMend_OSDFaceLoader", "base_model"): lambda v: f"models/diffusers/{v}/ (SD-2.1-base: unet, vae, scheduler)",
    ("FaceMend_OSDFaceLoader", "osdface_folder"): lambda v: (f"models/onestep_sr/{v}/ (pytorch_lora_weights."
                                                             "safetensors, embedding_change_weights.pth, "
                                                             "associate_2.ckpt)"),
    ("FaceMend_IQALoader", "metric"): lambda v: {
        "niqe": "models/facemend_iqa/niqe_pris_params.npz", "clipiqa": "models/facemend_iqa/RN50.pt (CLIP-IQA)",
        "maniqa": "models/facemend_iqa/ckpt_koniq10k.pt (MANIQA)",
        "musiq": "models/facemend_iqa/musiq_koniq_ckpt-e95806b9.pth"}.get(v, f"models/facemend_iqa/ ({v})"),
    ("FaceMend_IDModelLoader", "model"): lambda v: f"models/insightface/{v} (ArcFace)",
    ("FaceMend_RestorerIDLoader", "checkpoint"): lambda v: f"models/restorer_id/{v} (RestorerID)",
    ("FaceMend_RestorerIDLoader", "ip_adapter"): lambda v: f"models/ipadapter/{v}",
    ("FaceMend_RestorerIDLoader", "clip_vision"): lambda v: f"models/clip_vision/{v}/",
    ("FaceMend_RestorerIDLoader", "text_encoder"): lambda v: f"models/diffusers/{v}/ (its text encoder)",
    ("FaceMend_DiffusionPriorLoader", "model"): lambda v: f"models/facemend_priors/{v} (DifFace prior)",
    ("FaceMend_AdaptRestorer", "lpips_weight"): lambda v: ("models/facemend_priors/vgg16-397923af.pth (LPIPS; not "
                                                          "needed with lpips_weight 0)") if v else None,
}

STAGE_TITLES = {
    "LoadImage": "Input", "FaceMend_DetectAlign": "Detect + align", "FaceMend_RestoreFaces": "Restore (coarse)",
    "FaceMend_OneStepSR": "One-step diffusion SR", "FaceMend_PerImageTune": "Per-image tuning",
    "FaceMend_ColorFix": "Colour fix", "FaceMend_PasteBack": "Paste back", "SaveImage": "Save",
    "ImageScaleBy": "Upscale photo", "FaceMend_AdaptRestorer": "Adapt the restorer",
    "FaceMend_RestorerIDRestore": "Identity restore (RestorerID)",
}
GROUP_COLORS = ("#3f789e", "#8A8", "#a1309b", "#b06634", "#88A", "#b58b2a", "#A88", "#444")

# NODE_W: the frontend widens a node to fit its widget labels and values (up to ~380 px for the one-step loader).
# NODE_TITLE: the title bar is drawn above a node's pos; GROUP_TITLE: a group's title band (font 24 -> 34 px).
NODE_W, GAP_X, GAP_Y, GROUP_PAD, GROUP_TITLE, NODE_TITLE = 400, 70, 50, 15, 44, 30
NOTE_W = 380


def node_size(class_type, classes) -> list:
    """A size that holds the node's slots and widgets as ComfyUI's frontend draws them (title 30 px, a slot row
    20 px, a widget row 24 px), so that the file's boxes are the boxes on screen."""
    if class_type == "Note":
        return [NOTE_W, 220]
    widgets, links, outputs = _schema(class_type, classes)
    n_widgets = len(widgets) - sum(1 for _, k in widgets if k == "IMAGEUPLOAD")
    height = 30 + 20 * max(len(links), len(outputs)) + 24 * n_widgets + 16
    if class_type == "LoadImage":
        height += 260  # the image preview
    return [NODE_W, height]


def _is_loader(nid, wf) -> bool:
    ctype, _, links = wf["nodes"][nid]
    return not links and ctype != "LoadImage"


def layout(wf, classes) -> tuple[dict, list, int]:
    """Positions {node id: (x, y, w, h)}, groups and the Note's height: the processing chain in one row of
    columns (by depth of the graph), each loader in the column of the node it feeds, above the chain; one group
    per column (stage)."""
    nodes = wf["nodes"]
    chain = [n for n in nodes if not _is_loader(n, wf)]
    depth: dict = {}

    def d(n):
        if n not in depth:
            srcs = [src for src, _ in nodes[n][2].values() if not _is_loader(src, wf)]
            depth[n] = 1 + max((d(src) for src in srcs), default=-1)
        return depth[n]

    for n in chain:
        d(n)
    columns: dict = {}
    for n in chain:
        columns.setdefault(depth[n], []).append(n)
    loaders_of: dict = {}
    for n in nodes:
        if _is_loader(n, wf):
            consumers = [m for m in chain if any(src == n for src, _ in nodes[m][2].values())]
            col = min((depth[m] for m in consumers), default=0)
            loaders_of.setdefault(col, []).append(n)
    sizes = {n: node_size(nodes[n][0], classes) for n in nodes}
    loader_row_h = max((sum(sizes[n][1] for n in ls) + GAP_Y * (len(ls) - 1) for ls in loaders_of.values()),
                       default=0)
    top = GROUP_TITLE + NODE_TITLE
    chain_y = top + loader_row_h + (GAP_Y + NODE_TITLE if loader_row_h else 0)
    pos, groups = {}, []
    x = NOTE_W + GAP_X  # the Note sits left of the graph
    for col in sorted(columns):
        y = top
        for n in loaders_of.get(col, []):
            pos[n] = (x, y, *sizes[n])
            y += sizes[n][1] + GAP_Y
        y = chain_y
        for n in columns[col]:
            pos[n] = (x, y, *sizes[n])
            y += sizes[n][1] + GAP_Y
        members = loaders_of.get(col, []) + columns[col]
        y0 = min(pos[n][1] for n in members)
        y1 = max(pos[n][1] + pos[n][3] for n in members)
        title = " + ".join(dict.fromkeys(STAGE_TITLES.get(nodes[n][0], nodes[n][0].removeprefix("FaceMend_"))
                                         for n in columns[col]))
        groups.append({"title": title, "bounding": [x - GROUP_PAD, y0 - NODE_TITLE - GROUP_TITLE, NODE_W + 2 * GROUP_PAD,
                                                    y1 - y0 + NODE_TITLE + GROUP_TITLE + GROUP_PAD],
                       "color": GROUP_COLORS[len(groups) % len(GROUP_COLORS)], "font_size": 24, "flags": {}})
        x += NODE_W + GAP_X
    note_h = max(chain_y + max(sizes[n][1] for n in columns[0]) - top, 220)
    return pos, groups, note_h


def top_of_chain(pos) -> int:
    """The y of the topmost node, where the Note starts too."""
    return min(y for _, y, _, _ in pos.values())


def model_note(wf) -> str:
    lines = []
    for nid, (ctype, widgets, _) in wf["nodes"].items():
        known = False
        for (cls, name), where in NOTE_MODELS.items():
            if cls == ctype and name in widgets:
                known = True
                text = where(widgets[name])
                if text and text not in lines:
                    lines.append(text)
        if not known and _is_loader(nid, wf):  # a loader without a NOTE_MODELS row still gets a line
            lines.append(f"{ctype}: the files named in its widgets (the README's model table says where)")
    head = wf["title"] + "\n\n"
    if not lines:
        return head + ("Model files: none. Everything this graph needs ships with the pack (the embedded MTCNN "
                       "detector; ZSSR learns from the photo itself).\n\nPut a photo in LoadImage and press Queue.")
    return head + ("Model files this graph needs, in your ComfyUI folder (sources and licences: the README's "
                   "model table; a missing file is named in the error):\n" + "\n".join("- " + t for t in lines)
                   + ("\n\n" + wf["note"] if wf.get("note") else "") + "\n\nPut a photo in LoadImage and press Queue.")


def ui_format(wf, classes, version: str) -> dict:
    """The UI graph ComfyUI's frontend saves: laid out by layout(), with groups, a Note and per-node registry ids."""
    legacy = legacy_ui_format(wf, classes)  # slots, links and widget values are the same; only placement differs
    pos, groups, note_h = layout(wf, classes)
    for node in legacy["nodes"]:
        x, y, w, h = pos[node["id"]]
        node["pos"], node["size"] = [x, y], [w, h]
        core = node["type"] in CORE_WIDGETS
        node["properties"] = {"cnr_id": CORE_REGISTRY[0] if core else REGISTRY_ID,
                              "ver": CORE_REGISTRY[1] if core else version,
                              "Node name for S&R": node["type"]}
    note_id = max(wf["nodes"]) + 1
    legacy["nodes"].append({"id": note_id, "type": "Note", "pos": [0, top_of_chain(pos)], "size": [NOTE_W, note_h],
                            "flags": {}, "order": len(legacy["nodes"]), "mode": 0, "inputs": [], "outputs": [],
                            "properties": {}, "widgets_values": [model_note(wf)], "color": "#432", "bgcolor": "#653"})
    legacy["last_node_id"] = note_id
    legacy["groups"] = groups
    # Opening view: clear of the frontend's left sidebar and top bar (1.2x+), readable at 75%.
    legacy["extra"]["ds"] = {"scale": 0.75, "offset": [110, 70]}
    return legacy


def _version() -> str:
    import facemend

    return facemend.__version__


def build_all() -> dict:
    """{path relative to the repository root: JSON object} for every shipped workflow file."""
    classes = _node_classes()
    version = _version()
    files = {}
    for name, wf in WORKFLOWS.items():
        files[f"example_workflows/{name}.json"] = ui_format(wf, classes, version)
        api = api_format(wf, classes)
        for nid, node in api.items():  # the photo input, for headless clients (a graph may load other images)
            if node["class_type"] == "LoadImage" and any(
                    n["class_type"] == "FaceMend_DetectAlign" and n["inputs"].get("image") == [nid, 0]
                    for n in api.values()):
                node["_meta"] = {"title": "input"}
        files[f"workflows/api/{name}.json"] = api
        if name in LEGACY:
            files[f"workflows/{name}.json"] = legacy_ui_format(wf, classes)
            files[f"workflows/{name}_api.json"] = api_format(wf, classes)
    return files


def dumps(obj) -> str:
    return json.dumps(obj, indent=1) + "\n"


def main() -> None:
    root = HERE.parent
    for rel, obj in build_all().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dumps(obj))
        print("wrote", path)


if __name__ == "__main__":
    main()
