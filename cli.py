"""Command line and Python API without ComfyUI: `python -m facemend restore|demo|evaluate|adapt ...`."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from .cli_files import (EXISTING_POLICIES, OutputError, OutputExists, check_existing,  # noqa: F401
                        check_output_dir, claim_output_dir, collect_inputs, plan_outputs, scan_inputs,
                        within_output_limit, write_json_atomic, write_output)
from .cli_progress import CLIProgress, _NoProgress
from .host import device as dev
from .host import model_paths
from .pipelines.face.detection import SELECTION_MODES
from .pipelines.face.detectors import EMBEDDED_MTCNN, load_detector
from .pipelines.io.errors import FaceMendError, Interrupted
from .pipelines.io.images import read_image, side_by_side
from .pipelines.presets import BYTES_PER_OUTPUT_PIXEL, MAX_OUTPUT_PIXELS, PRESETS, FaceRestorePipeline


DEMO_LABELS = ("bicubic x2", "FaceMend")
DEMO_TUNE_STEPS = 200  # ZSSR steps of the demo preset: about 15 s per batch of faces on 2 CPU cores


def build_pipeline(preset: str = "demo", detector: str = EMBEDDED_MTCNN, device=None, restorer: str | None = None,
                   precision: str = "auto", tune_steps: int = DEMO_TUNE_STEPS, seed: int | None = None,
                   onestep_base: str | None = None, onestep_lora: str | None = None, progress=None,
                   reference: list | None = None, id_scale: float | None = None, steps: int = 50,
                   cfg: float = 4.0, face_batch: int = 0, **options) -> FaceRestorePipeline:
    """The Python API: a ready pipeline for `preset`, models resolved through the model search path.
    `restorer` overrides the preset's restorer file (a name in facerestore_models/ or a path); `tune_steps`
    is the demo preset's ZSSR step count; `onestep_base` / `onestep_lora` the ntire preset's SD3 folder (in
    diffusers/) and TSD-SR folder (in onestep_sr/), or the osdface preset's SD-2.1-base folder and OSDFace
    folder. id_preserve: `reference` photo paths of the person, `id_scale`
    a fixed ID scale instead of the adaptive one (which needs MUSIQ's weights), `steps` / `cfg` of the sampler.
    `progress` (e.g. a CLIProgress) hears of the face work: stage(name, total) when a face stage starts, then
    progress(n) as faces / steps finish. `face_batch`: faces per restorer forward (0: by free memory). `seed`: None
    is each preset's default (42 for id_preserve, else 0)."""
    if preset not in PRESETS:
        raise FaceMendError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    progress = progress or _NoProgress()
    if seed is None:
        seed = 42 if preset == "id_preserve" else 0
    device = torch.device(device) if device else dev.compute_device()
    if detector in (EMBEDDED_MTCNN, "mtcnn"):
        det = load_detector(EMBEDDED_MTCNN, device=device)
    else:
        det = load_detector(detector, model_file("facedetection", detector), device=device)
    stages = []
    if preset in ("fast", "ntire", "ntire_full"):
        from .pipelines.restore.restorer import FaceRestorer

        name = restorer or PRESETS[preset].needs[0][1]
        net = FaceRestorer.from_file(model_file("facerestore_models", name), device=device,
                                     dtype=dev.resolve_dtype(precision, device))

        def restore(faces):
            progress.stage("restore faces", faces.shape[0])
            return net(faces, callback=progress, **({"batch_size": face_batch} if face_batch else {}))

        stages.append(("restore", restore))
    if preset == "demo":
        from .pipelines.tune.zssr import ZSSR, ZSSRConfig

        # CPU-friendly ZSSR: 64 px training crops, no 8x self-ensemble, the paper's plateau policy compressed
        # into tune_steps. Native pixel crops pasted onto the x2 bicubic photo: no resampling anywhere.
        config = ZSSRConfig(crop_size=64, self_ensemble=False).scaled_policy(int(tune_steps))

        def zssr(faces):
            z = ZSSR(config)
            plan = z.plan(faces)
            if plan.groups > 1 and hasattr(progress, "write"):
                progress.write(plan.line())
            progress.stage(f"ZSSR x2 on {faces.shape[0]} face(s), {plan.faces_per_group} per group, steps",
                           z.total_steps(faces))
            return z(faces, seed=seed, hook=progress)[0]

        stages.append(("zssr_x2", zssr))
        options = {"crop_size": 0, "geometry": "native", "upscale": PRESETS["demo"].upscale, **options}
    if preset in ("ntire", "ntire_full"):
        stages.append(("onestep_sr", _onestep_stage(device, precision, onestep_base, onestep_lora,
                                                    progress=progress)))
        options.setdefault("color_reference", "restore")  # AIIA: wavelet fix against the GFPGAN output
    if preset == "ntire_full":
        stages.append(("ntire_tune", _ntire_tune_stage(seed, progress=progress)))
    if preset == "osdface":
        stages.append(("osdface", _osdface_stage(device, precision, onestep_base, onestep_lora, seed, progress)))
    if preset == "id_preserve":
        stages.append(("restorer_id", _identity_stage(det, device, precision, reference, id_scale, steps, cfg,
                                                      seed)))
        options.setdefault("color_method", "none")  # the stage fixes colour on the unclamped decode (official order)
    return FaceRestorePipeline(detector=det, face_stages=stages, **options)


def model_file(folder: str, name: str) -> str:
    """A model named on the command line: a file of the models folders, else an explicit path to a file
    (the pack's loaders read only inside the models folders; a CLI user may point anywhere on purpose)."""
    try:
        return model_paths.find_file(folder, name)
    except FaceMendError:
        if os.path.isfile(name):
            return os.path.abspath(name)
        raise


def _onestep_stage(device, precision, base=None, lora=None, seed=0, progress=None):
    """TSD-SR at scale 1 on the face crops (the NTIRE 2025 AIIA setting: 512 crops, one tile, fp16 on GPU)."""
    from .pipelines.diffusion.backends import load_tsdsr

    spec = dict((folder, name) for folder, name in PRESETS["ntire"].needs[1:])
    base = base or spec["diffusers"]
    lora = lora or spec["onestep_sr"]
    from .ops.diffusion import base_model_path

    # A diffusers folder, or a single file in models/checkpoints/; explicit paths are fine on the command line.
    base_dir = os.path.abspath(base) if os.path.exists(base) else base_model_path(base)
    lora_dir = os.path.abspath(lora) if os.path.isdir(lora) else (
        model_paths.find_dir("onestep_sr", lora) or model_paths.expected_path("onestep_sr", lora))
    model = load_tsdsr(base_dir, lora_dir, device=device, dtype=dev.resolve_dtype(precision, device))
    return _face_sr_stage(model, "one-step SR", seed, progress)


def _face_sr_stage(model, label, seed=0, progress=None):
    """A loaded one-step model as a face stage: all faces at scale 1, seeded, out-of-memory halving."""
    progress = progress or _NoProgress()

    def stage(faces):
        progress.stage(label, faces.shape[0])
        out = model(faces, scale=1, seed=seed, is_oom=dev.is_oom)
        progress(faces.shape[0])
        return out

    return stage


def _osdface_stage(device, precision, base=None, folder=None, seed=0, progress=None):
    """OSDFace on the 512 face crops, all faces in batches (files of PRESETS['osdface'])."""
    from .ops.diffusion import base_model_path
    from .pipelines.diffusion.osdface import load_osdface

    spec = dict(PRESETS["osdface"].needs)
    base, folder = base or spec["diffusers"], folder or spec["onestep_sr"]
    base_dir = os.path.abspath(base) if os.path.exists(base) else base_model_path(base)
    own_dir = os.path.abspath(folder) if os.path.isdir(folder) else (
        model_paths.find_dir("onestep_sr", folder) or model_paths.expected_path("onestep_sr", folder))
    model = load_osdface(base_dir, own_dir, device=device, dtype=dev.resolve_dtype(precision, device))
    return _face_sr_stage(model, "OSDFace", seed, progress)


def _ntire_tune_stage(seed=0, steps=0, progress=None, **config):
    """The AIIA per-image tuning on the TSD-SR faces: L1 + 0.1 (1 - CLIP-IQA) + 0.1 (1 - MANIQA), ArcFace ID
    guard, the best validated step kept (the same code the PerImageTune node runs; files of PRESETS['ntire_full'])."""
    from .ops.quality import open_id_model, open_metric
    from .ops.tune import _id_similarity, _quality_terms
    from .pipelines.tune.ntire_refine import NTIREConfig, NTIRETune

    clipiqa, maniqa = open_metric("clipiqa"), open_metric("maniqa")
    id_model = open_id_model(PRESETS["ntire_full"].needs[5][1])
    losses, score = _quality_terms(clipiqa, 0.1, maniqa, 0.1)
    config = NTIREConfig(**config)  # keyword overrides: smaller networks for quick runs
    if steps:
        config.steps = int(steps)
    tuner = NTIRETune(config, quality_losses=losses, score_fn=score, id_similarity=_id_similarity(id_model))
    progress = progress or _NoProgress()

    def stage(faces):
        plan = tuner.plan(faces)
        if plan.groups > 1 and hasattr(progress, "write"):
            progress.write(plan.line())
        progress.stage(f"NTIRE tuning on {faces.shape[0]} face(s), {plan.faces_per_group} per group, steps",
                       tuner.total_steps(faces))
        return tuner(faces, seed=seed, hook=progress)[0]

    return stage


def _identity_stage(detector, device, precision, reference, id_scale, steps, cfg, seed):
    """RestorerID with the reference photos' identity; per-face MUSIQ scale unless id_scale is given."""
    from .ops.identity import FIXED_ID_SCALE, default_musiq, load_restorer_id
    from .ops.quality import open_id_model
    from .pipelines.identity.reference import combine, reference_identity
    from .pipelines.identity.stage import IdentityStage

    if not reference:
        raise FaceMendError("preset id_preserve needs --reference photo.jpg [...]: one or more photos of the person")
    arcface = open_id_model()
    refs = []
    for path in reference:
        image, _ = read_image(path)
        try:
            refs.append(reference_identity(image.to(device), detector, arcface))
        except FaceMendError as exc:
            raise FaceMendError(f"{path}: {exc}") from exc
    ref = combine(refs)
    for entry, path in zip(ref.report, reference):
        entry["reference"] = path
    musiq, source = None, f"fixed id_scale {id_scale} (--id-scale)"
    if id_scale is None:  # adaptive whenever MUSIQ's weights are there; else a fixed scale, said out loud
        musiq, why = default_musiq()
        source = f"adaptive from MUSIQ's weights {musiq.weights}" if musiq is not None else (
            f"fixed id_scale {FIXED_ID_SCALE}: {why}; pass --id-scale or add the weights for the adaptive scale")
        if musiq is None:
            id_scale = FIXED_ID_SCALE
            print(f"id_preserve: {source}", file=sys.stderr)
    model = load_restorer_id(precision=precision)
    model.to(device)
    return IdentityStage(model, ref, arcface, musiq=musiq, fixed_scale=id_scale, steps=steps, cfg=cfg, seed=seed,
                         hook=lambda n=1: dev.check_interrupt(), scale_source=source)


def restore_files(inputs: list[str], out_dir: str, pipeline: FaceRestorePipeline, device=None,
                  suffix: str = "", log=print, existing: str = "error", progress: CLIProgress | None = None,
                  outputs: list[tuple[str, str]] | None = None) -> list[dict]:
    """Restore each image file (one at a time: photos differ in size) into out_dir as PNG.

    Existing outputs: existing='error' refuses before any work, 'overwrite' replaces them, 'skip' leaves them
    (and their inputs) alone; without 'overwrite' an output that appears during the run (another program) is never
    replaced. An input that cannot be read or restored is reported and the run goes on: its
    report holds 'error' instead of 'output'. Each output is written to a temporary name and renamed, so an
    interrupted run leaves only complete files."""
    if existing not in EXISTING_POLICIES:
        raise ValueError(f"existing must be one of {EXISTING_POLICIES}, got {existing!r}")
    device = torch.device(device) if device else dev.compute_device()
    pairs = outputs if outputs is not None else plan_outputs(inputs, out_dir, suffix)
    check_output_dir(out_dir)
    check_existing(pairs, existing)
    progress = progress or _NoProgress()
    say = progress.write if isinstance(progress, CLIProgress) else log

    def failed(path, message):
        reports.append({"input": path, "error": message})
        if isinstance(progress, CLIProgress):
            progress.write(f"{path}: FAILED, {message}", err=True)
        else:
            log(f"{path}: FAILED, {message}")

    reports = []
    for path, target in pairs:
        dev.check_interrupt()
        if existing == "skip" and os.path.exists(target):
            say(f"{path}: skipped, {target} exists")
            reports.append({"input": path, "output": target, "skipped": True})
        else:
            try:
                reports.append(_restore_one(path, target, pipeline, device, progress, replace=existing == "overwrite"))
                r = reports[-1]
                say(f"{path}: {sum(r['faces'])} face(s), {r['seconds']:.2f} s -> {target}")
            except Interrupted:
                raise
            except OutputExists as exc:  # written by someone else since the run started: theirs stays
                if existing == "skip":
                    say(f"{path}: skipped, {target} appeared during the run")
                    reports.append({"input": path, "output": target, "skipped": True})
                else:
                    failed(path, str(exc))
            except (FaceMendError, OSError, ValueError, RuntimeError) as exc:
                message = str(exc) if isinstance(exc, FaceMendError) else f"{type(exc).__name__}: {exc}"
                if isinstance(exc, RuntimeError) and dev.is_oom(exc):
                    message = f"out of memory: {exc}"
                failed(path, message)
        if isinstance(progress, CLIProgress):
            progress.image_done()
    return reports


def _restore_one(path: str, target: str, pipeline, device, progress, replace: bool = True) -> dict:
    image, alpha = read_image(path)
    t = time.perf_counter()
    out, report = pipeline(image.to(device))
    if alpha is not None and alpha.shape[-2:] != out.shape[-2:]:  # the demo preset is x2: so is the alpha
        import torch.nn.functional as F

        alpha = F.interpolate(alpha, size=out.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
    report.update(input=path, seconds=round(time.perf_counter() - t, 3))
    write_output(target, out.cpu(), alpha, replace=replace)
    report["output"] = target
    return report


def degrade(image: torch.Tensor) -> torch.Tensor:
    """The demo's documented degradation of a clean [1,3,H,W] image: x2 antialiased bicubic downscale (the
    low-resolution setting ZSSR is made for; a blurred, noisy, JPEG-damaged face needs a trained restorer)."""
    from .pipelines.tune.engine import downscale

    return downscale(image, 2).clamp(0, 1)


def upscale_bicubic(image: torch.Tensor, factor: int = 2) -> torch.Tensor:
    import torch.nn.functional as F

    return F.interpolate(image, scale_factor=factor, mode="bicubic", align_corners=False).clamp(0, 1)


def demo_image() -> torch.Tensor:
    """scikit-image's astronaut (NASA, public domain), shipped inside the scikit-image wheel."""
    try:
        from skimage import data
    except ImportError as exc:
        raise FaceMendError("the demo needs scikit-image for its public-domain test photo: pip install -e .[demo]") from exc
    return torch.from_numpy(data.astronaut().copy()).permute(2, 0, 1)[None].float() / 255


def run_demo(out_dir: str = "demo_output", device=None, log=print, tune_steps: int = DEMO_TUNE_STEPS,
             progress=None) -> dict:
    """Downscale the astronaut x2, restore it with the demo preset, and compare with plain bicubic x2 against
    the clean original, over the whole photo and over the face's box."""
    device = torch.device(device) if device else dev.compute_device()
    clean = demo_image()
    degraded = degrade(clean)
    os.makedirs(out_dir, exist_ok=True)
    write_output(os.path.join(out_dir, "astronaut_degraded.png"), degraded, None)
    pipeline = build_pipeline("demo", device=device, tune_steps=tune_steps, progress=progress)
    t = time.perf_counter()
    restored, report = pipeline(degraded.to(device))
    seconds = time.perf_counter() - t
    if isinstance(progress, CLIProgress):
        progress.image_done()
    restored = restored.cpu()
    bicubic = upscale_bicubic(degraded)
    write_output(os.path.join(out_dir, "astronaut_restored.png"), restored, None)
    write_output(os.path.join(out_dir, "astronaut_before_after.png"),
                 side_by_side(bicubic, restored, labels=DEMO_LABELS), None)
    summary = {"faces": sum(report["faces"]), "seconds": round(seconds, 2), "device": str(device),
               "tune_steps": int(tune_steps), "psnr_bicubic_db": round(_psnr(bicubic, clean), 2),
               "psnr_restored_db": round(_psnr(restored, clean), 2),
               "outputs": sorted(os.listdir(out_dir)), "timings_s": report["timings_s"]}
    if summary["faces"]:
        x0, y0, x1, y1 = (int(round(v * 2)) for v in report["alignment"]["faces"][0]["box"])
        box = (..., slice(max(y0, 0), y1), slice(max(x0, 0), x1))
        summary["face_psnr_bicubic_db"] = round(_psnr(bicubic[box], clean[box]), 2)
        summary["face_psnr_restored_db"] = round(_psnr(restored[box], clean[box]), 2)
    log(f"demo: {summary['faces']} face(s), x2 in {seconds:.1f} s on {device}; PSNR vs the clean photo, bicubic x2 -> "
        f"FaceMend demo: whole photo {summary['psnr_bicubic_db']:.2f} -> {summary['psnr_restored_db']:.2f} dB"
        + (f", face {summary['face_psnr_bicubic_db']:.2f} -> {summary['face_psnr_restored_db']:.2f} dB"
           if summary["faces"] else "") + f"; wrote {', '.join(summary['outputs'])} to {out_dir}/")
    return summary


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.clamp(0, 1) - b.clamp(0, 1)) ** 2).mean())
    return 10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))).item()


