"""FaceMend's models under the real ComfyUI's model management (imported in CPU mode; tests/comfy_inprocess.py
makes cpu:0 the compute device and cpu the offload device, so ComfyUI's bookkeeping sees two devices as on a GPU
machine): registered in current_loaded_models, kept loaded between runs, evicted by free_memory, unloaded after
each node with --novram; standalone nothing changes. Out of memory reaches ComfyUI as its own exception."""
import pytest
import torch

from facemend.host import models as hm
from facemend.host import model_paths
from facemend.pipelines.restore.archs.gfpgan import GFPGANConfig, GFPGANv1Clean

from comfy_inprocess import COMPUTE, OFFLOAD, host, import_comfy, loaded_entry
from conftest import node_class
from node_specs import node_op, stage_module

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def comfy():
    return import_comfy()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    from onestep_models import make_tsdsr

    root = tmp_path_factory.mktemp("models")
    (root / "facerestore_models").mkdir()
    torch.manual_seed(0)
    net = GFPGANv1Clean(GFPGANConfig(out_size=64, num_style_feat=64, narrow=0.25))
    torch.save({"params_ema": net.state_dict()}, root / "facerestore_models" / "tiny_gfpgan.pth")
    make_tsdsr(str(root))
    model_paths.set_models_dirs([str(root)])
    yield root
    model_paths.set_models_dirs([])


@pytest.fixture(autouse=True)
def no_comfyui_server(monkeypatch):
    # Importing the node API (node_class) brings ComfyUI's folder_paths, where a hosted process looks models up, and
    # installs the progress reporter of ComfyUI's execution API. Neither works without ComfyUI's server (the pack was
    # not loaded by it: its folders are not registered, no prompt is executing), and these tests are about model
    # management: models are found on the standalone search path (models_dir) and progress goes nowhere, as before.
    import sys

    from facemend.host import device

    monkeypatch.delitem(sys.modules, "folder_paths", raising=False)
    monkeypatch.setattr(device, "_reporter", None)


@pytest.fixture(autouse=True)
def fresh_caches():
    from facemend.pipelines.face import detectors

    caches = tuple(stage_module(s)._cache for s in ("restore", "diffusion", "adapt")) + (detectors._cache,)
    for c in caches:
        c.clear()
    yield
    for c in caches:
        c.clear()


def _weights_device(model):
    return {p.device for p in hm.patcher_of(model).model.parameters()}


@pytest.mark.parametrize("vram", ["normal", "lowvram", "novram"])
def test_restorer_and_detector_load_keep_and_evict_like_comfy_models(comfy, models_dir, monkeypatch, vram):
    mm = host(monkeypatch, comfy, vram)
    restorer = node_op("FaceMend_RestorerLoader")("tiny_gfpgan.pth", "fp32")[0]
    p = hm.patcher_of(restorer)
    assert p is not None and p.load_device == COMPUTE and p.offload_device == OFFLOAD != COMPUTE
    whole = []  # while the network runs, ComfyUI holds it loaded whole, whatever the VRAM mode
    restorer.net.register_forward_pre_hook(lambda *_: whole.append(p.loaded_size() == p.model_size() > 0))
    faces = torch.rand(2, 64, 64, 3)
    out = node_op("FaceMend_RestoreFaces")(faces, restorer, 1.0, 0.5, 2, 0)[0]
    assert whole == [True]
    if vram == "novram":  # unloaded again as soon as the node is done
        assert loaded_entry(mm, restorer) is None and p.loaded_size() == 0
    else:  # kept loaded for the next run, and ComfyUI knows it
        entry = loaded_entry(mm, restorer)
        assert entry is not None and entry.device == COMPUTE and p.loaded_size() == p.model_size()
        mm.free_memory(1e30, COMPUTE)  # what ComfyUI does when another model needs the memory
        assert loaded_entry(mm, restorer) is None and p.loaded_size() == 0 and _weights_device(restorer) == {OFFLOAD}
    again = node_op("FaceMend_RestoreFaces")(faces, restorer, 1.0, 0.5, 2, 0)[0]
    assert torch.equal(out, again) and whole == [True, True]

    detector = node_op("FaceMend_DetectorLoader")("mtcnn (embedded)", "fp32")[0]
    node_op("FaceMend_DetectAlign")(torch.rand(1, 64, 64, 3), detector)
    assert (loaded_entry(mm, detector) is None) == (vram == "novram")
    assert hm.patcher_of(detector).model_size() == sum(
        t.numel() * t.element_size() for net in (detector.pnet, detector.rnet, detector.onet)
        for t in net.state_dict().values())


