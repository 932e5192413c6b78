"""Coarse face restoration: GFPGAN v1.2/v1.3/v1.4 and CodeFormer (the registry in `archs` takes more).

`FaceRestorer` owns a restorer network and restores batches of aligned faces exactly as the official inference
does, without its per-face loop or numpy round trips:

GFPGANer.enhance (official, per face)              FaceRestorer.__call__ (batched, on the device)
  BGR uint8 -> /255 -> RGB -> normalize(.5, .5)      RGB float [0,1] -> (x - 0.5) / 0.5
  (aligned input of another size: cv2.resize           (another size: bilinear, antialiased when shrinking,
   INTER_LINEAR to 512)                                 to the network's size)
  net(x, return_rgb=False) (randomize_noise=True)     net(x, noise="random", generator seeded with `seed`)
  tensor2img(min_max=(-1,1)): clamp, (x+1)/2,         clamp(-1,1), (x+1)/2 kept as float (the uint8 of the
   *255, round -> uint8                                 reference is round(255 * ours))
                                                       resized back to the input size (bicubic, antialiased),
                                                       then blended with the input by `visibility`

The official network draws new noise maps on every call (see archs/gfpgan.py); here they come from a generator
seeded with `seed`, so runs are reproducible and every face gets exactly the maps that the official code draws
for one face after `torch.manual_seed(seed)` on CPU, whatever the batch it is in.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F

from . import archs
from ..io.checkpoints import check_keys, load_weights, unwrap_state_dict
from ..io.device_caps import bf16_native, channels_last_for
from ..io.errors import InvalidImage, ModelFileInvalid
from ..io.memory import empty_cache, needs_smaller_chunk

RESIZE_IN = "bilinear"
RESIZE_OUT = "bicubic"


# Batches of faces up to this size move to the restorer's device in one transfer (512 crops: ~680 faces).
_STAGE_BYTES = 2 << 30


def _tensors_only(sd: Mapping) -> dict:
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


class FaceRestorer:
    """A loaded face restorer. Build it with `from_file` (or `from_state_dict`); call it on [N,3,H,W] faces."""

    def __init__(self, net: torch.nn.Module, spec: archs.ArchSpec, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, name: str = ""):
        self.net = net.eval().requires_grad_(False)
        self.spec = spec
        self.name = name or spec.name
        self.device = torch.device(device)
        self.requested_dtype = dtype
        self.dtype = self._usable_dtype(dtype)
        self.net.to(device=self.device, dtype=self.dtype)
        # Memory layout: None = decided per architecture and device (io/device_caps.channels_last_for: CPU always
        # channels-last, CUDA channels-last except the GroupNorm-heavy CodeFormer/RestoreFormer); set_throughput
        # overrides it.
        self._channels_last: Optional[bool] = None
        self._apply_layout()
        self._compiled = None  # torch.compile'd network (set_compile), else the network itself is called
        self._compiled_batch = 0  # the batch size the compiled graph was built for (short chunks are padded to it)

    def set_throughput(self, channels_last: bool | None = None, compile: bool | str | None = None) -> "FaceRestorer":
        """GPU throughput switches (same results up to float rounding; tests/test_throughput.py).

        channels_last: True: weights and faces in NHWC memory (tensor cores' native layout for fp16/bf16
            convolutions, and faster on CPUs too); False: the contiguous NCHW layout; None: unchanged (the
            default is "auto": `channels_last_for(device, arch)`).
        compile: torch.compile the network (True: the default inductor backend; a string: that backend; False:
            off). Compilation happens on the first call and again for each new batch shape (a short last chunk
            is padded to the chunk size so that it does not compile again); kept off by default because it pays
            only on long GPU runs."""
        if channels_last is not None:
            self._channels_last = bool(channels_last)
            self._apply_layout()
        if compile is not None:
            self._compiled_batch = 0
            if compile is False:
                self._compiled = None
            else:
                backend = "inductor" if compile is True else str(compile)
                self._compiled = torch.compile(self.net, backend=backend, dynamic=False)
        return self

    def _usable_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """float16 for an architecture that is not fp16-safe becomes bfloat16 (GPU with bf16) or float32."""
        if dtype != torch.float16 or self.spec.fp16_ok:
            return dtype
        if bf16_native(self.device):  # this device's capability; emulated bf16 (T4, V100) is slower than fp32
            return torch.bfloat16
        return torch.float32

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_file(cls, path: str, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> "FaceRestorer":
        """Load .safetensors / .pth (weights_only) in any official layout: {'params_ema': ...}, {'params': ...},
        a bare state dict, DataParallel 'module.' prefixes. The architecture is detected from the keys."""
        raw = load_weights(path, device="cpu")
        if not isinstance(raw, Mapping):
            raise ModelFileInvalid(f"{os.path.basename(path)} holds a {type(raw).__name__}, not a state dict; "
                                   f"expected a face restorer: {archs.SUPPORTED_DESCRIPTION}.")
        return cls.from_state_dict(unwrap_state_dict(raw), device=device, dtype=dtype, path=path)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, path: str = "<state dict>") -> "FaceRestorer":
        sd = _tensors_only(archs.canonicalize(unwrap_state_dict(state_dict)))
        base = os.path.basename(path)
        spec = archs.find_arch(sd)
        if spec is None:
            what = archs.identify_foreign(sd)
            found = f"it looks like {what}" if what else \
                f"its keys match no known restorer (first keys: {list(sd)[:4]}, {len(sd)} tensors)"
            raise ModelFileInvalid(
                f"{base} is not a face restoration model FaceMend can load: {found}. "
                f"Expected one of: {archs.SUPPORTED_DESCRIPTION} (e.g. GFPGANv1.4.pth in facerestore_models/).")
        try:
            net = spec.build(sd)
        except (KeyError, IndexError, ValueError, RuntimeError) as exc:
            raise ModelFileInvalid(f"{base} looks like {spec.family} but its shapes are inconsistent "
                                   f"({type(exc).__name__}: {exc}).") from exc
        own = net.state_dict()
        # Keys a file may leave out (e.g. noise buffers): fill them from the fresh network before checking.
        filled = dict(sd)
        for k, v in own.items():
            if k not in filled and any(k.startswith(p) for p in spec.optional_keys):
                filled[k] = v
        check_keys(filled, net, path, expected=spec.family)
        net.load_state_dict(filled, strict=True)
        return cls(net, spec, device=device, dtype=dtype, name=base)

    # ------------------------------------------------------------------ facts
    @property
    def arch(self) -> str:
        return self.spec.name

    @property
    def input_size(self) -> int:
        return int(self.net.input_size)

    @property
    def supports_fidelity(self) -> bool:
        return self.spec.supports_fidelity

    def model_size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.net.state_dict().values())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "FaceRestorer":
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.requested_dtype = dtype
        self.dtype = self._usable_dtype(self.requested_dtype)
        self.net.to(device=self.device, dtype=self.dtype)
        self._apply_layout()
        return self

    @property
    def channels_last(self) -> bool:
        """The layout in use: set_throughput's choice, else the decision table for this architecture and device."""
        if self._channels_last is not None:
            return self._channels_last
        return channels_last_for(self.device, self.spec.groupnorm_heavy)

    def _apply_layout(self) -> None:
        """4-D weights in the chosen memory format (Module.to(memory_format=) refuses the 5-D modulated-conv
        weights of the StyleGAN decoders)."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for t in list(self.net.parameters()) + list(self.net.buffers()):
            if t.ndim == 4:
                t.data = t.data.contiguous(memory_format=fmt)

    def __repr__(self) -> str:
        return f"FaceRestorer({self.name}: {self.arch}, {self.input_size}px, {self.device}, {self.dtype})"

    # ------------------------------------------------------------------ inference
    def noise_maps(self, noise: str, seed: int) -> Optional[list]:
        """The network's random noise maps for `seed`, drawn once on the CPU generator (the official stream) and
        moved to the device in one go, for reuse by every chunk of a call; None when the network draws none."""
        draw = getattr(self.net, "random_noise_maps", None)
        if noise != "random" or draw is None:
            return None
        return draw(torch.Generator().manual_seed(int(seed)), self.device, self.dtype)

    @torch.no_grad()
    def forward_normalized(self, x: torch.Tensor, fidelity: float = 0.5, noise: str = "random",
                           seed: int = 0, noise_maps: Optional[list] = None) -> torch.Tensor:
        """The bare network on x in [-1,1] at input_size (any batch); float32 output, not clamped. noise_maps:
        `self.noise_maps(noise, seed)` when calling repeatedly (else drawn here)."""
        if noise_maps is None:
            noise_maps = self.noise_maps(noise, seed)
        gen = torch.Generator().manual_seed(int(seed)) if noise == "random" and noise_maps is None else None
        x = x.to(device=self.device, dtype=self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        kwargs = {} if noise_maps is None else {"noise_maps": noise_maps}
        n = x.shape[0]
        if self._compiled is not None and n < self._compiled_batch:
            # Static shapes (dynamic=False): a short last chunk would compile a graph of its own (tens of seconds
            # for one chunk). Pad it with copies of its last face instead; every face is computed independently.
            x = torch.cat([x, x[-1:].expand(self._compiled_batch - n, *x.shape[1:])])
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        elif self._compiled is not None:
            self._compiled_batch = n
        out = (self._compiled or self.net)(x, noise=noise, generator=gen, fidelity=float(fidelity), **kwargs)
        return out[:n].float()

    @staticmethod
    def _check(faces: torch.Tensor) -> torch.Tensor:
        if not isinstance(faces, torch.Tensor) or faces.ndim != 4:
            raise InvalidImage(f"Faces must be a [N,C,H,W] tensor, got "
                               f"{tuple(faces.shape) if isinstance(faces, torch.Tensor) else type(faces).__name__}.")
        n, c, h, w = faces.shape
        if c == 1:
            faces = faces.expand(-1, 3, -1, -1)
        elif c == 4:
            faces = faces[:, :3]
        elif c != 3:
            raise InvalidImage(f"Faces must have 1, 3 or 4 channels, got {c}.")
        if h < 2 or w < 2:
            raise InvalidImage(f"Faces of {h}x{w} pixels are too small to restore.")
        if not faces.is_floating_point():
            faces = faces.float() / (255.0 if faces.dtype == torch.uint8 else 65535.0)
        # NaN/inf (e.g. from an upstream node) become 0/1 rather than spreading through the network.
        return torch.nan_to_num(faces.float(), nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)

    def auto_batch_size(self) -> int:
        """Faces per call when not told: 8 on a GPU; 1 on a CPU, where batching 512 px faces is no faster (GFPGAN
        v1.4 on 2 cores: 5.1 s/face one at a time, 5.7 at 2 or 6 a call) and multiplies the activation memory
        (whole-photo peak +3.1 GB at 6 a call against +0.5 GB)."""
        return 1 if self.device.type == "cpu" else 8

    # no_grad rather than inference_mode: results stay ordinary tensors that later nodes may modify in place.
    @torch.no_grad()
    def __call__(self, faces: torch.Tensor, visibility: float = 1.0, fidelity: float = 0.5, batch_size: int = 0,
                 noise: str = "random", seed: int = 0,
                 callback: Optional[Callable[[int], None]] = None) -> torch.Tensor:
        """Restore aligned faces.

        faces: [N,3,H,W] RGB float in [0,1] (1/4 channels and integer images are accepted), on any device; the
            result is float32 [N,3,H,W] in [0,1] on the same device. Faces that are not input_size square are
            resized in and out, so the output is pixel-aligned with the input.
        visibility: 1 = restored face, 0 = input (linear blend at the input size).
        fidelity: CodeFormer's w in [0, 1] (0: codebook only, 1: closest to the input); ignored by GFPGAN, like
            the official `weight=` argument.
        batch_size: faces per network call (0: auto_batch_size()); halved automatically on out-of-memory.
        noise / seed: "random" (official behaviour, reproducible with `seed`), "stored" (checkpoint buffers) or
            "none".
        callback: called with the number of faces finished after every chunk (progress / interruption hook).
        """
        if not 0.0 <= float(visibility) <= 1.0:
            raise ValueError(f"visibility must be in [0, 1], got {visibility}")
        if noise not in ("random", "stored", "none"):
            raise ValueError(f"noise must be 'random', 'stored' or 'none', got {noise!r}")
        faces = self._check(faces)
        n, _, h, w = faces.shape
        out_device = faces.device
        if faces.device != self.device and faces.numel() * 4 <= _STAGE_BYTES:
            # One transfer for the whole batch (and one back) instead of two per chunk: on a GPU the chunks then
            # follow each other without waiting for the host.
            faces = faces.to(self.device)
        result = torch.empty((n, 3, h, w), dtype=torch.float32, device=faces.device)
        if n == 0:
            return result.to(out_device)
        if float(visibility) == 0.0:
            if callback is not None:
                callback(n)
            return result.copy_(faces).to(out_device)
        s = self.input_size
        bs = int(batch_size) if int(batch_size) > 0 else self.auto_batch_size()
        maps = self.noise_maps(noise, seed)  # once per call, not per chunk: no CPU draw or upload in the loop
        start = 0
        while start < n:
            chunk = faces[start:start + bs].to(self.device)
            try:
                restored = self._restore_chunk(chunk, s, fidelity, noise, seed, maps)
            except (RuntimeError, MemoryError) as exc:
                if not needs_smaller_chunk(exc) or bs == 1:  # OOM, or a tensor too large for a kernel
                    raise
                restored = None
            if restored is None:  # out of the except block: the failed attempt's tensors are released by now
                empty_cache(self.device)
                bs = max(1, bs // 2)
                continue
            if float(visibility) < 1.0:
                restored = torch.lerp(chunk, restored, float(visibility))
            result[start:start + chunk.shape[0]] = restored.to(result.device)
            start += chunk.shape[0]
            if callback is not None:
                callback(chunk.shape[0])
        return result.to(out_device)

    def _restore_chunk(self, chunk: torch.Tensor, s: int, fidelity: float, noise: str, seed: int,
                       maps: Optional[list] = None) -> torch.Tensor:
        h, w = chunk.shape[-2:]
        x = chunk
        if (h, w) != (s, s):
            x = F.interpolate(x, size=(s, s), mode=RESIZE_IN, align_corners=False, antialias=True)
        x = (x - 0.5) / 0.5                                   # torchvision normalize(mean .5, std .5)
        y = self.forward_normalized(x, fidelity=fidelity, noise=noise, seed=seed, noise_maps=maps)
        y = (y.clamp(-1.0, 1.0) + 1.0) / 2.0                  # tensor2img(min_max=(-1, 1)) before quantisation
        if (h, w) != (s, s):
            y = F.interpolate(y, size=(h, w), mode=RESIZE_OUT, align_corners=False, antialias=True).clamp(0.0, 1.0)
        return y
