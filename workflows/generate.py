"""Writes the shipped workflows in both ComfyUI formats from one description per preset, so the UI file
(drag into ComfyUI) and the API file (POST to /prompt) cannot drift apart. A test regenerates them and
compares with the committed files.

    python workflows/generate.py      # rewrite workflows/*.json after changing a graph below
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
        "nodes": {
            **_DETECT_NODES,
            4: ("LoadImage", {"image": "reference.png", "upload": "image"}, {}),
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
                                               "batch_size": 0},
                {"face_crops": (3, 0), "restorer_id": (7, 0), "reference": (4, 0), "detector": (2, 0),
                 "id_model": (5, 0), "musiq_metric": (6, 0)}),
            9: ("FaceMend_ColorFix", {"method": "wavelet", "strength": 1.0},
                {"image": (8, 0), "reference": (3, 0)}),
            10: ("FaceMend_PasteBack", {"feather": 0.1, "margin": 0.04, "interpolation": "bilinear"},
                 {"image": (1, 0), "face_crops": (9, 0), "alignment": (3, 1)}),
            11: ("SaveImage", {"filename_prefix": "facemend_id_preserve"}, {"images": (10, 0)}),
        },
    },
}


def _node_classes():
    try:
        import facemend
    except ImportError:  # run from a checkout without installing: load it like the tests do
        sys.path.insert(0, str(HERE.parent / "tests"))
        import conftest  # noqa: F401  (registers the checkout as `facemend`)
        import facemend
    return facemend.NODE_CLASS_MAPPINGS


def _schema(class_type, classes):
    """(widgets [(name, type)], link inputs [(name, type)], outputs [(name, type)]) in ComfyUI's order."""
    if class_type in CORE_WIDGETS:
        return CORE_WIDGETS[class_type], CORE_LINK_INPUTS[class_type], CORE_OUTPUTS[class_type]
    cls = classes[class_type]
    spec = cls.INPUT_TYPES()
    widgets, links = [], []
    for section in ("required", "optional"):
        for name, s in spec.get(section, {}).items():
            kind = s[0]
            if isinstance(kind, list):
                widgets.append((name, "COMBO"))
            elif kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                widgets.append((name, kind))
            else:
                links.append((name, kind))
    names = getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)
    return widgets, links, list(zip(names, cls.RETURN_TYPES))


def _has_control_widget(class_type, name, kind, classes) -> bool:
    """ComfyUI's frontend adds a 'control after generate' widget after INT inputs named seed/noise_seed or
    flagged control_after_generate, and reads two widgets_values for them (a UI file without the second
    value loads with every later widget shifted by one)."""
    if kind != "INT" or class_type not in classes:
        return False
    spec = classes[class_type].INPUT_TYPES()
    opts = {**spec.get("required", {}), **spec.get("optional", {})}[name]
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


def ui_format(wf, classes) -> dict:
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


def build_all() -> dict:
    classes = _node_classes()
    files = {}
    for name, wf in WORKFLOWS.items():
        files[f"{name}.json"] = ui_format(wf, classes)
        files[f"{name}_api.json"] = api_format(wf, classes)
    return files


def dumps(obj) -> str:
    return json.dumps(obj, indent=1) + "\n"


def main() -> None:
    for name, obj in build_all().items():
        (HERE / name).write_text(dumps(obj))
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