def test_retinaface_drops_its_inference_copy_when_evicted(comfy, models_dir, monkeypatch):
    from conftest import need_shared

    path = need_shared("models", "facedetection", "retinaface_mobilenet0.25_1mb.pth")
    model_paths.set_models_dirs([str(models_dir), str(path.parent.parent)])
    try:
        mm = host(monkeypatch, comfy)
        detector = node_op("FaceMend_DetectorLoader")(path.name, "fp32")[0]
        node_op("FaceMend_DetectAlign")(torch.rand(1, 96, 96, 3), detector)
        assert detector._fast is not None and loaded_entry(mm, detector) is not None
        mm.free_memory(1e30, COMPUTE)
        assert detector._fast is None and detector.device == OFFLOAD  # no copy left behind on the compute device
        node_op("FaceMend_DetectAlign")(torch.rand(1, 96, 96, 3), detector)
        assert detector.device == COMPUTE and loaded_entry(mm, detector) is not None
    finally:
        model_paths.set_models_dirs([str(models_dir)])


def test_onestep_model_stays_loaded_between_runs(comfy, models_dir, monkeypatch):
    """SD3 (2 B parameters for the real one) is not copied to the GPU and back on every run when it fits: ComfyUI
    loads it on first use and keeps it until it needs the memory."""
    from facemend.pipelines.diffusion.refiner import OneStepSR

    mm = host(monkeypatch, comfy)
    model = node_op("FaceMend_OneStepSRLoader")("tsdsr", "sd3-tiny", "tsdsr", "fp32")[0]
    assert loaded_entry(mm, model) is None  # loaded on the offload device, not counted before use
    moves = []
    monkeypatch.setattr(OneStepSR, "to", lambda self, d: moves.append(d) or self)
    image = torch.rand(1, 32, 32, 3)
    out = node_op("FaceMend_OneStepSR")(image, model, scale=1, tile_size=0, tile_overlap=-1, seed=1)[0]
    entry = loaded_entry(mm, model)
    assert entry is not None and hm.patcher_of(model).loaded_size() == hm.patcher_of(model).model_size()
    again = node_op("FaceMend_OneStepSR")(image, model, scale=1, tile_size=0, tile_overlap=-1, seed=1)[0]
    assert torch.equal(out, again) and moves == [] and loaded_entry(mm, model) is entry
    mm.free_memory(1e30, COMPUTE)
    assert loaded_entry(mm, model) is None


def test_tune_node_frees_memory_for_one_group_not_the_batch(comfy, monkeypatch):
    from facemend.ops.tune import per_image_tune
    from facemend.pipelines.tune.zssr import ZSSR, ZSSRConfig

    mm = host(monkeypatch, comfy)
    asked = []
    monkeypatch.setattr(mm, "free_memory", lambda b, d, keep_loaded=(): asked.append((b, d)) or [])
    n, side = 4, 24
    per_image_tune(torch.rand(n, side, side, 3), "zssr", 2, steps=2, crop_size=16, back_projection_iters=0,
                   self_ensemble=False)
    cfg = ZSSRConfig(scale=2, crop_size=16, back_projection_iters=0, self_ensemble=False).scaled_policy(2)
    cost = ZSSR(cfg).face_cost(side, side, COMPUTE)
    assert (cost.group + n * cost.batch, COMPUTE) in asked
    assert all(b < n * (cost.group + cost.batch) for b, _ in asked)