def evaluate_folder(outputs: str, out_dir: str = "report", inputs: str | None = None, metrics=("niqe",),
                    id_model: str | None = None, id_threshold: float = 0.6, fid_stats: str | None = None,
                    niqe_variant: str = "pyiqa", qalign: float | None = None, log=print,
                    protocol: str = "ntire2025", landmarks: str | None = None) -> dict:
    """Score a folder of restored images: per-image NR-IQA (+ ID similarity to --inputs, + FID against stored
    statistics), the NTIRE score and the ID gate of `protocol` (ntire2025 | ntire2026); writes report.json,
    per_image.csv, summary.png. id_model: AdaFace adaface_ir50_ms1mv2.ckpt (the challenge's) or an ArcFace ONNX
    (a proxy); landmarks: the organisers' landmark CSV (else AdaFace finds the input's face with the embedded
    MTCNN detector)."""
    from .ops.quality import IQA_FOLDER, id_folder, open_id_model, open_metric
    from .pipelines.quality.evaluate import evaluate, write_report
    from .pipelines.quality.ntire_score import protocol as check_protocol, read_landmark_file

    check_protocol(protocol)
    marks = read_landmark_file(landmarks) if landmarks else None
    if marks is not None and not id_model:
        raise FaceMendError("--landmarks is for the ID gate: give --id-model too (adaface_ir50_ms1mv2.ckpt)")
    loaded = {name: open_metric(name, niqe_variant=niqe_variant) for name in metrics}
    idm = open_id_model(id_model, model_file(id_folder(id_model), id_model)) if id_model else None
    detector = None
    if idm is not None and idm.name == "adaface" and marks is None:
        detector = load_detector(EMBEDDED_MTCNN, device=dev.compute_device())
        log("no --landmarks file: the inputs' five landmarks come from the embedded MTCNN detector (the "
            "challenge's come from its landmark CSV)")
    fid = None
    if fid_stats:
        from .pipelines.quality.fid import INCEPTION_FILE, FIDInception, load_stats

        fid = (FIDInception.from_file(model_paths.find_file(IQA_FOLDER, INCEPTION_FILE), dev.compute_device()),
               load_stats(model_file(IQA_FOLDER, fid_stats)))
    report = evaluate(outputs, loaded, inputs, idm, fid, id_threshold, dev.compute_device(), log,
                      dev.check_interrupt, {"qalign": qalign} if qalign is not None else None,
                      protocol_name=protocol, landmarks=marks, detector=detector)
    paths = write_report(report, out_dir)
    ntire = report["ntire"]
    log(f"{report['images']} images: " + ", ".join(f"{k} {v:.4f}" for k, v in report["means"].items())
        + f"; NTIRE score {ntire['score']:.4f}" + ("" if ntire["complete"] else
                                                  f" (without {', '.join(ntire['missing_terms'])})")
        + (f"; {protocol} ID gate ({report['id_model']['name']}): {report['id_gate']['low_count']} low "
           f"({'pass' if report['id_gate']['passed'] else 'FAIL'}, at most {report['id_gate']['max_low']})"
           + "".join(f", {k} {v}" for k, v in report["id_gate"]["low_by_dataset"].items())
           if "id_gate" in report else "") + f"; wrote {', '.join(paths)}")
    return report


