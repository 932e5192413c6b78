"""Identity similarity between input and restored faces with an ArcFace ONNX model (insightface packs:
buffalo_l ``w600k_r50.onnx``, antelopev2 ``glintr100.onnx``), run by onnxruntime (optional extra ``iqa``).

As the NTIRE 2025 check does it (face_alignment/inference.py): both the input and the output are warped with the
*input's* five landmarks to the 112x112 ArcFace template, embedded, and compared by cosine similarity. The
challenge itself uses AdaFace IR-50; ArcFace is the documented proxy (reference/methods.md 7.2).
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
import torch.nn.functional as F

from ..io.errors import FaceMendError, ModelFileInvalid
from ..face.geometry import face_template, fit_similarity, warp_to_crops

# insightface's arcface_dst (utils/face_align.py): eyes, nose, mouth corners in a 112x112 crop.
ARCFACE_TEMPLATE_112 = ((38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366),
                        (41.5493, 92.3655), (70.7299, 92.2041))
INPUT_SIZE = 112
CUDA_PROVIDER, CPU_PROVIDER = "CUDAExecutionProvider", "CPUExecutionProvider"
GPU_PACKAGE_HINT = ("for ArcFace on the GPU install onnxruntime-gpu instead of onnxruntime (pip uninstall onnxruntime "
                    "&& pip install onnxruntime-gpu, or the extra 'identity-gpu' / 'iqa-gpu'; the two packages share "
                    "one module, so only one of them may be installed)")
log = logging.getLogger("facemend")


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise FaceMendError("ID similarity needs onnxruntime (optional extra 'iqa'): pip install onnxruntime "
                            "(or onnxruntime-gpu)") from exc
    return onnxruntime


def _input_normalisation(path: str) -> tuple[float, float]:
    """insightface's rule (model_zoo/arcface_onnx.py): converted MXNet models start with Sub and Mul nodes and
    normalise inside the graph (mean 0, std 1); others expect (x*255 - 127.5) / 127.5."""
    try:
        import onnx
    except ImportError:
        return 127.5, 127.5
    graph = onnx.load(path, load_external_data=False).graph
    names = [n.name for n in graph.node[:8]]
    sub = any(n.startswith("Sub") or n.startswith("_minus") for n in names)
    mul = any(n.startswith("Mul") or n.startswith("_mul") for n in names)
    return (0.0, 1.0) if sub and mul else (127.5, 127.5)


def choose_providers(device: torch.device, available: list) -> list:
    """onnxruntime providers for `device`: CUDA (that device's index) first on a CUDA device when the installed
    package has it, CPU otherwise. The CPU package on a CUDA device runs on the CPU, with a warning that says how
    to get the GPU package (ArcFace is small: correct, only slower)."""
    if device.type != "cuda":
        return [CPU_PROVIDER]
    if CUDA_PROVIDER not in available:
        log.warning("FaceMend: ArcFace runs on the CPU although the compute device is %s: the installed onnxruntime "
                    "has no CUDA provider (providers: %s); %s.", device, ", ".join(available), GPU_PACKAGE_HINT)
        return [CPU_PROVIDER]
    index = device.index if device.index is not None else (torch.cuda.current_device()
                                                           if torch.cuda.is_available() else 0)
    # CPU stays listed after CUDA for the few operators CUDA lacks (onnxruntime's graph partitioning).
    return [(CUDA_PROVIDER, {"device_id": index}), CPU_PROVIDER]


class ArcFaceONNX:
    """``embed(faces112 [N,3,112,112] RGB in [0,1]) -> [N,D]`` L2-normalised embeddings, and
    ``similarity(a, b, landmarks=None) -> [N]`` cosine between faces a (the input) and b (the output)."""

    name = "arcface"

    def __init__(self, path: str, device: torch.device | str = "cpu"):
        ort = _import_onnxruntime()
        self.path = path
        self.device = torch.device(device)
        providers = choose_providers(self.device, list(ort.get_available_providers()))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(path, sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types on bad files
            raise ModelFileInvalid(f"Cannot load ONNX model {path}: {str(exc).splitlines()[0][:300]}") from exc
        used = list(self.session.get_providers())
        if providers[0] != CPU_PROVIDER and (not used or used[0] != CUDA_PROVIDER):
            # onnxruntime drops a provider that fails to initialise (CUDA/cuDNN libraries missing or of the wrong
            # version) and carries on with the CPU: refuse rather than run silently elsewhere than asked.
            raise FaceMendError(
                f"ArcFace ({os.path.basename(path)}) was to run on {self.device}, but onnxruntime's CUDA provider "
                f"failed to start (session providers: {', '.join(used) or 'none'}). Usually the CUDA or cuDNN "
                "libraries that this onnxruntime-gpu build needs are missing or of another version (see the "
                "onnxruntime log above and https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html"
                "#requirements); install a matching onnxruntime-gpu, or run FaceMend on the CPU.")
        self.provider = used[0] if used else CPU_PROVIDER
        log.info("FaceMend: ArcFace %s runs on onnxruntime's %s (device %s).", os.path.basename(path),
                 self.provider, self.device)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = inputs[0].shape
        if len(inputs) != 1 or len(shape) != 4 or shape[1] != 3 or any(
                isinstance(s, int) and s != INPUT_SIZE for s in shape[2:]):
            raise ModelFileInvalid(f"{path} is not an ArcFace recognition model: input {inputs[0].name} has shape "
                                   f"{shape}, expected [N,3,112,112] (insightface w600k_r50.onnx / glintr100.onnx; "
                                   "detection models such as det_10g.onnx do not fit).")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.batch_fixed = shape[0] if isinstance(shape[0], int) else None
        self.mean, self.std = _input_normalisation(path)

    @classmethod
    def from_file(cls, path: str, device="cpu") -> "ArcFaceONNX":
        if not os.path.isfile(path):
            raise ModelFileInvalid(f"ArcFace model not found: {path}")
        return cls(path, device)

    def embed(self, faces: torch.Tensor) -> torch.Tensor:
        """faces [N,3,112,112] RGB in [0,1] -> [N,D] unit vectors (on the faces' device)."""
        if faces.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"ArcFace expects [N,3,112,112] faces, got {tuple(faces.shape)}")
        x = ((faces.float() * 255 - self.mean) / self.std).detach().cpu().contiguous().numpy()
        step = self.batch_fixed or x.shape[0] or 1
        outs = [self.session.run([self.output_name], {self.input_name: x[i:i + step]})[0]
                for i in range(0, x.shape[0], step)]
        emb = torch.from_numpy(np.concatenate(outs, 0)).to(faces.device).float()
        return F.normalize(emb, dim=1)

    def similarity(self, a: torch.Tensor, b: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """Cosine similarity per pair of faces a[i], b[i] ([N,3,H,W] in [0,1], same size).

        landmarks [N,5,2]: the five points of each *input* face a[i] in its pixel coordinates; both a and b are
        warped with them (as the NTIRE check). None: the faces are FFHQ-aligned crops (the pack's Detect + Align
        output), whose landmarks are the FFHQ template at their size.
        """
        if a.shape != b.shape:
            raise ValueError(f"input and output faces must have the same shape, got {tuple(a.shape)} and "
                             f"{tuple(b.shape)}")
        n, _, h, w = a.shape
        if landmarks is None:
            if h != w:
                raise ValueError(f"without landmarks the faces must be square aligned crops, got {w}x{h}")
            landmarks = face_template(h).expand(n, 5, 2)
        landmarks = landmarks.to(torch.float32).cpu().reshape(n, 5, 2)
        affine = fit_similarity(landmarks, torch.tensor(ARCFACE_TEMPLATE_112))
        idx = torch.arange(n)
        both = torch.cat([a, b])
        crops = warp_to_crops(both.float(), torch.cat([idx, idx + n]), torch.cat([affine, affine]).to(a.device),
                              INPUT_SIZE, border="constant", border_value=(0.0, 0.0, 0.0), antialias=False)
        emb = self.embed(crops)
        return (emb[:n] * emb[n:]).sum(1)

    def __call__(self, a, b, landmarks=None):
        return self.similarity(a, b, landmarks)
