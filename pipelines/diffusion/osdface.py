"""OSDFace (jkwang28/OSDFace, CVPR 2025): one-step face restoration on SD-2.1-base, as its infer.py computes it.

    face [0,1] -> lq = 2x-1, resized to 512 (bilinear, align_corners=True)
    tokens: the visual representation embedder (lq_embed/): lq resized to 512 again (align_corners=False) and
            mapped (lq-0.5)/0.5 once more (the official code does both, so the VQ encoder sees [-3,1]); the VQ-VAE
            encoder of associate_2.ckpt; per position the nearest code, positions sorted by that distance and the
            first 77 distinct codes kept (VectorQuantizer.inference) -> [77,512] -> embedding_change_weights.pth
            (two 1x1 convs with SiLU, 512 -> 256 -> 1024). The concatenated variant (--cat_prompt_embedding):
            the 154 nearest positions without de-duplication (inference_cat, + the fixed 2-D sin/cos position
            table with --use_pos_embedding), halves concatenated to [77,1024], no embedding change.
    z = VAE.encode(lq) posterior sample (seeded; the mean on request) * scaling_factor
    eps = UNet(z, t=399, tokens); x0 = (z - sqrt(1-a) eps) / sqrt(a) in float64 (utils.others.get_x0_from_noise)
    out = VAE.decode(x0 / scaling_factor).clamp(-1,1) * 0.5 + 0.5, back to the input size.

The LoRA (pytorch_lora_weights.safetensors, diffusers' save_lora_weights keys 'unet.<module>.lora_A.weight', rank
and alpha 16: scale 1) is merged into the UNet (the official --merge_lora, our default) or applied as a separate
low-rank branch (the official default path, diffusers' load_lora_weights). The official attention-pooling switch
(--use_att_pool) has no inference path in the released code (256 tokens do not reshape to 77) and is refused.
The official loops handle one image per call; here the token selection is batched (same result per image).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..io.checkpoints import load_weights
from ..io.errors import InvalidImage, ModelFileInvalid
from .lora import apply_lora, lora_pairs, lora_rank, merge_lora
from .refiner import TileSettings, default_is_oom, run_shrinking
from .tiling import show_preview

OSDFACE_TIMESTEP = 399
OSDFACE_SIZE = 512
N_TOKENS = 77
LORA_FILE = "pytorch_lora_weights.safetensors"
EMBED_CHANGE_FILE = "embedding_change_weights.pth"
ENCODER_FILE = "associate_2.ckpt"
OSDFACE_FILES = (LORA_FILE, EMBED_CHANGE_FILE, ENCODER_FILE)
SD21_PARTS = ("unet", "vae", "scheduler")  # no text encoder: the prompt is the embedder's tokens
OSDFACE_SOURCE = ("the OSDFace release (Google Drive link in https://github.com/jkwang28/OSDFace, 'pretrained/'): "
                  f"{LORA_FILE}, {EMBED_CHANGE_FILE} and {ENCODER_FILE}, all three into models/onestep_sr/osdface/")
SD21_FILE_SOURCE = (", or instead the single file v2-1_512-ema-pruned.safetensors from the same page -> "
                    "models/checkpoints/")
LORA_MODES = ("merged", "applied")
EMBEDDINGS = ("change", "concat")
LATENTS = ("sample", "mean")


@dataclass(frozen=True)
class EmbedderConfig:
    """vqvae_encoder's constructor defaults (lq_embed/inference.py); tests shrink the widths."""
    ch: int = 64
    ch_mult: tuple = (1, 2, 2, 2, 4, 8)
    num_res_blocks: int = 2
    attn_resolutions: tuple = (16,)
    resolution: int = 512
    z_channels: int = 512
    embed_dim: int = 512
    n_embed: int = 1024
    head_size: int = 1
    concat: bool = False             # --cat_prompt_embedding
    pos_embedding: bool = False      # --use_pos_embedding (fixed table; only the concatenated path adds it)

    @property
    def latent_w(self) -> int:
        return self.resolution // 2 ** (len(self.ch_mult) - 1)

    @property
    def n_select(self) -> int:
        return 2 * N_TOKENS if self.concat else N_TOKENS


