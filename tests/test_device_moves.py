"""Every tensor a model needs moves with the model (issue 20): the one-step SR backends' prompt embeddings were
captured by the denoiser on the load device and stayed there after `OneStepSR.to` (the ComfyUI offload path:
load on the offload device, move to the GPU, "Expected all tensors to be on the same device").

Without a second real device the `meta` device stands in: a model loaded on the CPU, moved to meta and run there
fails on any tensor left behind. Every network class of pipelines/ is also audited for tensors held outside its
module tree (plain attributes, lists, caches), which `.to()` does not move."""
import pytest
import torch
from torch import nn


def _tensors_in(value, depth=0):
    if isinstance(value, torch.Tensor):
        return [value]
    if depth < 3 and isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v, depth + 1)]
    if depth < 3 and isinstance(value, dict):
        return [t for v in value.values() for t in _tensors_in(v, depth + 1)]
    return []


def stray_tensors(module: nn.Module) -> list:
    """Names of tensors reachable from the module's submodules' attributes that are not parameters or buffers."""
    skip = {"_parameters", "_buffers", "_modules"}
    # torch.nn.utils.spectral_norm's `weight` attribute is recomputed from `weight_orig` before every forward.
    return [f"{name or '<root>'}.{attr}" for name, m in module.named_modules() for attr, v in vars(m).items()
            if attr not in skip and _tensors_in(v) and f"{attr}_orig" not in m._parameters]


def test_the_audit_finds_a_captured_tensor():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.table = torch.zeros(3)            # what .to() would leave behind
            self.cache = (1, [torch.ones(1)])

    assert stray_tensors(Bad()) == ["<root>.table", "<root>.cache"]
    assert stray_tensors(nn.Sequential(nn.Conv2d(1, 1, 1), nn.GroupNorm(1, 1))) == []


def _networks():
    """One instance of every network class family of pipelines/, tiny where a config allows (built on meta where
    the size does not matter)."""
    from facemend.pipelines.adapt.discriminator import UNetDiscriminatorSN
    from facemend.pipelines.face.mtcnn_nets import _ONet, _PNet, _RNet
    from facemend.pipelines.face.retinaface import RetinaFaceNet
    from facemend.pipelines.restore.archs.codeformer import CodeFormer, CodeFormerConfig
    from facemend.pipelines.restore.archs.gfpgan import GFPGANConfig, GFPGANv1Clean
    from facemend.pipelines.restore.archs.gpen import GPEN, GPENConfig, official_channels
    from facemend.pipelines.restore.archs.restoreformer import RestoreFormer, RestoreFormerConfig
    from restorerid_models import tiny_structure_encoder, tiny_unet

    with torch.device("meta"):
        yield "CodeFormer", CodeFormer(CodeFormerConfig())
        yield "RestoreFormer", RestoreFormer(RestoreFormerConfig())
        yield "GPEN", GPEN(GPENConfig(channels=official_channels(512)))
        yield "RetinaFace resnet50", RetinaFaceNet("resnet50")
        yield "discriminator", UNetDiscriminatorSN(3, 16)
    yield "GFPGAN", GFPGANv1Clean(GFPGANConfig(out_size=32, narrow=0.125))
    yield "RetinaFace mobilenet", RetinaFaceNet("mobilenet0.25")
    for net in (_PNet(), _RNet(), _ONet()):
        yield type(net).__name__, net
    yield "RestorerID UNet", tiny_unet()
    yield "structure encoder", tiny_structure_encoder()


def test_no_network_holds_tensors_outside_its_module_tree():
    found = {name: stray_tensors(net) for name, net in _networks()}
    assert {k: v for k, v in found.items() if v} == {}


def test_prior_time_embedding_cache_is_dropped_when_the_prior_moves():
    """The prior stacks its blocks' time-projection weights in a cache (outside the module tree): after a move
    it must neither keep the old device's copy (memory held on the GPU after an offload) nor use it."""
    from test_adapt_prior import tiny_config

    from facemend.pipelines.adapt.prior import PriorUNet

    torch.manual_seed(0)
    prior = PriorUNet(tiny_config()).eval()
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([5])
    with torch.no_grad():
        prior(x, t)
    assert prior._emb_cache is not None
    prior.to("meta")
    assert prior._emb_cache is None
    with torch.no_grad():
        out = prior(x.to("meta"), t.to("meta"))
    assert out.device.type == "meta"
    assert all(v.device.type == "meta" for v in _tensors_in(prior._emb_cache))


@pytest.fixture(scope="module")
def onestep_models(tmp_path_factory):
    pytest.importorskip("diffusers")
    from onestep_models import make_osediff, make_tsdsr

    root = str(tmp_path_factory.mktemp("onestep"))
    return make_tsdsr(root), make_osediff(root)


@pytest.mark.parametrize("backend", ["tsdsr", "osediff"])
def test_onestep_models_run_after_moving_to_another_device(onestep_models, backend):
    from facemend.pipelines.diffusion.backends import load_osediff, load_tsdsr

    (tb, tl), (ob, pkl) = onestep_models
    model = load_tsdsr(tb, tl) if backend == "tsdsr" else load_osediff(ob, pkl)
    model.to("meta")
    every = [t for m in model.modules for t in list(m.parameters()) + list(m.buffers())]
    assert every and all(t.device.type == "meta" for t in every)
    # What the denoiser captured (tensors, or modules whose tensors it reads) is on the new device too: meta
    # kernels do not always check devices, so running alone would not catch a CPU tensor in every op.
    cells = [c.cell_contents for f in (model.denoise, model.update) for c in (f.__closure__ or ())]
    captured = [t for v in cells for t in (list(v.parameters()) + list(v.buffers()) if isinstance(v, nn.Module)
                                           else _tensors_in(v))]
    assert captured and all(t.device.type == "meta" for t in captured)
    z = torch.empty(2, model.modules[0].config.in_channels, 8, 8, device="meta")
    pred = model.denoise(z)                         # the prompt embeddings moved with the model
    assert pred.device.type == "meta" and model.update(z, pred).shape == z.shape


def test_restorerid_prompt_cache_follows_the_modules_device():
    """RestorerID caches the text encoder's output per prompt; a host that moves the modules itself (as a model
    manager does, not through RestorerID.to) must get embeddings on the modules' new device."""
    pytest.importorskip("diffusers")
    from types import SimpleNamespace

    from facemend.pipelines.identity.restorer import RestorerID

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def forward(self, input_ids):
            return SimpleNamespace(last_hidden_state=self.emb(input_ids))

    tok = lambda texts, **kw: SimpleNamespace(input_ids=torch.zeros(1, 3, dtype=torch.long))  # noqa: E731
    r = object.__new__(RestorerID)
    r.unet, r.text_encoder, r.tokenizer, r.dtype, r._text_cache = nn.Linear(1, 1), Encoder(), tok, torch.float32, {}
    assert r.encode_prompt("a face").device.type == "cpu"
    r.unet.to("meta")
    r.text_encoder.to("meta")
    assert r.encode_prompt("a face").device.type == "meta"
    r.image_proj = r.struct = r.vae = r.image_encoder = nn.Identity()
    r._text_cache = {k: v for k, v in r._text_cache.items() if v.device.type == "cpu"}
    r.unet.to_empty(device="cpu")
    r.text_encoder.to_empty(device="cpu")
    r.to("meta")                                        # through RestorerID.to, the cache moves with the modules
    assert list(r._text_cache) == [("a face", "meta")]
    assert all(v.device.type == "meta" for v in r._text_cache.values())