def test_out_of_memory_reaches_comfy_as_its_own_exception(comfy, models_dir, monkeypatch):
    from facemend.pipelines.restore.restorer import FaceRestorer

    def alloc_failed(self, *a, **k):
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

    restorer = node_op("FaceMend_RestorerLoader")("tiny_gfpgan.pth", "fp32")[0]  # standalone
    node = node_class("FaceMend_RestoreFaces")  # the node as ComfyUI runs it: nodes/__init__ wraps its execute
    monkeypatch.setattr(FaceRestorer, "_restore_chunk", alloc_failed)
    with pytest.raises(RuntimeError, match="ALLOC_FAILED") as standalone:
        node.execute(torch.rand(1, 64, 64, 3), restorer, 1.0, 0.5, 1, 0)
    assert not isinstance(standalone.value, torch.OutOfMemoryError)
    mm = host(monkeypatch, comfy)
    with pytest.raises(mm.OOM_EXCEPTION, match="ALLOC_FAILED"):  # ComfyUI then unloads its models
        node.execute(torch.rand(1, 64, 64, 3), restorer, 1.0, 0.5, 1, 0)
    with pytest.raises(ValueError):  # other errors pass unchanged
        node.execute(torch.rand(1, 64, 64, 3), restorer, 2.0, 0.5, 1, 0)


def test_standalone_models_are_not_wrapped(models_dir):
    restorer = node_op("FaceMend_RestorerLoader")("tiny_gfpgan.pth", "fp32")[0]
    assert hm.patcher_of(restorer) is None
    out, = node_op("FaceMend_RestoreFaces")(torch.rand(1, 64, 64, 3), restorer, 1.0, 0.5, 1, 0)
    assert out.shape == (1, 64, 64, 3)


def test_adapt_node_under_comfy_inference_mode(comfy, models_dir, monkeypatch, tmp_path):
    """ComfyUI runs nodes (loaders too) under torch.inference_mode(); the adapt node fine-tunes outside it. Its
    models must be loaded by ComfyUI in the mode the node was called in: moved outside inference mode, the
    loader's inference-mode weights failed on their first view (found by gpu_check's dry run)."""
    from facemend.pipelines.adapt.prior import PriorUNet, PriorUNetConfig

    (models_dir / "facemend_priors").mkdir(exist_ok=True)
    prior = PriorUNet(PriorUNetConfig(image_size=512, model_channels=32, channel_mult=(1, 1, 1, 1, 1, 2),
                                      num_res_blocks=(1,) * 6, attention_resolutions=(16,), num_head_channels=64))
    torch.save(prior.state_dict(), models_dir / "facemend_priors" / "prior_tiny.pth")
    monkeypatch.chdir(tmp_path)
    mm = host(monkeypatch, comfy, "lowvram")
    with torch.inference_mode():
        restorer = node_op("FaceMend_RestorerLoader")("tiny_gfpgan.pth", "bf16")[0]
        prior = node_op("FaceMend_DiffusionPriorLoader")("prior_tiny.pth")[0]
        res = node_op("FaceMend_AdaptRestorer")(restorer, prior, "hosted_adapt", steps=1, lpips_weight=0.0,
                                                  micro_batch=1, accumulate=1, start_step=1, reg_end_step=1,
                                                  down_factor=16, face_crops=torch.rand(1, 48, 48, 3))
    name, _, adapted = res
    assert name == "hosted_adapt.safetensors" and hm.patcher_of(adapted) is not None
    assert loaded_entry(mm, restorer) is not None and loaded_entry(mm, prior) is not None
    # Queued again with another name, on the same loaded models: the first run's training (outside inference
    # mode) must not have left them unreadable (the prior's layout switch did: a second run failed in ComfyUI).
    with torch.inference_mode():
        again, _, _ = node_op("FaceMend_AdaptRestorer")(restorer, prior, "hosted_again", steps=1, lpips_weight=0.0,
                                                        micro_batch=1, accumulate=1, start_step=1, reg_end_step=1,
                                                        down_factor=16, face_crops=torch.rand(1, 48, 48, 3))
    assert again == "hosted_again.safetensors"


