"""Adapting a restorer to the user's own photos (diffusion-prior pseudo targets, then fine-tuning): what the nodes
FaceMend_DiffusionPriorLoader, FaceMend_PseudoTargets and FaceMend_AdaptRestorer compute, and the checks their
V3 nodes make before a run."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from ..host import device as dev
from ..host import models as hm
from ..host import model_paths
from .common import bchw_to_image, content_stamp, empty_faces, image_to_bchw, no_faces

PRIOR_FOLDER = "facemend_priors"
PRIOR_DEFAULT = "iddpm_ffhq512_ema500000.pth"
OUTPUT_FOLDER = "facerestore_models"  # where the adapted restorer is saved (the restorer loader's folder)
_cache: dict = {}
# Adapted models this process saved (path -> (mtime_ns, size)): a re-queued graph may take AdaptRestorer from
# ComfyUI's cache, so its own output is not refused before the run (a real re-run is still refused inside it).
_saved_here: dict = {}


def prior_files() -> list[str]:
    """The prior loader's choices: files in facemend_priors/ other than the LPIPS VGG weights kept there (the
    default name when there is none, so the node still shows; running it then names the missing file)."""
    files = [f for f in model_paths.list_files(PRIOR_FOLDER) if "vgg16" not in f]
    return files or [PRIOR_DEFAULT]


def load_prior(name: str):
    """The DifFace FFHQ-512 prior from models/facemend_priors/ (cached per file and device)."""
    from ..pipelines.adapt.prior import load_prior_unet

    path = model_paths.find_file(PRIOR_FOLDER, name)
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

    candidates = tuple(os.path.join(d, VGG16_FILE) for d in model_paths.search_dirs(PRIOR_FOLDER))
    return load_lpips_vgg(find_vgg16(candidates), device=device)


def pseudo_config(start_step=150, reg_end_step=90, down_factor=8, apply_filter=True, seed=20000, respacing="250",
                  clip_denoised=True):
    from ..pipelines.adapt.pseudo_targets import PseudoTargetConfig

    return PseudoTargetConfig(start_step=int(start_step), reg_end_step=int(reg_end_step),
                              down_factor=int(down_factor), apply_filter=bool(apply_filter), seed=int(seed),
                              respacing=str(respacing).strip(), clip_denoised=bool(clip_denoised))


def refused_pseudo_settings(start_step=150, reg_end_step=90, down_factor=8, apply_filter=True,
                            respacing="250") -> Optional[str]:
    """Why the generator would refuse these settings (a "ddimN" or malformed respacing, a start step beyond the
    respaced schedule, a low-pass factor that does not divide 512), or None: the same check the generator makes."""
    from ..pipelines.adapt.pseudo_targets import checked_schedule

    try:
        checked_schedule(pseudo_config(start_step, reg_end_step, down_factor, apply_filter, respacing=respacing))
    except ValueError as exc:
        return str(exc)
    return None


def output_path(name: str) -> str:
    """Where the adapted restorer `name` is saved: facerestore_models/<name>.safetensors (first searched folder)."""
    return model_paths.expected_path(OUTPUT_FOLDER, f"{name}.safetensors")


def refused_name(name: str) -> Optional[str]:
    """Why `name` cannot name a new adapted model (not a plain file name; the file exists, and FaceMend never
    overwrites one), or None. A file this process saved under the name is not refused here (see _saved_here)."""
    name = str(name).strip()
    if not name or os.sep in name or "/" in name or name.startswith("."):
        return f"model name {name!r}: give a plain file name without folders"
    path = output_path(name)
    if os.path.exists(path) and _saved_here.get(os.path.abspath(path)) != _stat(path):
        return f"{path} exists; FaceMend never overwrites a model file. Choose another name."
    return None


def refused_folder(folder: str, what: str = "face folder") -> Optional[str]:
    """A folder input that is given but is not a folder (empty means not given)."""
    folder = str(folder).strip()
    if folder and not os.path.isdir(folder):
        return f"{what} not found: {folder}"
    return None


def folder_listing(folder: str) -> tuple:
    """What identifies a folder of images cheaply: its files' names, sizes and mtimes (a changed, added or removed
    photo makes the node run again)."""
    folder = str(folder or "").strip()  # None: a linked input, whose value is not known before the run
    if not folder:
        return ()
    return content_stamp(folder)


def _stat(path: str) -> tuple:
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size)


def _preview_batches(progress):
    """on_batch for the pseudo-target generator: each finished batch as the live preview, when one would show."""
    def on_batch(targets):
        if progress.wants_preview():
            progress.update(0, preview=targets)
    return on_batch


def pseudo_targets(face_crops, restorer, prior, start_step=150, reg_end_step=90, down_factor=8, apply_filter=True,
                   seed=20000, respacing="250", clip_denoised=True, batch_size=1):
    """IMAGE of aligned faces -> (pseudo targets, the restorer's outputs), both IMAGE of the input's size."""
    from ..pipelines.adapt.pseudo_targets import PseudoTargetGenerator

    if no_faces(face_crops):  # no faces found: no targets to make
        return (empty_faces(face_crops), empty_faces(face_crops))
    with hm.on_device(restorer, prior):
        x = image_to_bchw(face_crops, restorer.device, "face crops")
        gen = PseudoTargetGenerator(prior, pseudo_config(start_step, reg_end_step, down_factor, apply_filter,
                                                         seed, respacing, clip_denoised))
        progress = dev.Progress(x.shape[0] * (gen.num_model_calls + 1))
        hook = dev.step_hook(progress)
        dev.check_interrupt()
        restored = restorer(x, seed=0, callback=hook)
        targets = gen(restored, batch_size=batch_size, callback=hook, on_batch=_preview_batches(progress))
    return (bchw_to_image(targets), bchw_to_image(restored))


@dataclass
class Adapted:
    """AdaptRestorer's outputs and what its node shows: the first face restored before and after adapting."""
    model_name: str
    loss_curve: Any        # IMAGE [1,H,W,3]
    adapted_restorer: Any
    before: Any            # IMAGE [1,S,S,3]: the given restorer's output on the first face
    after: Any             # IMAGE [1,S,S,3]: the adapted restorer's output on it
    path: str              # where the model was saved

    @property
    def outputs(self) -> tuple:
        return (self.model_name, self.loss_curve, self.adapted_restorer)


def adapt(restorer, prior, name, steps=2000, learning_rate=2e-5, lpips_weight=0.1, micro_batch=4, accumulate=4,
          checkpoint_every=250, precision="fp32", start_step=150, reg_end_step=90, down_factor=8, apply_filter=True,
          seed=20000, respacing="250", clip_denoised=True, face_crops=None, folder="", gan_weight=0.0,
          gan_real_folder="") -> Adapted:
    """AdaptRestorer: pseudo targets, fine-tuning, the new model saved and loaded; with the first face restored
    before and after adapting (what the node shows)."""
    import torch

    from ..pipelines.io.images import read_image
    from ..pipelines.restore.restorer import FaceRestorer

    # ComfyUI runs nodes under torch.inference_mode(): fine-tuning needs autograd, and tensors made in that
    # mode (the LPIPS weights, the faces) cannot enter it. Found by running the template in a real ComfyUI.
    # ComfyUI loads the models first, in the mode it runs nodes in: a move made outside inference mode would
    # give the loaders' inference-mode weights a normal tensor's key over an inference tensor's storage (no
    # version counter: the restorer's first view fails).
    with hm.on_device(restorer, prior):
        with torch.inference_mode(False), torch.enable_grad():
            result, first = _train(restorer, prior, name, steps, learning_rate, lpips_weight, micro_batch,
                                   accumulate, checkpoint_every, precision, start_step, reg_end_step, down_factor,
                                   apply_filter, seed, respacing, clip_denoised, face_crops, folder, gan_weight,
                                   gan_real_folder)
        # The new model is loaded back in the caller's mode (ComfyUI: inference mode), like every model ComfyUI
        # loads and moves, not in the training's.
        _saved_here[os.path.abspath(result.output_path)] = _stat(result.output_path)
        before = restorer(first.to(restorer.device), seed=0)
        adapted = hm.manage(FaceRestorer.from_file(result.output_path, device=restorer.device,
                                                   dtype=restorer.requested_dtype), f"FaceRestorer {name}")
        after = adapted(first.to(adapted.device), seed=0)
    plot = read_image(result.plot_path)[0]
    return Adapted(os.path.basename(result.output_path), bchw_to_image(plot), adapted, bchw_to_image(before),
                   bchw_to_image(after), result.output_path)


def adapt_restorer(restorer, prior, name, steps=2000, learning_rate=2e-5, lpips_weight=0.1, micro_batch=4,
                   accumulate=4, checkpoint_every=250, precision="fp32", start_step=150, reg_end_step=90,
                   down_factor=8, apply_filter=True, seed=20000, respacing="250", clip_denoised=True,
                   face_crops=None, folder="", gan_weight=0.0, gan_real_folder=""):
    """-> (model file name in facerestore_models/, loss curve IMAGE, the adapted restorer)."""
    return adapt(restorer, prior, name, steps, learning_rate, lpips_weight, micro_batch, accumulate,
                 checkpoint_every, precision, start_step, reg_end_step, down_factor, apply_filter, seed, respacing,
                 clip_denoised, face_crops, folder, gan_weight, gan_real_folder).outputs


def _train(restorer, prior, name, steps, learning_rate, lpips_weight, micro_batch, accumulate, checkpoint_every,
           precision, start_step, reg_end_step, down_factor, apply_filter, seed, respacing, clip_denoised, face_crops,
           folder, gan_weight, gan_real_folder):
    """Pseudo targets and fine-tuning -> (the FinetuneResult, the first face [1,3,S,S] on the CPU)."""
    from ..pipelines.adapt.finetune import FinetuneConfig
    from ..pipelines.adapt.pseudo_targets import PseudoTargetGenerator
    from ..pipelines.adapt.run import adapt_restorer as run_adaptation
    from ..pipelines.adapt.run import load_face_folder
    from ..pipelines.io.errors import FaceMendError

    name = str(name).strip()
    if not name or os.sep in name or "/" in name or name.startswith("."):
        raise FaceMendError(f"model name {name!r}: give a plain file name without folders")
    if face_crops is not None:
        faces = image_to_bchw(face_crops, "cpu", "face crops").clone()
    elif str(folder).strip():
        faces = load_face_folder(str(folder).strip(), restorer.input_size)
    else:
        raise FaceMendError("connect face_crops or give a folder of aligned face crops")
    out_path = output_path(name)
    work_dir = os.path.join(model_paths.output_directory(), "facemend_adapt", name)
    cfg = FinetuneConfig(steps=int(steps), lr=float(learning_rate), lr_min=min(5e-6, float(learning_rate)),
                         lpips_weight=float(lpips_weight), micro_batch=int(micro_batch),
                         accumulate=int(accumulate), checkpoint_every=int(checkpoint_every), precision=precision,
                         gan_weight=float(gan_weight), d_lr=float(learning_rate))
    gan_real = load_face_folder(str(gan_real_folder).strip(), restorer.input_size) \
        if float(gan_weight) > 0 and str(gan_real_folder).strip() else None
    gen = PseudoTargetGenerator(prior, pseudo_config(start_step, reg_end_step, down_factor, apply_filter, seed,
                                                     respacing, clip_denoised))
    lp = load_lpips(restorer.device) if cfg.lpips_weight > 0 else None
    progress = dev.Progress(faces.shape[0] * gen.num_model_calls + cfg.steps)
    first = faces[:1]

    def on_checkpoint(step, render):
        # The adapted restorer's output on the first face: one restorer call, made only when it would be shown.
        if progress.wants_preview():
            progress.update(0, preview=render(first))

    result, _ = run_adaptation(faces, restorer, gen, lp, cfg, name, out_path, work_dir,
                               hook=dev.step_hook(progress), gan_real=gan_real,
                               on_batch=_preview_batches(progress), on_checkpoint=on_checkpoint)
    return result, first


OPS = {
    "FaceMend_DiffusionPriorLoader": lambda model: (load_prior(model),),
    "FaceMend_PseudoTargets": pseudo_targets,
    "FaceMend_AdaptRestorer": adapt_restorer,
}
