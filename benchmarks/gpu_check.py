"""The first run on a lent GPU, in one command (under 10 minutes on one GPU): every shipped preset graph and every
node, in every host mode and precision, then the speed-goal figures and how far GPU results are from the CPU's.

    python benchmarks/gpu_check.py [--device cuda] [--comfyui DIR] [--out benchmarks/results]
    python benchmarks/gpu_check.py --dry-run    # every step on the CPU at tiny sizes; lists the CUDA-only calls

Parts (--parts picks some):
  graphs  the shipped API graphs (workflows/api: demo, fast, ntire, ntire_full, osdface, id_preserve, adapt) plus one graph
          of the nodes no preset uses (IQA score, ID similarity with ArcFace and AdaFace, best-of, authenticity, pseudo targets, adaptive ID
          scale), one node after the other in inference mode, in each mode: standalone (no ComfyUI: the nodes' plain
          functions, facemend.ops.node_ops()), ComfyUI's normal, lowvram and novram model management (the real
          ComfyUI from --comfyui / $COMFYUI_DIR imported in-process; the V3 node classes' execute as ComfyUI's
          executor calls it, in the node's executing context), in fp16 and bf16, with tiny random
          weights and, on a GPU, real-size random GFPGAN weights. Per run: ok or the error, seconds, faces/s, peak
          memory, host syncs (torch.cuda.set_sync_debug_mode) per run and per face, FaceMend models ComfyUI holds
          after the run and after free_memory (0 = evictable).
  speed   benchmarks/suite.py's stages for the speed goals (--quick, bf16): fast preset vs GFPGANer, restore (%
          of the bf16 peak, GFPGAN on 512 faces), one-step s/face, ZSSR s/step.
  diff    the same tiny graphs (fast, ntire) in fp32 on the CPU and on the device, same seed: max and mean |diff|
          of the output photo, with TF32 off and on (CUDA's generators and kernels differ from the CPU's).
Writes gpu_check-<device>.json and .md to --out; exits 1 when any run failed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import conftest  # noqa: E402,F401  (loads this checkout as `facemend`)
from _common import Peak  # noqa: E402

PARTS = ("graphs", "speed", "diff")
MODES = ("standalone", "comfy-normal", "comfy-lowvram", "comfy-novram")
REAL_MODES = ("comfy-normal", "comfy-lowvram")
DTYPES = ("fp16", "bf16")
EXTRAS = "extras"  # the graph of the nodes no preset uses


class Cuda:
    """The CUDA-only calls of the check. On a CPU (the dry run) each is skipped and listed with how often."""

    def __init__(self, device: torch.device):
        self.device, self.on = device, device.type == "cuda"
        self.skipped: dict[str, int] = {}

    def _skip(self, name: str) -> None:
        self.skipped[name] = self.skipped.get(name, 0) + 1

    def synchronize(self) -> None:
        if self.on:
            torch.cuda.synchronize(self.device)
        else:
            self._skip("torch.cuda.synchronize")

    @contextlib.contextmanager
    def count_syncs(self):
        """Yields a list that holds, after the block, the host syncs the block made (CUDA's sync debug mode)."""
        found: list = []
        if not self.on:
            self._skip("torch.cuda.set_sync_debug_mode")
            yield found
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield found
            finally:
                torch.cuda.set_sync_debug_mode(0)
        found += [w for w in caught if "synchroniz" in str(w.message).lower()]

    def peak(self):
        if not self.on:
            self._skip("torch.cuda.reset_peak_memory_stats / max_memory_allocated (RSS sampled instead)")
        return Peak(self.device)

    def tf32(self, on: bool) -> None:
        if self.on:
            torch.backends.cuda.matmul.allow_tf32 = on
            torch.backends.cudnn.allow_tf32 = on
        else:
            self._skip("torch.backends.cuda.matmul.allow_tf32 / cudnn.allow_tf32 (no effect on a CPU)")

    def name(self) -> str:
        if self.on:
            return torch.cuda.get_device_name(self.device)
        self._skip("torch.cuda.get_device_name")
        return "CPU (dry run)"


# ------------------------------------------------------------------------------------------------- model files

def make_models(root: Path, size: str, graphs=None) -> list[str]:
    """Random-weight model files under every name the graphs ask for (all graphs when None), in the official
    layouts; returns notes on what could not be made (those runs then fail with the missing file named)."""
    want = set(graphs or ("adapt", "id_preserve", "ntire", "ntire_full", "osdface", EXTRAS))
    from facemend.pipelines.restore.archs.gfpgan import GFPGANConfig, GFPGANv1Clean

    notes = []
    (root / "facerestore_models").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = GFPGANConfig() if size == "real" else GFPGANConfig(out_size=64, num_style_feat=64, narrow=0.25)
    sd = GFPGANv1Clean(cfg).state_dict()
    for name in ("GFPGANv1.3.pth", "GFPGANv1.4.pth"):
        torch.save({"params_ema": sd}, root / "facerestore_models" / name)
    if want & {"adapt", EXTRAS}:
        _make_prior_and_vgg(root)
    if want & {"ntire", "ntire_full"}:
        try:
            from onestep_models import make_tsdsr

            make_tsdsr(str(root), base_name="stable-diffusion-3-medium-diffusers")
        except ImportError as exc:
            notes.append(f"one-step models: {exc}")
    if "osdface" in want:
        try:
            from osdface_models import make_osdface

            make_osdface(str(root), base_name="stable-diffusion-2-1-base")
        except ImportError as exc:
            notes.append(f"OSDFace models: {exc}")
    if EXTRAS in want:  # the NTIRE gate's AdaFace IR-50 (full size: its architecture is fixed), Lightning layout
        from facemend.pipelines.quality.adaface import AdaFaceIRNet

        (root / "adaface").mkdir(exist_ok=True)
        torch.save({"state_dict": {"model." + k: v for k, v in AdaFaceIRNet().state_dict().items()}},
                   root / "adaface" / "adaface_ir50_ms1mv2.ckpt")
    if want & {"id_preserve", "ntire_full", EXTRAS}:
        try:
            from restorerid_models import export_tiny_arcface, make_restorerid_files

            if "id_preserve" in want:
                make_restorerid_files(str(root))
            (root / "insightface" / "models" / "buffalo_l").mkdir(parents=True, exist_ok=True)
            export_tiny_arcface(root / "insightface" / "models" / "buffalo_l" / "w600k_r50.onnx")
        except ImportError as exc:
            notes.append(f"RestorerID / ArcFace models: {exc}")
    niqe = conftest.MODELS / "iqa" / "niqe_pris_params.npz"
    if niqe.is_file():
        (root / "facemend_iqa").mkdir(exist_ok=True)
        (root / "facemend_iqa" / niqe.name).write_bytes(niqe.read_bytes())
    else:
        notes.append(f"NIQE: {niqe} missing")
    notes.append("CLIP-IQA / MANIQA / MUSIQ: no random-weight files (pyiqa layouts); their inputs are left "
                 "unconnected, NIQE scores instead")
    return notes


def _make_prior_and_vgg(root: Path) -> None:
    from facemend.pipelines.adapt.prior import PriorUNet, PriorUNetConfig

    (root / "facemend_priors").mkdir(exist_ok=True)
    prior = PriorUNet(PriorUNetConfig(image_size=512, model_channels=32, channel_mult=(1, 1, 1, 1, 1, 2),
                                      num_res_blocks=(1,) * 6, attention_resolutions=(16,), num_head_channels=64))
    torch.save(prior.state_dict(), root / "facemend_priors" / "iddpm_ffhq512_ema500000.pth")
    import torchvision  # LPIPS' VGG-16 backbone (its linear layers come with the lpips wheel)

    feats = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()},
               root / "facemend_priors" / "vgg16-397923af.pth")