def adapt_folder(folder: str, restorer: str, name: str, prior: str = "iddpm_ffhq512_ema500000.pth",
                 work_dir: str | None = None, steps: int = 2000, lr: float = 2e-5, lpips_weight: float = 0.1,
                 micro_batch: int = 4, accumulate: int = 4, checkpoint_every: int = 250, precision: str = "fp32",
                 start_step: int = 150, reg_end_step: int = 90, down_factor: int = 8, seed: int = 20000,
                 batch_size: int = 1, gan_weight: float = 0.0, gan_real: str | None = None, respacing: str = "250",
                 log=print) -> dict:
    """Adapt a restorer to a folder of aligned face crops (pseudo targets from the diffusion prior, then
    fine-tuning); saves models/facerestore_models/<name>.safetensors. Re-running resumes in work_dir."""
    from .ops.adapt import load_lpips
    from .pipelines.adapt.finetune import FinetuneConfig
    from .pipelines.adapt.prior import load_prior_unet
    from .pipelines.adapt.pseudo_targets import PseudoTargetConfig, PseudoTargetGenerator
    from .pipelines.adapt.run import adapt_restorer, load_face_folder
    from .pipelines.restore.restorer import FaceRestorer

    device = dev.compute_device()
    out_path = model_paths.expected_path("facerestore_models", f"{name}.safetensors")
    if os.path.exists(out_path):
        raise FaceMendError(f"{out_path} exists; FaceMend never overwrites a model file. Choose another --name.")
    net = FaceRestorer.from_file(model_file("facerestore_models", restorer), device=device)
    cfg = FinetuneConfig(steps=steps, lr=lr, lr_min=min(5e-6, lr), lpips_weight=lpips_weight,
                         micro_batch=micro_batch, accumulate=accumulate, checkpoint_every=checkpoint_every,
                         precision=precision, gan_weight=gan_weight, d_lr=lr)
    lp = load_lpips(device) if lpips_weight > 0 else None
    faces = load_face_folder(folder, net.input_size)
    reals = load_face_folder(gan_real, net.input_size) if gan_weight > 0 and gan_real else None
    gen = PseudoTargetGenerator(load_prior_unet(model_file("facemend_priors", prior), device=device),
                                PseudoTargetConfig(start_step=start_step, reg_end_step=reg_end_step,
                                                   down_factor=down_factor, seed=seed, respacing=respacing))
    work_dir = work_dir or os.path.join("adapt_runs", name)
    total = faces.shape[0] * gen.num_model_calls + cfg.steps
    progress = dev.Progress(total, callback=lambda done, tot: sys.stderr.write(f"\radapt: {done}/{tot} steps")
                            if log is print else None)
    t0 = time.perf_counter()
    result, _ = adapt_restorer(faces, net, gen, lp, cfg, name, out_path, work_dir, batch_size=batch_size,
                               hook=dev.step_hook(progress), log=log, gan_real=reals)
    if log is print:
        sys.stderr.write("\n")
    log(f"saved {result.output_path} ({faces.shape[0]} faces, {cfg.steps} steps, {time.perf_counter() - t0:.0f} s); "
        f"loss curve {result.plot_path}, log {result.log_path}")
    return {"output": result.output_path, "plot": result.plot_path, "log": result.log_path,
            "resumed_from": result.resumed_from}