# --- the VQ-VAE encoder (lq_embed/vqvae.py, key names kept) -------------------------------------------------
def _norm(c):
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class _ResBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class _Attn(nn.Module):
    """MultiHeadAttnBlock without a second input (norm2 is unused there, but is in the file)."""

    def __init__(self, c, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = _norm(c), _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        hn = self.norm1(x)
        d = c // self.heads

        def split(t):  # [b, heads, hw, d]
            return t.reshape(b, self.heads, d, h * w).transpose(2, 3)

        q, k, v = split(self.q(hn)) * d ** -0.5, split(self.k(hn)), split(self.v(hn))
        a = torch.softmax(q @ k.transpose(2, 3), dim=3) @ v
        return x + self.proj_out(a.transpose(2, 3).reshape(b, c, h, w))


class _Down(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Encoder(nn.Module):
    def __init__(self, cfg: EmbedderConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, 1, 1)
        self.down = nn.ModuleList()
        res, cin = cfg.resolution, cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(_ResBlock(cin, cfg.ch * mult))
                cin = cfg.ch * mult
                if res in cfg.attn_resolutions:
                    level.attn.append(_Attn(cin, cfg.head_size))
            if i != len(cfg.ch_mult) - 1:
                level.downsample = _Down(cin)
                res //= 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1 = _ResBlock(cin, cin), _Attn(cin, cfg.head_size)
        self.mid.block_2 = _ResBlock(cin, cin)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


def sincos_2d(w: int, dim: int) -> torch.Tensor:
    """vqvae.rope_2d: rows and columns of a w x w grid, each a dim/2 sin/cos table with base 1000 (float64)."""
    pos = torch.arange(w * w, dtype=torch.float32).double()

    def table(p, d):
        div = torch.exp(-torch.arange(0, d, 2, dtype=torch.float64) * (math.log(1000) / d))
        pe = torch.zeros(len(p), d, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(p[:, None] * div)
        pe[:, 1::2] = torch.cos(p[:, None] * div)
        return pe

    return torch.cat([table(torch.div(pos, w, rounding_mode="floor"), dim // 2), table(pos % w, dim // 2)], dim=1)


class _Quantize(nn.Module):
    def __init__(self, cfg: EmbedderConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.n_embed, cfg.embed_dim)
        if cfg.pos_embedding:
            self.register_buffer("pos_embedding", sincos_2d(cfg.latent_w, cfg.embed_dim).float())


class VisualEmbedder(nn.Module):
    """The VQ-VAE encoder of associate_2.ckpt ('vqvae_LQ.' without the decoder) and its token selection."""

    def __init__(self, cfg: EmbedderConfig = EmbedderConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = _Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.quantize = _Quantize(cfg)

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        """lq: [N,3,H,W] in [-1,1] as infer.py passes it -> [N,77,embed_dim] ([N,77,2*embed_dim] concatenated)."""
        x = F.interpolate(lq, size=(self.cfg.resolution,) * 2, mode="bilinear", align_corners=False)
        h = self.quant_conv(self.encoder((x - 0.5) / 0.5))
        n, c = h.shape[:2]
        z = h.permute(0, 2, 3, 1).reshape(n, -1, c)
        e = self.quantize.embedding.weight
        d = torch.sum(z ** 2, dim=2, keepdim=True) + torch.sum(e ** 2, dim=1) - 2 * torch.matmul(z, e.t())
        dist, code = torch.min(d, dim=2)                                  # [N, hw]
        order = torch.sort(dist.float(), dim=1, stable=True)[1]            # the official sorts a float32 copy
        codes = code.gather(1, order)
        k = self.cfg.n_select
        if self.cfg.concat:  # inference_cat: the k nearest positions, repeats allowed
            tokens = e[codes[:, :k]]
            if self.cfg.pos_embedding:
                tokens = tokens + self.quantize.pos_embedding[order[:, :k]]
            return torch.cat(tokens.split(N_TOKENS, dim=1), dim=2)
        # inference: the first k distinct codes in that order; fewer than k leave zero rows, as officially.
        hw = codes.shape[1]
        steps = torch.arange(hw, device=codes.device).expand_as(codes)
        first = torch.full((n, e.shape[0]), hw, device=codes.device, dtype=steps.dtype)
        first = first.scatter_reduce(1, codes, steps, reduce="amin")
        is_new = first.gather(1, codes) == steps
        slot = torch.cumsum(is_new.long(), dim=1) - 1
        slot = torch.where(is_new & (slot < k), slot, k)  # repeats and codes past the k-th go to a dropped row
        tokens = e.new_zeros(n, k + 1, e.shape[1])
        tokens.scatter_(1, slot[..., None].expand(-1, -1, e.shape[1]), e[codes])  # no host sync (no masks)
        return tokens[:, :k]


class EmbeddingChange(nn.Module):
    """lq_embed.TwoLayerConv1x1(512, 1024): per token 512 -> 256 -> 1024 with SiLU after each."""

    def __init__(self, cin=512, cout=1024):
        super().__init__()
        self.conv1 = nn.Conv1d(cin, cin // 2, 1)
        self.conv2 = nn.Conv1d(cin // 2, cout, 1)

    def forward(self, x):
        x = F.silu(self.conv1(x.transpose(1, 2)))
        return F.silu(self.conv2(x)).transpose(1, 2)


# --- reading the official files ----------------------------------------------------------------------------
class _Inert:
    """Stand-in for a class a Lightning checkpoint pickles beside its state dict (callbacks, hyper-parameter
    containers): it only stores what the pickle hands it, so no code of that class ever runs."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


def read_pickled_checkpoint(path: str) -> dict:
    """torch.load(weights_only=True); globals outside its allow-list (a Lightning .ckpt pickles e.g. its callback
    classes) are read as inert stand-ins, never imported."""
    try:
        return load_weights(path)
    except ModelFileInvalid as first:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - not a torch zip file at all: the first message says so
            raise first from None
        stubs = [(type(n.rsplit(".", 1)[-1], (_Inert,), {}), n) for n in names]
        try:
            with torch.serialization.safe_globals(stubs):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001
            raise first from None


def _check_state(sd: dict, model: nn.Module, path: str, what: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if wrong:
            parts.append(f"{len(wrong)} keys with other shapes (e.g. {wrong[0]}: file {tuple(sd[wrong[0]].shape)} "
                         f"vs {tuple(own[wrong[0]].shape)})")
        raise ModelFileInvalid(f"{path} is not {what}: {'; '.join(parts)}. First keys of the file: {list(sd)[:4]}")


def embedder_config_from(sd: dict, path: str, **switches) -> EmbedderConfig:
    """The encoder's widths and depths read off its weights (the official file gives vqvae_encoder's defaults; tests'
    tiny files load through the same code). Heads are not visible in the weights: the official 1."""
    need = ("encoder.conv_in.weight", "encoder.conv_out.weight", "quantize.embedding.weight")
    absent = [k for k in need if k not in sd]
    if absent:
        raise ModelFileInvalid(f"{path} is not OSDFace's VQ-VAE embedder ({ENCODER_FILE}): no "
                               f"{['vqvae_LQ.' + k for k in absent]} in its 'state_dict'")
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = 0
    while f"encoder.down.{levels}.block.0.conv1.weight" in sd:
        levels += 1
    blocks = 0
    while f"encoder.down.0.block.{blocks}.conv1.weight" in sd:
        blocks += 1
    if not levels or not blocks:
        raise ModelFileInvalid(f"{path}: no encoder.down.*.block.* weights; not OSDFace's {ENCODER_FILE}")
    mult = tuple(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels))
    attn = tuple(512 // 2 ** i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in sd)
    n_embed, embed_dim = sd["quantize.embedding.weight"].shape
    return EmbedderConfig(ch=ch, ch_mult=mult, num_res_blocks=blocks, attn_resolutions=attn,
                          z_channels=sd["encoder.conv_out.weight"].shape[0], embed_dim=embed_dim, n_embed=n_embed,
                          **switches)


def load_embedder(path: str, cfg: EmbedderConfig | None = None, concat: bool = False,
                  pos_embedding: bool = False) -> VisualEmbedder:
    """associate_2.ckpt: a Lightning checkpoint whose 'state_dict' holds 'vqvae_LQ.*' (the encoder half is read,
    as vqvae_encoder does, but every key it needs must be there with its shape). cfg: the widths (default: read
    off the file)."""
    obj = read_pickled_checkpoint(path)
    sd = obj.get("state_dict") if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not any(str(k).startswith("vqvae_LQ.") for k in sd):
        found = list(sd or obj)[:4] if isinstance(obj, dict) else type(obj).__name__
        raise ModelFileInvalid(f"{path} is not OSDFace's embedder checkpoint ({ENCODER_FILE}): expected a "
                               f"'state_dict' with 'vqvae_LQ.*' keys, found {found}")
    sd = {k[len("vqvae_LQ."):]: v for k, v in sd.items()
          if k.startswith("vqvae_LQ.") and not k.startswith("vqvae_LQ.decoder")}
    if cfg is None:
        cfg = embedder_config_from(sd, path, concat=concat, pos_embedding=pos_embedding)
    latent_w = cfg.latent_w
    if latent_w * latent_w < cfg.n_select:
        raise ModelFileInvalid(f"{path}: its encoder gives a {latent_w}x{latent_w} grid, fewer than the "
                               f"{cfg.n_select} tokens OSDFace selects (the official one: 16x16)")
    if cfg.pos_embedding:  # a fixed table the file may or may not carry: ours is computed like the official one
        sd.setdefault("quantize.pos_embedding", sincos_2d(cfg.latent_w, cfg.embed_dim).float())
    model = VisualEmbedder(cfg)
    _check_state(sd, model, path, f"OSDFace's VQ-VAE embedder ({ENCODER_FILE})")
    model.load_state_dict({k: sd[k] for k in model.state_dict()})
    return model


def load_embedding_change(path: str, cout: int = 1024) -> EmbeddingChange:
    sd = read_pickled_checkpoint(path)
    if not isinstance(sd, dict) or "conv1.weight" not in sd:
        raise ModelFileInvalid(f"{path} is not OSDFace's {EMBED_CHANGE_FILE} (a TwoLayerConv1x1 state dict with "
                               f"conv1/conv2 weights); found {list(sd)[:4] if isinstance(sd, dict) else type(sd)}")
    model = EmbeddingChange(sd["conv1.weight"].shape[1], cout)
    _check_state(sd, model, path, f"OSDFace's embedding change ({EMBED_CHANGE_FILE})")
    extra = [k for k in sd if k not in model.state_dict()]
    if extra:
        raise ModelFileInvalid(f"{path}: unexpected keys {extra[:3]} for OSDFace's {EMBED_CHANGE_FILE}")
    model.load_state_dict(sd)
    return model


def read_lora(path: str) -> dict:
    """{UNet module: (A, B)} from pytorch_lora_weights.safetensors ('unet.<m>.lora_A.weight', or the older
    '<m>.lora.down.weight' naming that infer.py's merge also reads)."""
    if not path.lower().endswith(".safetensors"):
        raise ModelFileInvalid(f"{path}: OSDFace's LoRA is the safetensors file {LORA_FILE}")
    sd = load_weights(path)
    sd = {k.replace(".lora.down.weight", ".lora_A.weight").replace(".lora.up.weight", ".lora_B.weight"): v
          for k, v in sd.items()}
    other = [k for k in sd if not k.startswith("unet.") or ".lora_" not in k]
    if other:
        raise ModelFileInvalid(f"{path}: OSDFace's LoRA holds UNet weights only ('unet.<module>.lora_A.weight'); "
                               f"found {other[:3]}")
    pairs = lora_pairs(sd, path, strip_prefixes=("unet.",))
    if not pairs:
        raise ModelFileInvalid(f"{path} holds no LoRA weights")
    lora_rank(pairs)
    return pairs


# --- the model ---------------------------------------------------------------------------------------------
class OSDFace(nn.Module):
    """UNet + VAE (+ LoRA) + embedder (+ embedding change) in one module, so .to() moves every tensor it uses.

    Called like the other one-step backends (OneStepSR): [N,3,H,W] in [0,1] -> [N,3,H*scale,W*scale]."""

    name = "OSDFace"

    def __init__(self, unet, vae, embedder: VisualEmbedder, embedding_change: EmbeddingChange | None,
                 alpha_t: float, latent: str = "sample", description: str = "OSDFace"):
        super().__init__()
        if latent not in LATENTS:
            raise ValueError(f"latent must be one of {LATENTS}, got {latent!r}")
        self.unet, self.vae, self.embedder, self.embedding_change = unet, vae, embedder, embedding_change
        self.alpha_t = float(alpha_t)  # alphas_cumprod[399], float32 schedule value held exactly in a double
        self.latent = latent
        self.description = description
        self.tiles = TileSettings(max_batch=4)  # faces per network call (no tiling: always one 512 face)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.requires_grad_(False)
        self.eval()

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def model_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def count_tiles(self, h: int, w: int, scale: int = 1, tiles: TileSettings | None = None, n: int = 1) -> int:
        """Progress units: per group of max_batch faces, tokens+encode, UNet, decode."""
        t = tiles or self.tiles
        return 3 * -(-n // max(1, t.max_batch))

    def prompt(self, lq: torch.Tensor) -> torch.Tensor:
        tokens = self.embedder(lq)
        return self.embedding_change(tokens) if self.embedding_change is not None else tokens

    def step(self, lq: torch.Tensor, noise: torch.Tensor | None, hook=None) -> torch.Tensor:
        """infer.py's OSDFace_test.forward on lq [n,3,512,512] in [-1,1] (model dtype) -> [n,3,512,512] in [0,1]."""
        vae = self.vae
        prompt = self.prompt(lq)
        h = vae.encoder(lq)
        if getattr(vae, "quant_conv", None) is not None:
            h = vae.quant_conv(h)
        mean, logvar = h.chunk(2, dim=1)
        z = mean
        if noise is not None:  # diffusers' DiagonalGaussianDistribution.sample
            z = mean + torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0)) * noise.to(mean)
        z = z * self.scaling_factor
        if hook is not None:
            hook(1)
        eps = self.unet(z, OSDFACE_TIMESTEP, encoder_hidden_states=prompt.to(z.dtype), return_dict=False)[0]
        if hook is not None:
            hook(1)
        a = torch.tensor(self.alpha_t, dtype=torch.float64, device=z.device)
        x0 = ((z.double() - (1 - a) ** 0.5 * eps.double()) / a ** 0.5).float()
        out = vae.decode(x0.to(z.dtype) / self.scaling_factor, return_dict=False)[0].clamp(-1, 1)
        out = (out * 0.5 + 0.5).clamp(0.0, 1.0)
        show_preview(hook, lambda: out)  # this group's restored faces, live on the node
        if hook is not None:
            hook(1)
        return out

    @torch.no_grad()
    def run(self, images: torch.Tensor, scale: int = 1, seed: int = 0, tiles: TileSettings | None = None,
            hook=None) -> torch.Tensor:
        t = tiles or self.tiles
        if images.ndim != 4 or images.shape[1] != 3:
            raise InvalidImage(f"expected images [N,3,H,W], got {tuple(images.shape)}")
        if not torch.isfinite(images).all():
            raise InvalidImage("the image contains NaN or infinite values")
        n, _, h, w = images.shape
        oh, ow = h * scale, w * scale
        lq = images.to(self.device, torch.float32) * 2 - 1
        if (h, w) != (OSDFACE_SIZE, OSDFACE_SIZE):
            lq = F.interpolate(lq, size=(OSDFACE_SIZE, OSDFACE_SIZE), mode="bilinear", align_corners=True)
        lq = lq.to(self.dtype)
        noise = None
        if self.latent == "sample":  # one draw for all faces: the max_batch split (or an OOM halving) changes nothing
            gen = torch.Generator(device="cpu").manual_seed(int(seed))
            lat = OSDFACE_SIZE // self.vae_factor
            noise = torch.randn((n, self.vae.config.latent_channels, lat, lat), generator=gen)
        step = max(1, t.max_batch)
        outs = [self.step(lq[i:i + step], None if noise is None else noise[i:i + step], hook)
                for i in range(0, n, step)]
        out = torch.cat(outs).float()
        if (oh, ow) != (OSDFACE_SIZE, OSDFACE_SIZE):
            down = oh < OSDFACE_SIZE or ow < OSDFACE_SIZE
            out = F.interpolate(out, size=(oh, ow), mode="bicubic", align_corners=False, antialias=down).clamp(0, 1)
        return out

    def __call__(self, images: torch.Tensor, scale: int = 1, seed: int = 0, tiles: TileSettings | None = None,
                 hook=None, is_oom=default_is_oom, on_retry=None) -> torch.Tensor:
        """run() that halves the faces per call on out-of-memory, then raises OutOfMemory."""
        if int(scale) not in (1, 2, 4):
            raise ValueError(f"scale must be 1, 2 or 4, got {scale}")
        def halved(t: TileSettings):
            return replace(t, max_batch=t.max_batch // 2) if t.max_batch > 1 else None

        def give_up(t: TileSettings) -> str:
            return (f"OSDFace: out of memory on {self.device} even with one 512x512 face per call. Free memory "
                    "(close other models or apps), use fp16/bf16 precision, or run on a GPU with more memory.")

        return run_shrinking(lambda t: self.run(images, int(scale), seed, t, hook), tiles or self.tiles, halved,
                             give_up, self.device, is_oom, on_retry)


def osdface_from_modules(unet, vae, scheduler, embedder, embedding_change, device="cpu", dtype=torch.float32,
                         latent: str = "sample", description: str = "OSDFace") -> OSDFace:
    """The OSDFace step around an SD2.1 UNet (LoRA merged or applied) and VAE and the two embedder modules."""
    kind = scheduler.config.prediction_type
    if kind != "epsilon":
        raise ModelFileInvalid(f"OSDFace predicts noise (epsilon); this scheduler says prediction_type {kind!r}: is "
                               "it the SD-2.1-base folder (not the 768 v-prediction SD-2.1)?")
    width = embedder.cfg.embed_dim * (2 if embedder.cfg.concat else 1)
    width = embedding_change.conv2.out_channels if embedding_change is not None else width
    if unet.config.cross_attention_dim != width:
        raise ModelFileInvalid(f"the embedder gives {width}-wide tokens but the UNet's cross_attention_dim is "
                               f"{unet.config.cross_attention_dim}: is the base model SD-2.1-base?")
    alpha_t = scheduler.alphas_cumprod.double()[OSDFACE_TIMESTEP].item()
    model = OSDFace(unet, vae, embedder, embedding_change, alpha_t, latent, description)
    nn.Module.to(model, device=device, dtype=dtype)  # diffusers .to() warns on dtype casts
    return model


def missing_files(base_dir: str, osdface_dir: str) -> tuple[list, list]:
    from .backends import missing_base_parts

    base = missing_base_parts(base_dir, SD21_PARTS)
    own = [os.path.join(osdface_dir, f) for f in OSDFACE_FILES if not os.path.isfile(os.path.join(osdface_dir, f))]
    return base, own


def check_osdface_files(base_dir: str, osdface_dir: str, embedding: str = "change") -> None:
    """ModelFileNotFound listing every file OSDFace needs that is absent (no weights are read): what load_osdface
    raises, and what the loader nodes' validation reports before a run."""
    from .backends import SD21_SOURCE, is_single_file, missing_files_error

    base_missing, own_missing = missing_files(base_dir, osdface_dir)
    if is_single_file(base_dir):
        base_missing = [] if os.path.isfile(base_dir) else [os.path.basename(base_dir)]
    if embedding == "concat":
        own_missing = [p for p in own_missing if not p.endswith(EMBED_CHANGE_FILE)]
    if base_missing or own_missing:
        raise missing_files_error("OSDFace", base_dir, base_missing, own_missing, SD21_SOURCE + SD21_FILE_SOURCE,
                                  OSDFACE_SOURCE)


def load_osdface(base_dir: str, osdface_dir: str, device="cpu", dtype=torch.float32, lora_mode: str = "merged",
                 embedding: str = "change", pos_embedding: bool = False, latent: str = "sample",
                 embedder_config: EmbedderConfig | None = None, base_configs: tuple = (None, None)) -> OSDFace:
    """base_dir: the SD-2.1-base diffusers folder (unet/, vae/, scheduler/) or single file
    (v2-1_512-ema-pruned.safetensors; base_configs: its (unet, vae) configs, default the shipped SD-2.1-base
    ones); osdface_dir: the folder with the
    three official files. embedding 'concat' is the official --cat_prompt_embedding (no embedding change file
    needed then), pos_embedding its --use_pos_embedding. embedder_config: the VQ encoder's widths (default: read
    off associate_2.ckpt)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from .backends import _from_pretrained, is_single_file

    if lora_mode not in LORA_MODES or embedding not in EMBEDDINGS or latent not in LATENTS:
        raise ValueError(f"lora_mode in {LORA_MODES}, embedding in {EMBEDDINGS}, latent in {LATENTS}; got "
                         f"{lora_mode!r}, {embedding!r}, {latent!r}")
    if pos_embedding and embedding != "concat":
        raise ValueError("OSDFace adds its position table only in the concatenated-embedding path "
                         "(--use_pos_embedding with --cat_prompt_embedding); the default path ignores it")
    single = is_single_file(base_dir)
    check_osdface_files(base_dir, osdface_dir, embedding)
    cfg = None if embedder_config is None else replace(embedder_config, concat=embedding == "concat",
                                                       pos_embedding=pos_embedding)
    embedder = load_embedder(os.path.join(osdface_dir, ENCODER_FILE), cfg, embedding == "concat", pos_embedding)
    change = None if embedding == "concat" else load_embedding_change(os.path.join(osdface_dir, EMBED_CHANGE_FILE))
    lora_path = os.path.join(osdface_dir, LORA_FILE)
    pairs = read_lora(lora_path)
    if single:
        from .sd21_single_file import load_sd21_single_file, shipped_config

        unet, vae = load_sd21_single_file(base_dir, *base_configs)
        scheduler = DDIMScheduler.from_config(shipped_config("scheduler"))
    else:
        unet = _from_pretrained(UNet2DConditionModel, base_dir, "unet", torch.float32)
        vae = _from_pretrained(AutoencoderKL, base_dir, "vae", torch.float32)
        try:
            scheduler = DDIMScheduler.from_pretrained(base_dir, subfolder="scheduler", local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelFileInvalid(f"Cannot read {os.path.join(base_dir, 'scheduler')}: {exc}") from exc
    # alpha = rank (16) in the official files and diffusers' default for peft keys without alphas: scale 1.
    if lora_mode == "merged":
        merge_lora(unet, pairs, 1.0, lora_path, "SD-2.1 UNet")
    else:
        apply_lora(unet, pairs, 1.0, lora_path, "SD-2.1 UNet")
    return osdface_from_modules(unet, vae, scheduler, embedder, change, device, dtype, latent,
                                f"OSDFace ({lora_mode} LoRA) on {os.path.basename(os.path.normpath(base_dir))}")