# ------------------------------------------------------------------------------------------------------ graphs

def load_graphs() -> dict:
    from facemend.client.workflow import load_workflow, shipped_presets

    graphs = {name: load_workflow(name) for name in shipped_presets()}
    graphs[EXTRAS] = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "2": {"class_type": "FaceMend_DetectorLoader", "inputs": {"model": "mtcnn (embedded)", "precision": "fp32"}},
        "3": {"class_type": "FaceMend_DetectAlign", "inputs": {"image": ["1", 0], "detector": ["2", 0]}},
        "4": {"class_type": "FaceMend_RestorerLoader", "inputs": {"model": "GFPGANv1.4.pth"}},
        "5": {"class_type": "FaceMend_RestoreFaces", "inputs": {"face_crops": ["3", 0], "restorer": ["4", 0]}},
        "6": {"class_type": "FaceMend_IQALoader", "inputs": {"metric": "niqe"}},
        "7": {"class_type": "FaceMend_IQAScore", "inputs": {"image": ["5", 0], "metric": ["6", 0]}},
        "8": {"class_type": "FaceMend_IDModelLoader", "inputs": {"model": "models/buffalo_l/w600k_r50.onnx"}},
        "9": {"class_type": "FaceMend_IDSimilarity", "inputs": {"input_faces": ["3", 0], "restored_faces": ["5", 0],
                                                                "id_model": ["8", 0]}},
        "10": {"class_type": "FaceMend_BestOf", "inputs": {"candidates_1": ["3", 0], "candidates_2": ["5", 0],
                                                           "metric": ["6", 0]}},
        "11": {"class_type": "FaceMend_Authenticity", "inputs": {"face_crops": ["3", 0], "restorer": ["4", 0],
                                                                 "metric": ["6", 0]}},
        "12": {"class_type": "FaceMend_DiffusionPriorLoader", "inputs": {"model": "iddpm_ffhq512_ema500000.pth"}},
        "13": {"class_type": "FaceMend_PseudoTargets", "inputs": {"face_crops": ["3", 0], "restorer": ["4", 0],
                                                                  "prior": ["12", 0], "start_step": 2,
                                                                  "reg_end_step": 1}},
        "14": {"class_type": "FaceMend_AdaptiveIDScale", "inputs": {"musiq": ["7", 0]}},
        "15": {"class_type": "FaceMend_ColorFix", "inputs": {"image": ["13", 0], "reference": ["3", 0]}},
        "16": {"class_type": "FaceMend_PasteBack", "inputs": {"image": ["1", 0], "face_crops": ["15", 0],
                                                              "alignment": ["3", 1]}},
        "17": {"class_type": "SaveImage", "inputs": {"images": ["16", 0]}},
        "18": {"class_type": "FaceMend_IDModelLoader", "inputs": {"model": "adaface_ir50_ms1mv2.ckpt"}},
        "19": {"class_type": "FaceMend_IDSimilarity", "inputs": {"input_faces": ["3", 0], "restored_faces": ["5", 0],
                                                                 "id_model": ["18", 0], "protocol": "ntire2026",
                                                                 "subset": "CelebA"}},
    }
    return graphs


