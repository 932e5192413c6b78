"""Where model files live, and the error that names a missing one.

Hosted in ComfyUI: folders are registered with folder_paths (existing entries from extra_model_paths.yaml are
kept) and files resolved through it. Standalone (CLI, tests): a search path of ComfyUI-style models folders,
from --models-dir / set_models_dirs() and the FACEMEND_MODELS_DIR environment variable (os.pathsep-separated),
each holding sub-folders named like ComfyUI's (facedetection/, facerestore_models/, ...).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..pipelines.io.checkpoints import WEIGHT_EXTENSIONS
from ..pipelines.io.errors import ModelFileNotFound

ENV_VAR = "FACEMEND_MODELS_DIR"


@dataclass(frozen=True)
class ModelFolder:
    name: str
    extensions: tuple
    holds: str


# Folder names shared with ReActor / facerestore_cf / IPAdapter so users' existing files are found.
FOLDERS = {
    f.name: f
    for f in (
        ModelFolder("facedetection", WEIGHT_EXTENSIONS + (".onnx",), "face detectors and parsing nets (facexlib RetinaFace, YuNet)"),
        ModelFolder("facerestore_models", WEIGHT_EXTENSIONS, "face restorers (GFPGAN, CodeFormer, RestoreFormer++, GPEN)"),
        ModelFolder("insightface", (".onnx",), "ArcFace / SCRFD packs under insightface/models/<pack>/"),
        ModelFolder("adaface", WEIGHT_EXTENSIONS, "AdaFace recognition (adaface_ir50_ms1mv2.ckpt: the NTIRE ID gate)"),
        ModelFolder("facemend_iqa", WEIGHT_EXTENSIONS + (".npz", ".mat"), "IQA metric weights and NIQE parameters"),
        ModelFolder("onestep_sr", WEIGHT_EXTENSIONS + (".pkl",), "one-step diffusion SR LoRAs and prompt embeddings "
                    "(tsdsr/ folder, osediff.pkl)"),
        ModelFolder("facemend_priors", WEIGHT_EXTENSIONS, "diffusion priors and loss networks for adapting a "
                    "restorer (DifFace iddpm_ffhq512, VGG-16 for LPIPS)"),
        ModelFolder("restorer_id", WEIGHT_EXTENSIONS, "RestorerID checkpoints (RestorerIDFull.ckpt)"),
        # Shared with ComfyUI_IPAdapter_plus (models/ipadapter/) and ComfyUI itself (models/clip_vision/).
        ModelFolder("ipadapter", WEIGHT_EXTENSIONS, "IP-Adapter files (ip-adapter-faceid-plus_sd15.bin)"),
        ModelFolder("clip_vision", WEIGHT_EXTENSIONS, "CLIP image encoders (CLIP-ViT-H-14, file or folder)"),
    )
}


@dataclass(frozen=True)
class KnownFile:
    folder: str
    source: str
    licence: str
    size: str


# Where to get each file a node can ask for. Shown in "missing file" errors and mirrored in the README table.
KNOWN_FILES = {
    "detection_Resnet50_Final.pth": KnownFile(
        "facedetection", "https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth",
        "MIT (facexlib)", "104 MB"),
    "detection_mobilenet0.25_Final.pth": KnownFile(
        "facedetection", "https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_mobilenet0.25_Final.pth",
        "MIT (facexlib)", "1.7 MB"),
    "retinaface_mobilenet0.25_1mb.pth": KnownFile(
        "facedetection", "https://github.com/biubug6/Face-Detector-1MB-with-landmark (weights/mobilenet0.25_Final.pth, renamed)",
        "MIT", "1.8 MB"),
    "GFPGANv1.3.pth": KnownFile(
        "facerestore_models", "https://github.com/TencentARC/GFPGAN/releases/download/v1.3.0/GFPGANv1.3.pth",
        "Apache-2.0", "349 MB"),
    "GFPGANv1.4.pth": KnownFile(
        "facerestore_models", "https://github.com/TencentARC/GFPGAN/releases/download/v1.3.0/GFPGANv1.4.pth",
        "Apache-2.0", "349 MB"),
    "codeformer.pth": KnownFile(
        "facerestore_models", "https://github.com/sczhou/CodeFormer/releases/download/v0.1.0/codeformer.pth",
        "NTU S-Lab License 1.0 (non-commercial)", "376 MB"),
    "RestoreFormer++.ckpt": KnownFile(
        "facerestore_models",
        "https://github.com/wzhouxiff/RestoreFormerPlusPlus/releases/download/v1.0.0/RestoreFormer++.ckpt",
        "Apache-2.0", "~294 MB"),
    "RestoreFormer.ckpt": KnownFile(
        "facerestore_models",
        "https://github.com/wzhouxiff/RestoreFormerPlusPlus/releases/download/v1.0.0/RestoreFormer.ckpt",
        "Apache-2.0", "~291 MB"),
    "GPEN-BFR-512.pth": KnownFile(
        "facerestore_models", "https://public-vigen-video.oss-cn-shanghai.aliyuncs.com/robin/models/GPEN-BFR-512.pth",
        "academic and non-commercial use only (yangxy/GPEN)", "~284 MB"),
    "GPEN-BFR-256.pth": KnownFile(
        "facerestore_models", "https://public-vigen-video.oss-cn-shanghai.aliyuncs.com/robin/models/GPEN-BFR-256.pth",
        "academic and non-commercial use only (yangxy/GPEN)", "~76 MB"),
    "osediff.pkl": KnownFile(
        "onestep_sr", "https://github.com/cswry/OSEDiff (preset/models/osediff.pkl; Google Drive link in its README)",
        "Apache-2.0", "about 18 MB (4.4 M LoRA parameters in fp32, computed from the layout)"),
    # Adaptation (pipelines/adapt): the FFHQ-512 diffusion prior and the LPIPS backbone.
    "iddpm_ffhq512_ema500000.pth": KnownFile(
        "facemend_priors", "https://github.com/zsyOAOA/DifFace/releases/download/V1.0/iddpm_ffhq512_ema500000.pth",
        "NTU S-Lab License 1.0 (non-commercial; DifFace)", "about 640 MB (159.8 M parameters in fp32)"),
    "vgg16-397923af.pth": KnownFile(
        "facemend_priors", "https://download.pytorch.org/models/vgg16-397923af.pth (torchvision; a copy in "
        "torchvision's cache, torch.hub.get_dir()/checkpoints/, is used too)", "BSD-3-Clause (torchvision)",
        "528 MB"),
    # ComfyUI's own checkpoints/ folder (not registered by FaceMend; standalone: <models-dir>/checkpoints/).
    "sd3_medium.safetensors": KnownFile(
        "checkpoints", "https://huggingface.co/stabilityai/stable-diffusion-3-medium (gated; the _incl_clips "
        "variants work too)", "Stability AI Community licence", "about 4.2 GB (2.03 B + 84 M parameters in fp16)"),
    "niqe_pris_params.npz": KnownFile(
        "facemend_iqa", "https://github.com/XPixelGroup/BasicSR/blob/master/basicsr/metrics/niqe_pris_params.npz",
        "Apache-2.0 repo; LIVE NIQE parameters", "12 KB"),
    # pyiqa metrics (optional extra 'iqa'); the names pyiqa itself downloads, so existing copies can be reused.
    "musiq_koniq_ckpt-e95806b9.pth": KnownFile(
        "facemend_iqa", "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/musiq_koniq_ckpt-e95806b9.pth",
        "CC BY-NC-SA 4.0 (non-commercial)", "about 110 MB"),
    "ckpt_koniq10k.pt": KnownFile(
        "facemend_iqa", "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/ckpt_koniq10k.pt",
        "CC BY-NC-SA 4.0 (non-commercial)", "about 540 MB"),
    "RN50.pt": KnownFile(
        "facemend_iqa", "https://openaipublic.azureedge.net/clip/models/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
        "MIT (OpenAI CLIP)", "about 250 MB"),
    "pt_inception-2015-12-05-6726825d.pth": KnownFile(
        "facemend_iqa", "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
        "pt_inception-2015-12-05-6726825d.pth", "Apache-2.0 (pytorch-fid)", "about 92 MB"),
    "inception_FFHQ_512.pth": KnownFile(
        "facemend_iqa", "the FFHQ-512 FID statistics linked from the NTIRE 2025 face restoration repository "
        "(zhengchen1999/NTIRE2025_RealWorld_Face_Restoration, pretrained/; Google Drive), also used by VQFR",
        "as its source states", "about 32 MB"),
    # ArcFace recognition models of the insightface packs, in insightface/models/<pack>/ (as insightface lays them out).
    "w600k_r50.onnx": KnownFile(
        "insightface", "https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip "
        "(unzip to models/insightface/models/buffalo_l/)", "insightface models: non-commercial research only",
        "part of the buffalo_l pack"),
    "glintr100.onnx": KnownFile(
        "insightface", "the insightface antelopev2 pack (python-package model zoo; unzip to "
        "models/insightface/models/antelopev2/)", "insightface models: non-commercial research only",
        "part of the antelopev2 pack"),
    # AdaFace IR-50: the NTIRE 2025/2026 face restoration challenges' ID model (pipelines/quality/adaface.py).
    "adaface_ir50_ms1mv2.ckpt": KnownFile(
        "adaface", "https://drive.google.com/file/d/1eUaSHG4pGlIZK7hBkqjyp2fc2epKoBvI (AdaFace README, "
        "mk-minchul/AdaFace: R50 MS1MV2; the NTIRE READMEs link the same file)",
        "MIT (AdaFace code; the weights are trained on MS1MV2, a research data set)",
        "not stated; at least 350 MB (backbone 43.6 M + head 43.9 M fp32 parameters, computed from the layout)"),
    # RestorerID (identity preservation from a reference photo).
    "RestorerIDFull.ckpt": KnownFile(
        "restorer_id", "https://huggingface.co/YingJiacheng/RestorerID (ckpt/RestorerIDFull.ckpt)",
        "not stated on the model card (code README: Apache-2.0, but derived from StableSR: S-Lab 1.0, "
        "non-commercial)", "about 4.5 GB (1.02 B + 52 M + 84 M parameters in fp32, computed from the layout; "
        "larger if it includes the text and image encoders)"),
    "ip-adapter-faceid-plus_sd15.bin": KnownFile(
        "ipadapter", "https://huggingface.co/h94/IP-Adapter-FaceID (ip-adapter-faceid-plus_sd15.bin)",
        "research / non-commercial only (IP-Adapter-FaceID model card; depends on insightface models)",
        "about 150 MB (image_proj 33 M + LoRA/ip 45 M parameters in fp16)"),
    "CLIP-ViT-H-14-laion2B-s32B-b79K": KnownFile(
        "clip_vision", "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K (folder with config.json + "
        "model.safetensors; or h94/IP-Adapter models/image_encoder/)", "MIT", "about 2.5 GB in fp32 (632 M parameters)"),
    "stable-diffusion-v1-5": KnownFile(
        "diffusers", "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5 (only text_encoder/ and "
        "tokenizer/ are read)", "CreativeML OpenRAIL-M", "about 490 MB (text_encoder in fp32)"),
}

_standalone_dirs: list[str] = []


def set_models_dirs(dirs) -> None:
    """Standalone search path (the CLI's --models-dir); earlier entries win."""
    _standalone_dirs[:] = [os.path.abspath(os.path.expanduser(d)) for d in dirs]


def _folder_paths():
    """ComfyUI's folder_paths module when running inside ComfyUI, else None."""
    import sys

    fp = sys.modules.get("folder_paths")
    # Hosted means ComfyUI runs this process (its model management is loaded); importing its node API alone, as
    # the node tests do, leaves the standalone search path in charge.
    if fp is not None and hasattr(fp, "folder_names_and_paths") and "comfy.model_management" in sys.modules:
        return fp
    return None


def register_comfy_folders() -> None:
    """Add our folders to ComfyUI, keeping any paths users configured (extra_model_paths.yaml)."""
    fp = _folder_paths()
    if fp is None:
        return
    for folder in FOLDERS.values():
        default = os.path.join(fp.models_dir, folder.name)
        if folder.name in fp.folder_names_and_paths:
            paths, exts = fp.folder_names_and_paths[folder.name]
            if default not in paths:
                paths = list(paths) + [default]
            fp.folder_names_and_paths[folder.name] = (list(paths), set(exts) | set(folder.extensions))
        else:
            fp.folder_names_and_paths[folder.name] = ([default], set(folder.extensions))


def search_dirs(folder: str) -> list[str]:
    """The directories searched for files of `folder`, in order."""
    fp = _folder_paths()
    if fp is not None:
        if folder in FOLDERS and folder not in fp.folder_names_and_paths:
            # A host that imported the node classes before the pack registered its folders (their schemas list
            # files): register them now rather than fail on ComfyUI's KeyError (found by gpu_check on a GPU).
            register_comfy_folders()
        return list(fp.get_folder_paths(folder))
    roots = list(_standalone_dirs)
    env = os.environ.get(ENV_VAR, "")
    roots += [os.path.abspath(os.path.expanduser(p)) for p in env.split(os.pathsep) if p]
    return [os.path.join(r, folder) for r in roots]


def list_files(folder: str) -> list[str]:
    """Names (relative to the folder) of the model files present, for loader combos. No I/O beyond listing."""
    exts = FOLDERS[folder].extensions if folder in FOLDERS else WEIGHT_EXTENSIONS
    fp = _folder_paths()
    if fp is not None:
        try:
            return sorted(n for n in fp.get_filename_list(folder) if n.lower().endswith(exts))
        except KeyError:
            return []
    names = set()
    for d in search_dirs(folder):
        if not os.path.isdir(d):
            continue
        for root, _, files in os.walk(d, followlinks=True):
            for f in files:
                if f.lower().endswith(exts):
                    names.add(os.path.relpath(os.path.join(root, f), d).replace(os.sep, "/"))
    return sorted(names)


def missing_file_message(folder: str, name: str) -> str:
    dirs = search_dirs(folder)
    where = "\n".join(f"  - {d}" for d in dirs) if dirs else (
        f"  (no models folder configured: pass --models-dir or set {ENV_VAR})")
    msg = f"Model file '{name}' was not found in the '{folder}' folder. Searched:\n{where}\n"
    known = KNOWN_FILES.get(os.path.basename(name))
    if known:
        msg += f"Get it from {known.source} ({known.size}, licence {known.licence}) and put it in models/{known.folder}/."
    else:
        msg += f"Put the file in models/{folder}/ (FaceMend never downloads models by itself)."
    return msg


def find_file(folder: str, name: str) -> str:
    """Full path of `name` in `folder`, or ModelFileNotFound naming the file, the folders and where to get it."""
    path = _first_match(folder, name, os.path.isfile)
    if path is None:
        raise ModelFileNotFound(missing_file_message(folder, name))
    return path


def find_optional_file(folder: str, name: str) -> str | None:
    """Full path of the file `name` in `folder` (first match, inside the folders), or None."""
    return _first_match(folder, name, os.path.isfile)


def confined_path(directory: str, name: str) -> str | None:
    """`directory`/`name` when it stays inside `directory` (sub-folders and symlinked files are fine), else None:
    a node's model name such as '../x.pth' or '/etc/x' must not read outside the registered folders."""
    root = os.path.normpath(os.path.abspath(directory))
    path = os.path.normpath(os.path.join(root, name))
    return path if path.startswith(root.rstrip(os.sep) + os.sep) else None


def check_model_name(folder: str, name: str) -> None:
    """Refuse a name that would resolve outside every searched `folder` (path traversal, absolute paths)."""
    dirs = search_dirs(folder) or [os.path.join("models", folder)]
    if not any(confined_path(d, name) for d in dirs):
        raise ModelFileNotFound(
            f"Model name '{name}' points outside the '{folder}' model folders; FaceMend only reads model files "
            f"inside them. Put the file in models/{folder}/ and choose it by its name there.")


def _first_match(folder: str, name: str, exists) -> str | None:
    """The first searched `folder` holding `name`, which must stay inside it (else ModelFileNotFound)."""
    check_model_name(folder, name)
    for d in search_dirs(folder):
        path = confined_path(d, name)
        if path is not None and exists(path):
            return path
    return None


def list_dirs(folder: str) -> list[str]:
    """Names of the sub-folders of `folder` (diffusers model folders, LoRA folders) for loader combos."""
    names = set()
    for d in search_dirs(folder):
        if os.path.isdir(d):
            names.update(n for n in os.listdir(d) if os.path.isdir(os.path.join(d, n)))
    return sorted(names)


def find_dir(folder: str, name: str) -> str | None:
    """Full path of the sub-folder `name` of `folder` (first match), or None."""
    return _first_match(folder, name, os.path.isdir)


def expected_path(folder: str, name: str) -> str:
    """Where `name` should go: in the first searched `folder` (for "missing files" messages)."""
    dirs = search_dirs(folder)
    return os.path.join(dirs[0] if dirs else os.path.join("models", folder), name)


def output_directory() -> str:
    """ComfyUI's output folder when hosted, else the current directory (for run folders such as adaptation's)."""
    fp = _folder_paths()
    if fp is not None and hasattr(fp, "get_output_directory"):
        return fp.get_output_directory()
    return os.path.abspath("output")
