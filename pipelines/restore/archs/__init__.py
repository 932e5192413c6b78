"""Face-restorer network architectures (pure PyTorch, official state-dict key names) and their recognition.

Each supported architecture is an `ArchSpec`: a predicate that recognises its state dict, a builder that infers
the constructor arguments from tensor shapes, and a few facts the restorer needs. To add an architecture,
write its module here and append a spec to `ARCHS`; its network must implement

    forward(x: [B,3,S,S] in [-1,1], *, noise: str, generator: torch.Generator | None, fidelity: float)
        -> [B,3,S,S] in ~[-1,1]

and expose `input_size` (S). Unused keyword arguments are accepted and ignored.

`identify_foreign` names other well-known checkpoint kinds (detectors, parsers, SR nets, diffusion weights) so
that a wrong file in facerestore_models/ gets an error that says what it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    name: str                                   # class name, as in the official code
    family: str                                 # what users call it
    matches: Callable[[Mapping], bool]
    build: Callable[[Mapping], nn.Module]       # a network with the file's shapes (random init; load afterwards)
    supports_fidelity: bool = False             # takes CodeFormer's w
    optional_keys: tuple = ()                   # key prefixes a file may omit (e.g. non-persistent noise buffers)
    licence: str = ""
    fp16_ok: bool = True                        # False: float16 requests run in bfloat16 (GPU) or float32
    groupnorm_heavy: bool = False               # GroupNorm in most blocks: NCHW on CUDA (io/device_caps.py)


def _gfpgan_matches(sd: Mapping) -> bool:
    from .gfpgan import is_gfpgan_clean

    return is_gfpgan_clean(sd)


def _gfpgan_build(sd: Mapping) -> nn.Module:
    from .gfpgan import GFPGANv1Clean, config_from_state_dict

    return GFPGANv1Clean(config_from_state_dict(sd))


def _restoreformer_matches(sd: Mapping) -> bool:
    from .restoreformer import is_restoreformer

    return is_restoreformer(sd)


def _restoreformer_build(sd: Mapping) -> nn.Module:
    from .restoreformer import RestoreFormer, config_from_state_dict

    return RestoreFormer(config_from_state_dict(sd))


def _gpen_matches(sd: Mapping) -> bool:
    from .gpen import is_gpen

    return is_gpen(sd)


def _gpen_build(sd: Mapping) -> nn.Module:
    from .gpen import GPEN, config_from_state_dict

    return GPEN(config_from_state_dict(sd))


def _codeformer_matches(sd: Mapping) -> bool:
    from .codeformer import is_codeformer

    return is_codeformer(sd)


def _codeformer_build(sd: Mapping) -> nn.Module:
    from .codeformer import CodeFormer, config_from_state_dict

    return CodeFormer(config_from_state_dict(sd))


ARCHS: list[ArchSpec] = [
    ArchSpec(
        name="GFPGANv1Clean",
        family="GFPGAN v1.2/v1.3/v1.4",
        matches=_gfpgan_matches,
        build=_gfpgan_build,
        optional_keys=("stylegan_decoder.noises.",),
        licence="Apache-2.0 (TencentARC/GFPGAN)",
    ),
    ArchSpec(
        name="CodeFormer",
        family="CodeFormer",
        matches=_codeformer_matches,
        build=_codeformer_build,
        supports_fidelity=True,
        licence="weights: NTU S-Lab License 1.0, non-commercial (sczhou/CodeFormer)",
        # The code choice is an argmax over 1024 logits and spandrel marks CodeFormer fp16-unsafe: use bf16/fp32.
        fp16_ok=False,
        groupnorm_heavy=True,   # VQGAN encoder/decoder: GroupNorm before every convolution
    ),
    ArchSpec(
        name="RestoreFormer",
        family="RestoreFormer / RestoreFormer++",
        matches=_restoreformer_matches,
        build=_restoreformer_build,
        licence="Apache-2.0 (wzhouxiff/RestoreFormerPlusPlus)",
        # Attention logits over 256-1024 positions and a nearest-code search: spandrel marks RestoreFormer
        # fp16-unsafe (bf16 safe); fp16 requests run in bf16 (GPU) or fp32.
        fp16_ok=False,
        groupnorm_heavy=True,   # VQGAN encoder/decoder, like CodeFormer
    ),
    ArchSpec(
        name="GPEN",
        family="GPEN (GPEN-BFR-256/512/1024/2048)",
        matches=_gpen_matches,
        build=_gpen_build,
        licence="yangxy/GPEN: academic and non-commercial use only",
    ),
]


def _describe_supported() -> str:
    return ", ".join(s.family for s in ARCHS)


SUPPORTED_DESCRIPTION = _describe_supported()


def register(spec: ArchSpec) -> None:
    """Add an architecture (e.g. from an optional module); later registrations are tried first."""
    global SUPPORTED_DESCRIPTION
    ARCHS.insert(0, spec)
    SUPPORTED_DESCRIPTION = _describe_supported()


def canonicalize(sd: Mapping) -> Mapping:
    """Undo architecture-specific wrappers that the generic unwrapping does not know (RestoreFormer's 'vqvae.')."""
    from .restoreformer import strip_prefix

    return strip_prefix(sd)


def find_arch(sd: Mapping) -> Optional[ArchSpec]:
    for spec in ARCHS:
        try:
            if spec.matches(sd):
                return spec
        except (KeyError, IndexError, AttributeError, TypeError):
            continue
    return None


def _has(sd: Mapping, *fragments: str) -> bool:
    return all(any(f in k for k in sd) for f in fragments)


def _starts(sd: Mapping, *prefixes: str) -> bool:
    return all(any(k.startswith(p) for k in sd) for p in prefixes)


# (predicate, description) pairs, most specific first. Only key names are inspected.
_FOREIGN = [
    (lambda sd: _starts(sd, "conv_body_first.0.") and _has(sd, "stylegan_decoder."),
     "GFPGAN v1 (the original paper model, GFPGANv1.pth) or GFPGANBilinear, which need the official fused "
     "StyleGAN2 operators; use GFPGANv1.3.pth or GFPGANv1.4.pth instead"),
    (lambda sd: _has(sd, "position_emb", "quantize.embedding.weight", "ft_layers."),
     "a CodeFormer variant with an unexpected layout"),
    (lambda sd: _has(sd, "quantize.embedding.weight") and _has(sd, "encoder.", "decoder."),
     "a VQ autoencoder (VQGAN-like) without RestoreFormer's cross-attention decoder"),
    (lambda sd: _starts(sd, "convs.0.", "final_conv.", "final_linear.1."),
     "a GPEN / StyleGAN2 discriminator (e.g. GPEN-BFR-512-D.pth, used only for training): use GPEN-BFR-512.pth"),
    (lambda sd: _has(sd, "ecd0.") or (_has(sd, "generator.") and _has(sd, "ecd")),
     "a GPEN variant with an unexpected layout (e.g. the FullGenerator_SR super-resolution variant)"),
    (lambda sd: _has(sd, "ClassHead.", "BboxHead.", "LandmarkHead."), "a RetinaFace face detector (facexlib)"),
    (lambda sd: _starts(sd, "cp.") or _has(sd, "ffm.convblk"), "a BiSeNet face-parsing network (facexlib)"),
    (lambda sd: _has(sd, "out_img_conv.", "out_mask_conv."), "a ParseNet face-parsing network (facexlib)"),
    (lambda sd: _has(sd, "rdb1.conv1", "conv_first") or _starts(sd, "model.0.weight", "model.1.sub."),
     "an ESRGAN / Real-ESRGAN image upscaler (put it in upscale_models/)"),
    (lambda sd: _has(sd, "conv_first.") and _has(sd, "layers.0.residual_group"),
     "a SwinIR image upscaler (put it in upscale_models/)"),
    (lambda sd: _starts(sd, "model.diffusion_model."), "a Stable Diffusion checkpoint (put it in checkpoints/)"),
    (lambda sd: _has(sd, "lora_up") or _has(sd, "lora_A") or _has(sd, "lora_down"), "a LoRA"),
    (lambda sd: _has(sd, "input_layer.", "output_layer.", "body."), "an ArcFace / IR-SE face-recognition network"),
    (lambda sd: _has(sd, "features.", "fc.") and _has(sd, "bn1."), "a face-recognition (ArcFace/ResNet) network"),
    (lambda sd: _has(sd, "pnet") or _has(sd, "rnet") or _has(sd, "onet"), "an MTCNN face detector"),
]


def identify_foreign(sd: Mapping) -> Optional[str]:
    """A short description of what an unsupported state dict probably is, or None."""
    for pred, text in _FOREIGN:
        try:
            if pred(sd):
                return text
        except Exception:  # noqa: BLE001 - recognition is best effort
            continue
    return None