UNWEIGHTED_METRICS = ("clipiqa", "maniqa", "musiq")


def adjust(graph: dict, size: str, dtype: str, tag: str = "") -> dict:
    """The graph at this size and precision: precision inputs set, long loops shortened at the tiny size, the
    album folder of the adapt graph replaced by the detected faces, metrics without weights disconnected."""
    g = json.loads(json.dumps(graph))
    dropped = {nid for nid, n in g.items() if n["class_type"] == "FaceMend_IQALoader"
               and n["inputs"].get("metric") in UNWEIGHTED_METRICS}
    for nid in dropped:
        del g[nid]
    for n in g.values():
        ins, ct = n["inputs"], n["class_type"]
        for k in [k for k, v in ins.items() if isinstance(v, list) and v[0] in dropped]:
            del ins[k]
        if "precision" in ins and ct != "FaceMend_DetectorLoader":
            ins["precision"] = dtype
        if size == "tiny":
            if ct == "FaceMend_DetectAlign":
                ins["crop_size"] = 192  # NIQE (extras) needs two 96 px blocks
            if ct == "FaceMend_PerImageTune":
                ins.update(steps=2, crop_size=32, validation_interval=1)
            if ct == "FaceMend_RestorerIDRestore":
                ins.update(steps=2)
            if ct in ("FaceMend_AdaptRestorer", "FaceMend_PseudoTargets"):
                ins.update(start_step=2, reg_end_step=1, down_factor=16)
        if ct == "FaceMend_AdaptRestorer":
            det = next(k for k, v in g.items() if v["class_type"] == "FaceMend_DetectAlign")
            ins.update(steps=1 if size == "tiny" else 5, micro_batch=1, accumulate=1, checkpoint_every=1000,
                       lpips_weight=0.1, folder="", face_crops=[det, 0], name=f"gpu_check_{tag}_{dtype}_{size}",
                       precision=dtype)
    return g