def _global_options(parser: argparse.ArgumentParser, sub: bool) -> None:
    """--models-dir / --device, accepted before and after the sub-command (the sub-command's copies land in
    other attributes, so giving them in both places adds up instead of one replacing the other)."""
    parser.add_argument("--models-dir", action="append", dest="sub_models_dir" if sub else "models_dir",
                        default=argparse.SUPPRESS if sub else [], metavar="DIR",
                        help="a ComfyUI-style models folder holding facedetection/, facerestore_models/, ... "
                             "(repeatable, earlier wins); also $FACEMEND_MODELS_DIR")
    parser.add_argument("--device", dest="sub_device" if sub else "device", metavar="DEVICE",
                        default=argparse.SUPPRESS if sub else None,
                        help="cpu, cuda, cuda:1, mps (default: the best available)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m facemend", description=__doc__)
    _global_options(parser, sub=False)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, **kw):
        p = sub.add_parser(name, **kw)
        _global_options(p, sub=True)
        return p

    p_restore = add("restore", help="restore an image file or every image of a folder",
                    description="Restore image files into an output folder as PNG (<name>.png; inputs sharing a "
                    "name get their extension added). Existing outputs are refused unless --overwrite or "
                    "--skip-existing; an unreadable input is reported and the others still run (exit code 1 "
                    "at the end, with the list); Ctrl-C leaves only complete outputs.")
    p_restore.add_argument("inputs", nargs="+", help="image files or folders")
    p_restore.add_argument("-o", "--out", default="restored", help="output folder (default: restored/); "
                           "must not be an input folder")
    p_restore.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                           help="demo (x2 ZSSR, no model files), fast (GFPGAN), ntire (GFPGAN + TSD-SR) or "
                           "id_preserve (RestorerID with --reference photos); "
                           "see `presets` (default demo)")
    p_restore.add_argument("--detector", default=EMBEDDED_MTCNN,
                           help="'mtcnn' (embedded) or a RetinaFace file name in models/facedetection/ (or a path)")
    p_restore.add_argument("--selection", default="all", choices=list(SELECTION_MODES),
                           help="which faces per image: all, the largest, the one nearest the centre, or the one "
                           "at --face-index (default all)")
    p_restore.add_argument("--face-index", type=int, default=0,
                           help="with --selection index: which face, counting from the largest (0)")
    p_restore.add_argument("--score-threshold", type=float, default=0.8,
                           help="minimum detector confidence (default 0.8)")
    p_restore.add_argument("--min-face-size", type=float, default=16.0,
                           help="ignore faces whose box is smaller than this many pixels, shorter side (default 16)")
    p_restore.add_argument("--max-faces", type=int, default=0,
                           help="restore at most this many faces per image, largest first (default 0: no limit)")
    p_restore.add_argument("--restorer", default=None, help="restorer file in models/facerestore_models/ "
                           "or a path (presets fast and ntire; default GFPGANv1.4.pth)")
    p_restore.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                           help="weights precision (default auto: fp16 on GPUs that support it, fp32 on CPU)")
    p_restore.add_argument("--onestep-base", default=None, help="preset ntire: SD3-medium diffusers folder in "
                           "models/diffusers/ (default stable-diffusion-3-medium-diffusers) or single file in "
                           "models/checkpoints/ (sd3_medium.safetensors); preset osdface: the SD-2.1-base folder "
                           "(default stable-diffusion-2-1-base)")
    p_restore.add_argument("--onestep-lora", default=None, help="preset ntire: TSD-SR folder in models/onestep_sr/ "
                           "(default tsdsr); preset osdface: the folder with OSDFace's three files (default osdface)")
    p_restore.add_argument("--reference", nargs="+", default=None, metavar="PHOTO",
                           help="preset id_preserve: one or more photos of the person (largest face of each)")
    p_restore.add_argument("--id-scale", type=float, default=None, help="preset id_preserve: a fixed ID scale "
                           "instead of the adaptive exp((9.5 - MUSIQ)/10) per face (the default when MUSIQ's "
                           "weights are in facemend_iqa/; without them 0.75, said on stderr and in the report)")
    p_restore.add_argument("--steps", type=int, default=50, help="preset id_preserve: DDIM steps (default 50)")
    p_restore.add_argument("--cfg", type=float, default=4.0, help="preset id_preserve: guidance (default 4)")
    p_restore.add_argument("--report", default=None, help="write a JSON report here (one entry per input; "
                           "failed inputs carry 'error')")
    p_restore.add_argument("--tune-steps", type=int, default=DEMO_TUNE_STEPS,
                           help=f"ZSSR steps of the demo preset (default {DEMO_TUNE_STEPS})")
    existing = p_restore.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace outputs that exist already "
                          "(default: refuse to start when any exists)")
    existing.add_argument("--skip-existing", action="store_true", help="leave outputs that exist already, and "
                          "skip their inputs (resume an interrupted run)")
    p_restore.add_argument("--max-output-megapixels", type=float, default=MAX_OUTPUT_PIXELS / 1024 ** 2,
                           help="refuse (before any work) an image whose output would be larger: the whole output "
                           f"is in memory, about {BYTES_PER_OUTPUT_PIXEL} bytes a pixel at the peak (default "
                           f"{MAX_OUTPUT_PIXELS // 1024 ** 2}; 0 = no limit)")
    p_restore.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p_restore.add_argument("--engine", default="local", choices=["local", "ray"], help="local (this process) or "
                           "ray: a Ray Data pipeline over a Ray cluster (pip install 'facemend[ray]'; see README, "
                           "At scale)")
    p_restore.add_argument("--ray-address", default=None, help="--engine ray: 'auto' or ray://host:10001 to join a "
                           "cluster (default: start a local Ray on this machine)")
    p_restore.add_argument("--actors", default="1", help="--engine ray: restoring actors (each holds the loaded "
                           "pipeline): N, or MIN,MAX to autoscale (default 1)")
    p_restore.add_argument("--gpus-per-actor", type=float, default=None, help="--engine ray: GPUs per actor "
                           "(default 1 when the cluster has GPUs, else 0)")
    p_restore.add_argument("--batch-faces", type=int, default=4, help="--engine ray: faces of several photos "
                           "per restorer forward, up to this many (default 4; presets that tune per photo keep "
                           "each photo's faces together and alone)")
    p_restore.add_argument("--recursive", action="store_true", help="also restore the images in the input folders' "
                           "subfolders; the output folder mirrors the input tree (default: top level only, "
                           "subfolders are listed)")
    p_demo = add("demo", help="degrade and restore a public-domain photo (no downloads)")
    p_demo.add_argument("-o", "--out", default="demo_output", help="output folder (default: demo_output/)")
    p_demo.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add("presets", help="list the presets")
    p_eval = add("evaluate", help="score a folder of restored images (NR-IQA, ID similarity, FID, "
                 "NTIRE 2025 score) into JSON, CSV and a PNG chart")
    p_eval.add_argument("outputs", help="folder of restored images (sub-folders named like the NTIRE subsets "
                        "get their ID thresholds)")
    p_eval.add_argument("--inputs", default=None, help="folder of the inputs, matched by file name (for ID)")
    p_eval.add_argument("-o", "--out", default="report", help="report folder (default: report/)")
    p_eval.add_argument("--metrics", default="niqe", help="comma-separated from niqe, clipiqa, maniqa, musiq")
    p_eval.add_argument("--niqe-variant", default="pyiqa", choices=["pyiqa", "matlab"],
                        help="NIQE as pyiqa/BasicSR compute it (default) or as the original MATLAB code")
    p_eval.add_argument("--id-model", default=None, help="adaface_ir50_ms1mv2.ckpt in models/adaface/ (the NTIRE "
                        "gate's own model) or an ArcFace ONNX in models/insightface/, e.g. "
                        "models/buffalo_l/w600k_r50.onnx (a proxy); needs --inputs")
    p_eval.add_argument("--protocol", default="ntire2025", choices=["ntire2025", "ntire2026"],
                        help="the challenge year's ID thresholds per subset (2026: Wider-Test 0.2, WebPhoto-Test "
                        "0.25; otherwise the same); more than 10 low faces fail (default ntire2025)")
    p_eval.add_argument("--landmarks", default=None, help="the organisers' landmark CSV (face_alignment/"
                        "test_face.csv, test_2026_face.csv, val_face.csv): each input's five points and subset")
    p_eval.add_argument("--id-threshold", type=float, default=0.6,
                        help="low-ID threshold for images outside the NTIRE subsets (default 0.6)")
    p_eval.add_argument("--fid-stats", default=None, help="FID statistics in models/facemend_iqa/ "
                        "(e.g. inception_FFHQ_512.pth, or a pytorch-fid .npz)")
    p_eval.add_argument("--qalign", type=float, default=None, help="mean Q-Align score of these outputs computed "
                        "elsewhere (pyiqa's qalign needs ~15 GB of GPU memory), to complete the NTIRE score")
    p_adapt = add("adapt", help="adapt a restorer to a folder of your aligned faces (diffusion-prior "
                  "pseudo targets + fine-tuning); saves facerestore_models/<name>.safetensors")
    p_adapt.add_argument("folder", help="folder of aligned square face crops (FFHQ template, 512x512)")
    p_adapt.add_argument("--restorer", default="GFPGANv1.4.pth", help="restorer in models/facerestore_models/ "
                         "(or a path)")
    p_adapt.add_argument("--name", required=True, help="name of the new model (never overwrites)")
    p_adapt.add_argument("--prior", default="iddpm_ffhq512_ema500000.pth", help="prior in models/facemend_priors/")
    p_adapt.add_argument("--work-dir", default=None, help="checkpoints, pseudo targets, loss curve and log "
                         "(default adapt_runs/<name>/; re-running resumes there)")
    p_adapt.add_argument("--steps", type=int, default=2000, help="optimiser steps (official 20000)")
    p_adapt.add_argument("--lr", type=float, default=2e-5, help="fine-tuning learning rate (default 2e-5)")
    p_adapt.add_argument("--lpips-weight", type=float, default=0.1, help="0: L1 only (no VGG file needed)")
    p_adapt.add_argument("--micro-batch", type=int, default=4, help="faces per forward/backward pass (default 4)")
    p_adapt.add_argument("--accumulate", type=int, default=4, help="micro-batches per optimiser step (default 4)")
    p_adapt.add_argument("--checkpoint-every", type=int, default=250, help="save a resumable checkpoint every "
                         "this many steps (default 250)")
    p_adapt.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                         help="training precision (default fp32)")
    p_adapt.add_argument("--start-step", type=int, default=150, help="prior step the pseudo targets start "
                         "from (default 150)")
    p_adapt.add_argument("--reg-end-step", type=int, default=90, help="prior step where the low-frequency "
                         "regularisation ends (default 90)")
    p_adapt.add_argument("--down-factor", type=int, default=8, help="8 general (official), 16 SwinIR-like")
    p_adapt.add_argument("--seed", type=int, default=20000, help="seed of the pseudo targets (default 20000)")
    p_adapt.add_argument("--batch-size", type=int, default=1, help="faces per prior call")
    p_adapt.add_argument("--respacing", default="250", help="respaced schedule (official 250); the step options "
                         "count in it (ddimN is refused: the official code then drops the constraint)")
    p_adapt.add_argument("--gan-weight", type=float, default=0.0, help="adversarial loss weight (official 0.1; "
                         "0 = off)")
    p_adapt.add_argument("--gan-real", default=None, help="folder of clean aligned faces for the discriminator "
                         "(default: the pseudo targets)")
    from .client.cli import add_api_parser  # headless client over ComfyUI servers

    add_api_parser(sub)
    return parser