def test_restorerid_stays_loaded_between_runs(comfy, monkeypatch, tmp_path):
    """RestorerID (1.2 B parameters for the real one) is loaded by ComfyUI on first use and kept: the second run
    moves no weights (before, it went to the GPU and back on every run)."""
    pytest.importorskip("onnxruntime")
    from restorerid_models import export_tiny_arcface, make_restorerid_files
    from conftest import load_image, need_shared

    from facemend.ops import identity
    from facemend.pipelines.identity.restorer import RestorerID

    root = tmp_path
    make_restorerid_files(str(root))
    (root / "insightface" / "models" / "buffalo_l").mkdir(parents=True)
    export_tiny_arcface(root / "insightface" / "models" / "buffalo_l" / "w600k_r50.onnx")
    model_paths.set_models_dirs([str(root)])
    identity._cache.clear()
    try:
        mm = host(monkeypatch, comfy)
        rid = node_op("FaceMend_RestorerIDLoader")("RestorerIDFull.ckpt", "ip-adapter-faceid-plus_sd15.bin",
                                                   "CLIP-ViT-H-14-laion2B-s32B-b79K", "stable-diffusion-v1-5", "fp32")[0]
        det = node_op("FaceMend_DetectorLoader")("mtcnn (embedded)", "fp32")[0]
        idm = node_op("FaceMend_IDModelLoader")("models/buffalo_l/w600k_r50.onnx")[0]
        ref = load_image(need_shared("faces", "clean", "ffhq_00000000.png")).permute(0, 2, 3, 1)
        lq = load_image(need_shared("faces", "aligned_lq_real", "0143.png"))
        crops = torch.nn.functional.interpolate(lq, size=(32, 32), mode="area").repeat(2, 1, 1, 1).permute(0, 2, 3, 1)
        assert loaded_entry(mm, rid) is None  # on the offload device until the restore node needs it
        moves = []
        monkeypatch.setattr(RestorerID, "to", lambda self, d: moves.append(d) or self)
        out, _ = identity.restore_with_reference(crops, rid, ref, det, idm, id_scale=0.4, seed=3, steps=1)
        entry = loaded_entry(mm, rid)
        assert entry is not None and entry.device == COMPUTE and moves == [COMPUTE]  # loaded once, whole
        again, _ = identity.restore_with_reference(crops, rid, ref, det, idm, id_scale=0.4, seed=3, steps=1)
        assert torch.equal(out, again) and moves == [COMPUTE] and loaded_entry(mm, rid) is entry
        mm.free_memory(1e30, COMPUTE)
        assert loaded_entry(mm, rid) is None and moves == [COMPUTE, OFFLOAD]
    finally:
        identity._cache.clear()
        model_paths.set_models_dirs([])


def test_adaface_id_model_is_loaded_and_evicted_like_comfy_models(comfy, monkeypatch, tmp_path):
    """The NTIRE gate's AdaFace IR-50 (a torch network, unlike the ArcFace ONNX session) is under ComfyUI's model
    management: loaded on the offload device, moved to the compute device by the ID similarity node, evicted by
    free_memory, and the same similarities after it comes back."""
    from facemend.ops import quality
    from facemend.pipelines.quality.adaface import AdaFaceIRNet

    torch.manual_seed(0)
    net = AdaFaceIRNet().eval()
    (tmp_path / "adaface").mkdir()
    torch.save({"state_dict": {"model." + k: v for k, v in net.state_dict().items()}},
               tmp_path / "adaface" / "adaface_ir50_ms1mv2.ckpt")
    model_paths.set_models_dirs([str(tmp_path)])
    quality._cache.clear()
    try:
        mm = host(monkeypatch, comfy)
        id_model = quality.load_id_model("adaface_ir50_ms1mv2.ckpt")[0]
        assert hm.patcher_of(id_model) is not None and id_model.device == OFFLOAD
        faces = torch.rand(2, 112, 112, 3)
        first = quality.id_similarity(faces, faces.flip(2), id_model)[0]
        assert loaded_entry(mm, id_model) is not None and id_model.device == COMPUTE
        mm.free_memory(1e30, COMPUTE)
        assert loaded_entry(mm, id_model) is None and id_model.device == OFFLOAD and _weights_device(id_model) == {OFFLOAD}
        assert quality.id_similarity(faces, faces.flip(2), id_model)[0] == first
    finally:
        quality._cache.clear()
        model_paths.set_models_dirs([])