def node_functions(hosted: bool, temp_dir: Path | None = None, models_root: Path | None = None) -> dict:
    """Node id -> callable(**inputs) returning the node's outputs as a tuple. Standalone: the plain functions of
    facemend.ops (no ComfyUI imported); hosted: the node classes run as ComfyUI's executor runs them (a V3 class's
    clone and its execute, inside the node's executing context so progress goes through the execution API; the
    NodeOutput's result; a node still on the dictionary API during the migration: FUNCTION on an instance)."""
    if not hosted:
        from facemend.ops import node_ops

        return node_ops()
    comfy_dir = os.environ.get("COMFYUI_DIR", "")
    if comfy_dir and comfy_dir not in sys.path:
        sys.path.append(comfy_dir)  # comfy_api, comfy_execution: the node API the classes import
    from comfy_execution import progress as comfy_progress
    from comfy_execution.utils import CurrentNodeContext

    from facemend.nodes import NODE_CLASSES

    # ComfyUI's executor gives each prompt a progress registry (reset_progress_state); here one without handlers,
    # made directly: the default one imports ComfyUI's top-level `nodes`, which this checkout's nodes/ shadows when
    # the repository root is on sys.path (python -m pytest).
    comfy_progress.global_progress_registry = comfy_progress.ProgressRegistry("gpu_check", None)

    import folder_paths

    if temp_dir is not None:  # node previews (ui.PreviewImage) are written there, not into the ComfyUI checkout
        folder_paths.set_temp_directory(str(temp_dir))
    if models_root is not None:  # hosted, models resolve through folder_paths: a ComfyUI whose models/ is this root
        from facemend.host import model_paths

        model_paths.register_comfy_folders()
        for name in list(folder_paths.folder_names_and_paths):
            folder_paths.add_model_folder_path(name, str(models_root / name), is_default=True)
        folder_paths.filename_list_cache.clear()

    def run(node_id, cls):
        def call(_nid="gpu_check", **inputs):
            with CurrentNodeContext("gpu_check", _nid, None):
                if hasattr(cls, "EXECUTE_NORMALIZED"):  # V3 (io.ComfyNode)
                    cls.VALIDATE_CLASS()
                    return tuple(cls.PREPARE_CLASS_CLONE({}).EXECUTE_NORMALIZED(**inputs).result or ())
                res = getattr(cls(), cls.FUNCTION)(**inputs)
                return res["result"] if isinstance(res, dict) else res
        return call

    return {node_id: run(node_id, cls) for node_id, cls in NODE_CLASSES.items()}


def run_graph(graph: dict, image: torch.Tensor, hosted: bool = False, overrides: dict | None = None,
              temp_dir: Path | None = None, models_root: Path | None = None) -> dict:
    """Execute an API graph with the pack's nodes, as ComfyUI does (each node in inference mode, inputs from the
    outputs of the nodes it is wired to): standalone their ops functions, hosted their node classes
    (node_functions). LoadImage gives `image`; SaveImage keeps what it is given. overrides: node id -> a function
    used instead (the real-size one-step loader)."""
    functions = {**node_functions(hosted, temp_dir, models_root), **(overrides or {})}
    done: dict = {}
    saved: list = []

    def output(nid):
        if nid in done:
            return done[nid]
        node = graph[nid]
        ins = {k: (output(v[0])[v[1]] if isinstance(v, list) else v) for k, v in node["inputs"].items()}
        ct = node["class_type"]
        with torch.inference_mode():
            if ct == "LoadImage":
                out = (image, torch.zeros(image.shape[:3]))
            elif ct == "SaveImage":
                saved.append(ins["images"])
                out = ()
            elif ct == "ImageScaleBy":  # ComfyUI's core node (bicubic), for the demo graph
                x = ins["image"].movedim(-1, 1)
                out = (F.interpolate(x, scale_factor=float(ins["scale_by"]), mode="bicubic",
                                     align_corners=False).clamp(0, 1).movedim(1, -1),)
            elif hosted and ct not in (overrides or {}):
                out = functions[ct](_nid=nid, **ins)
            else:
                out = functions[ct](**ins)
        done[nid] = out
        return out

    for nid in graph:
        output(nid)
    faces = [v[2] for nid, v in done.items() if graph[nid]["class_type"] == "FaceMend_DetectAlign"]
    return {"saved": saved, "faces": int(faces[0]) if faces else 0}