def _restore_command(args) -> int:
    # Object-store and other URIs (s3://, gs://, file://) are read by Ray Data's filesystems: --engine ray only.
    uris = [i for i in args.inputs if "://" in i]
    if uris and args.engine != "ray":
        raise FaceMendError(f"{uris[0]}: inputs given by URI are read with --engine ray (pyarrow's filesystems); "
                            "the local engine reads files and folders")
    scan = scan_inputs([i for i in args.inputs if i not in uris], recursive=args.recursive, out_dir=args.out)
    if uris:
        from .scale.ray_engine import list_inputs

        listed, unlisted = list_inputs(uris)
        scan.files += listed
        scan.failed += unlisted
        if scan.names:  # a mirrored tree: URI inputs go to the top of the output folder
            scan.names.update({u: os.path.splitext(os.path.basename(u))[0] for u in listed})
    files, failed = scan.files, scan.failed
    for f in failed:
        print(f"{f['input']}: FAILED, {f['error']}", file=sys.stderr)
    for line in scan.notes():
        print(line, file=sys.stderr)
    if not files:
        hint = "; its photos are in subfolders: pass --recursive" if scan.subfolders else ""
        raise FaceMendError(f"no images found in {', '.join(args.inputs)}{hint}")
    check_output_dir(args.out, [d for d in args.inputs if os.path.isdir(d)])
    limit = int(args.max_output_megapixels * 1024 ** 2)
    files, too_big = within_output_limit(files, PRESETS[args.preset].upscale, limit)
    for f in too_big:
        print(f"{f['input']}: REFUSED, {f['error']}", file=sys.stderr)
    failed += too_big
    if not files:
        raise FaceMendError("nothing to restore: " + "; ".join(f["error"] for f in failed))
    try:
        pairs = plan_outputs(files, args.out, names=scan.names or None)
        claim = claim_output_dir(args.out, "python -m facemend " + " ".join(sys.argv[1:]))  # one run per folder
    except OutputError as exc:
        raise FaceMendError(str(exc)) from None
    try:
        policy = "overwrite" if args.overwrite else "skip" if args.skip_existing else "error"
        check_existing(pairs, policy)  # before loading any model
        if args.engine == "ray":  # the same checks above, then Ray Data does the work (scale/)
            from .scale.ray_engine import restore_command

            reports = restore_command(args, pairs, policy)
        else:
            reports = _restore_locally(args, files, pairs, policy, limit)
    finally:
        claim.release()
    reports = failed + reports
    if args.report:
        try:
            write_json_atomic(args.report, reports)
        except OSError as exc:
            raise FaceMendError(f"cannot write the report {args.report}: {exc.strerror or exc} (the outputs are "
                                f"written)") from exc
    bad = [r for r in reports if "error" in r]
    done = sum(1 for r in reports if "faces" in r)
    skipped = sum(1 for r in reports if r.get("skipped"))
    print(f"{done} restored, {skipped} skipped (output exists), {len(bad)} failed"
          + "".join(f"\n  {r['input']}: {r['error']}" for r in bad)
          + "".join(f"\n{line}" for line in scan.notes()), file=sys.stderr if bad else sys.stdout)
    return 1 if bad else 0