def clear_caches() -> None:
    """Forget loaded models between modes (a model keeps the patcher of the ComfyUI that loaded it): every ops
    module's cache and the detectors'."""
    import importlib

    from facemend import ops
    from facemend.pipelines.face import detectors

    for stage in ops.STAGES:
        try:
            module = importlib.import_module(f"facemend.ops.{stage}")
        except ModuleNotFoundError:  # a stage not yet moved to ops/ (migration): nothing cached there
            continue
        getattr(module, "_cache", {}).clear()
    detectors._cache.clear()


@contextlib.contextmanager
def hosted(mode: str, comfy_mods: dict | None, device: torch.device):
    """The pack standalone, or hosted by the in-process ComfyUI in `mode`. On a CPU (dry run) ComfyUI's compute
    device is cpu:0 against its cpu offload device (tests/comfy_inprocess.py), so models still move."""
    import pytest

    clear_caches()
    if mode == "standalone":
        from facemend.host import device as dev

        dev.set_device(device)
        try:
            yield None
        finally:
            dev.set_device(None)
        return
    from comfy_inprocess import host

    with pytest.MonkeyPatch.context() as mp:
        mm = host(mp, comfy_mods, mode.split("-", 1)[1], fake_device=device.type == "cpu")
        try:
            yield mm
        finally:
            mm.free_memory(1e30, mm.get_torch_device())
    clear_caches()


@contextlib.contextmanager
def counting_steps():
    """Yields [n]: the units of work the nodes reported to their progress bars during the block (faces, tiles,
    sampler and training steps), the denominator of syncs per step."""
    from facemend.host import device as dev

    count, update = [0], dev.Progress.update

    def counted(self, n=1, **kw):  # kw: the live preview a node may pass along
        count[0] += n
        return update(self, n, **kw)

    dev.Progress.update = counted
    try:
        yield count
    finally:
        dev.Progress.update = update


def facemend_models_held(mm) -> int:
    from facemend.host.models import ModelHolder

    return sum(isinstance(getattr(e.model, "model", None), ModelHolder) for e in mm.current_loaded_models)