def _restore_locally(args, files, pairs, policy, limit) -> list[dict]:
    bars = CLIProgress(len(pairs), enabled=not args.no_progress)
    try:
        pipeline = build_pipeline(args.preset, args.detector, restorer=args.restorer, precision=args.precision,
                                  selection=args.selection, face_index=args.face_index,
                                  score_threshold=args.score_threshold, min_face_size=args.min_face_size,
                                  max_faces=args.max_faces, tune_steps=args.tune_steps, max_output_pixels=limit,
                                  onestep_base=args.onestep_base, onestep_lora=args.onestep_lora, progress=bars,
                                  reference=args.reference, id_scale=args.id_scale, steps=args.steps, cfg=args.cfg)
        return restore_files(files, args.out, pipeline, existing=policy, progress=bars, outputs=pairs)
    finally:
        bars.close()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    models_dirs = args.models_dir + getattr(args, "sub_models_dir", [])
    device = getattr(args, "sub_device", None) or args.device
    if models_dirs:
        model_paths.set_models_dirs(models_dirs)
    if device:
        dev.set_device(device)
    try:
        if args.command == "api":
            from .client.cli import run_api

            return run_api(args)
        if args.command == "presets":
            for spec in PRESETS.values():
                print(f"{spec.name}: {spec.description}")
        elif args.command == "demo":
            bars = CLIProgress(1, enabled=not args.no_progress)
            try:
                run_demo(args.out, progress=bars, log=bars.write)
            finally:
                bars.close()
        elif args.command == "adapt":
            adapt_folder(args.folder, args.restorer, args.name, args.prior, args.work_dir, args.steps, args.lr,
                         args.lpips_weight, args.micro_batch, args.accumulate, args.checkpoint_every, args.precision,
                         args.start_step, args.reg_end_step, args.down_factor, args.seed, args.batch_size,
                         args.gan_weight, args.gan_real, args.respacing)
        elif args.command == "evaluate":
            evaluate_folder(args.outputs, args.out, args.inputs, [m for m in args.metrics.split(",") if m],
                            args.id_model, args.id_threshold, args.fid_stats, args.niqe_variant, args.qalign,
                            protocol=args.protocol, landmarks=args.landmarks)
        else:
            return _restore_command(args)
    except FaceMendError as exc:
        if isinstance(exc, Interrupted):
            print("interrupted: finished outputs are complete, the one in progress was not written", file=sys.stderr)
            return 130
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished outputs are complete, the one in progress was not written", file=sys.stderr)
        return 130
    return 0