def test_image(size: str) -> torch.Tensor:
    """IMAGE [1,H,W,3]: a real photo from ../shared (faces found) or, without it, noise (no face: pass-through)."""
    photo = conftest.FACES / "whole_lq_real" / "00.jpg"
    if photo.is_file():
        x = conftest.load_image(photo)[:, :3]
    else:
        x = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    side = 384 if size == "tiny" else 1024
    s = side / max(x.shape[-2:])
    if s < 1:
        x = F.interpolate(x, scale_factor=s, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    return x.movedim(1, -1).contiguous()


class RealOneStep:
    """The one-step SR loader of the real-size runs: SD3-medium / SD2.1 at their published sizes with random
    weights (benchmarks/bench_onestep.py builds them on the device, in the dtype), one per precision, put under
    ComfyUI's model management when hosted like the loader's own."""

    def __init__(self, device):
        self.device, self.models = device, {}

    def __call__(self, backend, base_model="", lora="", precision="auto", prompt=""):
        import bench_onestep as B
        from facemend.host import models as hm
        from facemend.host.device import resolve_dtype

        dtype = resolve_dtype(precision, self.device)
        key = (backend, dtype)
        if key not in self.models:
            self.models.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.models[key] = B.real_size_model(backend, self.device, dtype)
        return hm.manage(self.models[key], f"one-step SR {backend} (real size)")


def part_graphs(args, device, cuda: Cuda, comfy_mods, work: Path) -> list[dict]:
    from facemend.host import model_paths

    rows = []
    sizes = ["tiny"] + (["real"] if device.type == "cuda" and not args.tiny_only else [])
    graphs = load_graphs()
    names = [n for n in (args.graphs.split(",") if args.graphs else graphs) if n]
    modes = [m for m in (args.modes.split(",") if args.modes else MODES) if m]
    if comfy_mods is None:
        rows += [{"part": "graphs", "mode": m, "error": "skipped: no ComfyUI (--comfyui or $COMFYUI_DIR)"}
                 for m in modes if m != "standalone"]
        modes = [m for m in modes if m == "standalone"]
    for size in sizes:
        root = work / f"models-{size}"
        notes = make_models(root, size, names)
        model_paths.set_models_dirs([str(root)])
        image = test_image(size)
        overrides = {}
        if size == "real":  # SD3 / SD2.1 at full size: built in memory (2 B parameters are not written to disk)
            real = RealOneStep(device)
            overrides["FaceMend_OneStepSRLoader"] = lambda **kw: (real(**kw),)
            notes.append("real size: GFPGAN and one-step SR at their published sizes; RestorerID, the prior and "
                         "ArcFace stay tiny (their real-size figures: suite.py identity / adapt)")
        # Real size in ComfyUI's normal and lowvram modes (standalone without ComfyUI): the other modes load the
        # same models the same way, the tiny runs cover them.
        size_modes = modes if size == "tiny" else [m for m in modes if m in REAL_MODES] or modes[:1]
        for mode in size_modes:
            for dtype in (args.dtypes.split(",") if args.dtypes else DTYPES):
                for name in names:
                    row = {"part": "graphs", "graph": name, "mode": mode, "dtype": dtype, "size": size}
                    if time.perf_counter() > args.deadline:
                        row["error"] = "skipped: over the time budget (--budget-s)"
                        rows.append(row)
                        continue
                    print(f"   {name:12s} {mode:14s} {dtype} {size}", end=" ", flush=True)
                    try:
                        with hosted(mode, comfy_mods, device) as mm:
                            graph = adjust(graphs[name], size, dtype, mode)
                            with cuda.peak() as peak, cuda.count_syncs() as syncs, counting_steps() as steps:
                                t = time.perf_counter()
                                out = run_graph(graph, image, hosted=mm is not None, overrides=overrides,
                                                temp_dir=work / "comfy-temp", models_root=root)
                                cuda.synchronize()
                                row["seconds"] = time.perf_counter() - t
                            n_syncs = len(syncs) if cuda.on else None  # counted on CUDA only
                            row.update(faces=out["faces"], peak_mib=peak.used / 2 ** 20, syncs=n_syncs,
                                       faces_per_s=out["faces"] / row["seconds"] if out["faces"] else None,
                                       syncs_per_face=n_syncs / out["faces"] if out["faces"] and cuda.on else None,
                                       steps=steps[0],
                                       syncs_per_step=n_syncs / steps[0] if steps[0] and cuda.on else None)
                            if mm is not None:
                                row["models_held"] = facemend_models_held(mm)
                                mm.free_memory(1e30, mm.get_torch_device())
                                row["models_held_after_free"] = facemend_models_held(mm)
                            row["finite"] = all(bool(torch.isfinite(s).all()) for s in out["saved"])
                        print(f"ok {row['seconds']:.2f} s", flush=True)
                    except Exception as exc:  # a failing graph is a finding, not the end of the check
                        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                        tb = traceback.format_exc()
                        row["traceback"] = tb if len(tb) < 6000 else tb[:3000] + "\n...\n" + tb[-3000:]
                        print("FAILED", row["error"], flush=True)
                    rows.append(row)
        rows.append({"part": "graphs", "size": size, "note": "; ".join(notes)})
    model_paths.set_models_dirs([])
    return rows


def speed_goal(r: dict, device) -> str:
    """The figure a speed goal reads from a suite row."""
    stage, s = r["stage"], r["ours_s"]
    if stage == "fast_preset" and r.get("ratio"):
        return f"fast preset {r['ratio']:.2f}x GFPGANer"
    if stage == "restore":
        pct = [p for p in str(r.get("note", "")).split(";") if "peak" in p]
        return f"restore {pct[0].strip()}" if pct else ""
    if stage == "onestep" and s:
        return f"{s:.3f} s/face ({r['case'].split(',')[0]})"
    if stage == "zssr" and s:
        steps = 30 if device.type == "cpu" else 300  # suite.py stage_zssr's --quick schedule
        return f"{s / steps * 1000:.1f} ms/step ({steps} steps)"
    return ""


def part_speed(args, device) -> list[dict]:
    import suite

    argv = ["--quick", "--device", str(device), "--dtype", "bf16", "--restorers", "gfpgan",
            "--stages", args.speed_stages, "--out", args.out, "--repeats", "1" if args.dry_run else "3"]
    result = suite.run(suite.parser().parse_args(argv))
    rows = [{"part": "speed", **r, "goal": speed_goal(r, device)} for r in result["rows"]]
    rows += [{"part": "speed", "stage": s["stage"], "error": s["why"]} for s in result["skipped"]]
    return rows


def part_diff(args, device, cuda: Cuda, work: Path) -> list[dict]:
    """Tiny fast and ntire graphs (those of --graphs) in fp32: CPU against the device, same seed; TF32 off, then
    on."""
    from facemend.host import model_paths

    names = [g for g in ("fast", "ntire") if not args.graphs or g in args.graphs.split(",")] or ["fast"]
    root = work / "models-diff"
    make_models(root, "tiny", names)
    model_paths.set_models_dirs([str(root)])
    image, graphs, rows = test_image("tiny"), load_graphs(), []
    try:
        for name in names:
            graph = adjust(graphs[name], "tiny", "fp32")
            outs = {}
            for where, tf32 in (("cpu", False), ("device", False), ("device", True)):
                cuda.tf32(tf32)
                with hosted("standalone", None, torch.device("cpu") if where == "cpu" else device):
                    outs[(where, tf32)] = run_graph(graph, image)["saved"][0].float().cpu()
            cuda.tf32(False)
            for tf32 in (False, True):
                d = (outs[("device", tf32)] - outs[("cpu", False)]).abs()
                rows.append({"part": "diff", "graph": name, "tf32": tf32, "max_abs": float(d.max()),
                             "mean_abs": float(d.mean()), "max_255": float(d.max() * 255)})
    finally:
        model_paths.set_models_dirs([])
    return rows


# ------------------------------------------------------------------------------------------------------ output

def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    lines = [f"`benchmarks/gpu_check.py {' '.join(result['argv'])}` on {result['device_name']} "
             f"(torch {torch.__version__}, {result['date']}): {result['failures']} failed run(s)."]
    graphs = [r for r in result["rows"] if r["part"] == "graphs" and "graph" in r]
    if graphs:
        lines += ["", "| graph | mode | dtype | size | result | s | faces/s | peak MiB | syncs | syncs/face | steps | "
                  "syncs/step | held | after free |", "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in graphs:
        ok = "ok" if "error" not in r else r["error"].replace("|", "/")[:120]
        lines.append(f"| {r['graph']} | {r['mode']} | {r['dtype']} | {r['size']} | {ok} | "
                     f"{fmt(r.get('seconds'), '.2f')} | {fmt(r.get('faces_per_s'), '.2f')} | "
                     f"{fmt(r.get('peak_mib'), '.0f')} | {fmt(r.get('syncs'), 'd')} | "
                     f"{fmt(r.get('syncs_per_face'), '.1f')} | {fmt(r.get('steps'), 'd')} | "
                     f"{fmt(r.get('syncs_per_step'), '.2f')} | {fmt(r.get('models_held'), 'd')} | "
                     f"{fmt(r.get('models_held_after_free'), 'd')} |")
    speed = [r for r in result["rows"] if r["part"] == "speed"]
    if speed:
        lines += ["", "| speed stage | case | goal figure | ours s | reference s | ratio | faces/s | peak MiB | note |",
                  "|---|---|---|---:|---:|---:|---:|---:|---|"]
        for r in speed:
            lines.append(f"| {r.get('stage')} | {r.get('case', 'skipped')} | {r.get('goal', '')} | "
                         f"{fmt(r.get('ours_s'), '.3f')} | "
                         f"{fmt(r.get('reference_s'), '.3f')} | {fmt(r.get('ratio'), '.2f')} | "
                         f"{fmt(r.get('faces_per_s'), '.2f')} | {fmt(r.get('peak_mib'), '.0f')} | "
                         f"{str(r.get('note') or r.get('error', '')).replace('|', '/')[:160]} |")
    diff = [r for r in result["rows"] if r["part"] == "diff"]
    if diff:
        lines += ["", "| device vs CPU (fp32, same seed) | TF32 | max abs | mean abs | max x255 |",
                  "|---|---|---:|---:|---:|"]
        lines += [f"| {r['graph']} | {'on' if r['tf32'] else 'off'} | {r['max_abs']:.2e} | {r['mean_abs']:.2e} | "
                  f"{r['max_255']:.2f} |" for r in diff]
    if result["cuda_skipped"]:
        lines += ["", "CUDA-only calls skipped (dry run): " +
                  ", ".join(f"{k} x{v}" for k, v in result["cuda_skipped"].items())]
    notes = [r["note"] for r in result["rows"] if r["part"] == "graphs" and r.get("note")]
    if notes:
        lines += ["", "Notes: " + " / ".join(notes)]
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dry-run", action="store_true", help="the CPU, tiny sizes; list the CUDA-only calls skipped")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR", ""), help="ComfyUI checkout (default "
                    "$COMFYUI_DIR); without one only the standalone mode runs")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--graphs", default="", help="comma-separated graph names (default: every preset + extras)")
    ap.add_argument("--modes", default="", help=f"comma-separated subset of {','.join(MODES)}")
    ap.add_argument("--dtypes", default="", help=f"comma-separated subset of {','.join(DTYPES)}")
    ap.add_argument("--tiny-only", action="store_true", help="no real-size restorer weights")
    ap.add_argument("--speed-stages", default="fast_preset,restore,onestep,zssr",
                    help="benchmarks/suite.py stages of the speed part")
    ap.add_argument("--budget-s", type=float, default=None, help="graph runs past this many seconds are "
                    "listed as skipped, and the speed part then runs its first stage only (default: 540 on a GPU, "
                    "none in a dry run, which takes every step)")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for gpu_check-<device>.json/.md")
    return ap


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    budget = args.budget_s if args.budget_s is not None else (float("inf") if args.dry_run else 540.0)
    args.deadline = time.perf_counter() + budget
    device = torch.device("cpu" if args.dry_run else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --dry-run to check the steps on the CPU")
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    cuda = Cuda(device)
    comfy_mods = None
    if args.comfyui and Path(args.comfyui, "main.py").is_file():
        os.environ["COMFYUI_DIR"] = args.comfyui
        import comfy_inprocess

        comfy_inprocess.COMFYUI_DIR = args.comfyui
        comfy_mods = comfy_inprocess.import_comfy(cpu=device.type != "cuda")
    result = {"argv": sys.argv[1:] if argv is None else list(argv), "device": str(device), "dry_run": args.dry_run,
              "device_name": cuda.name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": []}
    with tempfile.TemporaryDirectory(prefix="facemend-gpu-check-") as work:
        cwd = os.getcwd()
        os.chdir(work)  # the adapt node writes output/facemend_adapt/<name>/ under the working folder
        try:
            if "graphs" in parts:
                print("== graphs", flush=True)
                result["rows"] += part_graphs(args, device, cuda, comfy_mods, Path(work))
            if "diff" in parts:
                print("== diff", flush=True)
                result["rows"] += part_diff(args, device, cuda, Path(work))
            if "speed" in parts:
                print("== speed", flush=True)
                if time.perf_counter() > args.deadline:
                    args.speed_stages = args.speed_stages.split(",")[0]
                result["rows"] += part_speed(args, device)
        finally:
            os.chdir(cwd)
    result["cuda_skipped"] = cuda.skipped
    result["failures"] = sum(1 for r in result["rows"] if r["part"] == "graphs" and "error" in r
                             and not r["error"].startswith("skipped"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"gpu_check-{'dry-run' if args.dry_run else device.type}"
    for suffix, text in ((".json", json.dumps(result, indent=1, default=str)), (".md", markdown(result))):
        tmp = stem.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, stem.with_suffix(suffix))
    print(markdown(result))
    print(f"wrote {stem}.json and {stem}.md")
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["failures"] else 0)
