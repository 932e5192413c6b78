"""MTCNN face detector in pure PyTorch: the pack's embedded default detector (no download).

The networks and their weights (the real P-/R-/O-Net weights inside the PyPI package `mtcnn`, read without
importing it) are mtcnn_nets.py; this module is the detection algorithm around them.

The algorithm reproduces `mtcnn` 1.0.0 (`MTCNN().detect_faces(image)`: P-Net -> R-Net -> O-Net) step by step,
batched on the compute device (benchmarks/compare_mtcnn_reference.py runs both on real photos):

* input: RGB 0..255 normalised (x - 127.5) / 128. No image transposition (the 1.x weights are stored for
  row-major images); Keras conv kernels [kh,kw,in,out] -> [out,in,kh,kw]; dense kernels transposed; the
  `Permute((2,1,3))` + `Flatten` of R-/O-Net (NHWC -> W,H,C order) reproduced before the dense layers;
  TF 'same' max pooling (padding at the end) reproduced exactly.
* image pyramid (`build_scale_pyramid`): count = round(-(log(min_side/12)/log(0.709) + 1)) (it does not depend on
  min_face_size), scales = (12/min_face_size) * 0.709**k; level size int(H*s) x int(W*s) (truncation). Each
  level is resized from the full image with `tf.image.resize(method=AREA)`, i.e. TensorFlow's `resize_area`: an
  exact fractional box filter (mtcnn 0.1.x used cv2.resize INTER_AREA, the same filter when shrinking). Here:
  `area_resize`, separable per-axis taps with TF's float32 source positions, gathered rows + one batched
  matmul per chunk; it matches TF to ~2e-7. (`F.interpolate(mode="area")` is adaptive average pooling with
  integer bins and differs for non-integer ratios; antialiased bilinear is a different filter.)
* P-Net: probability > 0.6; cell (y, x) gives (2x+1, 2y+1, 2x+12, 2y+12) + 11 * regression, divided by the scale;
  NMS 0.5 (IoU over union) per image and scale, NMS 0.7 per image over all scales; boxes squared around their
  centre (no rounding to integers, unlike the Matlab/0.1.x code).
* crops for R-Net (24x24) and O-Net (48x48): `tf.image.crop_and_resize` on the normalised image, reproduced
  with TF's float32 arithmetic (`_crop_and_resize`): box coordinate x samples pixel (x/W)*(W-1) + ...; a sample
  outside [0, W-1] is 0, i.e. mid-gray (the classic code padded with black instead). All boxes of all images
  with four gathers, no per-box loop.
* R-Net: probability > 0.7, box += offsets * (w+1, h+1, w+1, h+1) (in float32, as the package's TF tensor
  arithmetic does), NMS 0.7 (union), squared.
* O-Net: landmarks = (w+1) * l + x1 - 1 from the boxes *before* refinement (x1..x5 then y1..y5 in the network
  output), refinement as R-Net, probability > `score_threshold` (the package's threshold_onet: 0.8 in 1.0, 0.7
  in 0.1.x; default here 0.9), NMS 0.7 with IoU over the *smaller* box.
* NMS is the package's, which is not greedy: a box is dropped when ANY higher-scored box of the same image
  overlaps it above the threshold, even one itself dropped. Reproduced (vectorised, `_grouped_nms`) instead of
  `detection.nms` (greedy gives different faces on real photos). A consequence used by the tests: the faces
  above a threshold t do not depend on boxes scored below t. The IoU is computed only for pairs of boxes whose
  x ranges overlap (and, on the CPU, y ranges too): the others cannot exceed a threshold >= 0, so the kept set
  is exactly the dense matrices' (`dense=True`, tested on random sets); 10x less work on a crowd photo.
* output: boxes clipped to [0, W-1] x [0, H-1] (the package's default fit_to_image), landmarks not clipped,
  highest score first. Box arithmetic runs in float64 like the package's numpy code (float32 on MPS).

Measured against mtcnn 1.0.0 + TensorFlow 2.21 on 19 real photos (376 faces): same faces; 372 identical within
0.001 px; 4 moved by up to 8 px because of exact score ties (probabilities saturated at 1.0), which the package
orders with numpy's platform-dependent argsort (see `_score_order`; with NUMPY_TIE_ORDER all 376 match).

Deliberate differences: each image of a batch gets its own pyramid (the package pads a batch to its largest
image, applies the longest scale list to all and mixes the padding into the results), so a batch equals single
calls; pyramid levels smaller than P-Net's 12x12 window are skipped (in the package TensorFlow raises there and
`detect_faces` returns no face at all, e.g. for min_face_size >= 40 on every photo tried).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .detection import rescale_detections, resize_for_detection
from ..io.errors import InvalidImage
from .mtcnn_nets import _ONet, _PNet, _RNet, load_mtcnn_weights, mtcnn_weight_files

__all__ = ["MTCNNDetector", "mtcnn_weight_files", "load_mtcnn_weights", "pyramid_scales", "area_resize"]

# Candidate-pair budget for one NMS block (elements of an IoU matrix held at once).
_NMS_BLOCK = 1 << 22
# Candidate pairs per block of the pruned NMS (each pair gathers two boxes: ~100 bytes a pair in float64).
_NMS_PAIRS = 1 << 20
# Drop candidate pairs without y overlap before their IoU (a host sync per pair block); None: on the CPU only.
_NMS_Y_FILTER: bool | None = None
# Elements of the gathered rows held at once by the area resize (1 MB: the gathered rows are still in cache
# when the matmul reads them; 10% faster than 16 MB on a 24 MP photo, same products row by row).
_AREA_CHUNK = 1 << 18
# Crops per R-/O-Net forward chunk.
_NET_CHUNK = 2048


# --------------------------------------------------------------------------------------------- image ops

def pyramid_scales(height: int, width: int, min_face_size: float = 20, scale_factor: float = 0.709,
                   min_size: int = 12) -> list[float]:
    """mtcnn 1.0 `build_scale_pyramid` (its level count ignores min_face_size; that is reproduced)."""
    min_dim = min(height, width)
    if min_dim <= 0:
        return []
    count = round(-((math.log(min_dim / min_size) / math.log(scale_factor)) + 1))
    m = min_size / min_face_size
    return [m * scale_factor ** k for k in range(max(count, 0))]


def _tf_positions(n_in: int, n_out: int, device) -> tuple[torch.Tensor, float]:
    """resize_area's source positions t_k = float32(k) * float32(n_in/n_out), k = 0..n_out, computed in float32
    exactly like TensorFlow (its float32 rounding moves them by up to ~1e-5 px; matching it keeps P-Net scores
    within ~1e-7 of the package's instead of ~1e-4), returned as float64, and the float32 scale."""
    scale = torch.tensor(n_in, dtype=torch.float32) / torch.tensor(n_out, dtype=torch.float32)
    t = torch.arange(n_out + 1, dtype=torch.float32) * scale
    return t.to(device=device, dtype=torch.float64), float(scale)


def _area_taps(n_in: int, n_out: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [n_out,K] and weights [n_out,K] of TensorFlow's resize_area along one axis (align_corners=False):
    output i averages input cells over [t_i, t_(i+1)) with fractional cell coverage, divided by the scale;
    indices past the border are clamped (TF's BOUND)."""
    t, scale = _tf_positions(n_in, n_out, "cpu")
    start, end = t[:-1], t[1:]
    first = torch.floor(start).long()
    k = int((torch.ceil(end).long() - first).max().item())
    idx = first[:, None] + torch.arange(k)[None, :]
    cover = torch.minimum(idx.double() + 1, end[:, None]) - torch.maximum(idx.double(), start[:, None])
    w = cover.clamp(min=0) / scale
    return idx.clamp(0, n_in - 1).to(device), w.to(device)


def _area_resize_rows(x: torch.Tensor, n_out: int) -> torch.Tensor:
    """resize_area along dim -2, returned TRANSPOSED ([..., W, n_out], contiguous): gather the K source rows of
    each output row at once and weight-sum them (a batched vector-matrix product), in chunks of output rows
    that keep the gathered copy near 1 MB; each chunk's result is written transposed while still in cache (the
    next pass, or the caller, wants the other axis last)."""
    idx, w = _area_taps(x.shape[-2], n_out, x.device)
    w = w.to(x.dtype)
    k = idx.shape[1]
    row = max(1, x[..., :1, :].numel())
    chunk = max(1, _AREA_CHUNK // (k * row))
    out = x.new_empty(*x.shape[:-2], x.shape[-1], n_out)
    for i0 in range(0, n_out, chunk):
        ii, ww = idx[i0:i0 + chunk], w[i0:i0 + chunk]
        g = x.index_select(-2, ii.reshape(-1)).unflatten(-2, tuple(ii.shape))   # [..., c, K, W]
        out[..., i0:i0 + ii.shape[0]] = torch.matmul(ww[:, None, :], g).squeeze(-2).transpose(-1, -2)
    return out


def area_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TensorFlow `tf.image.resize(..., method=AREA)` (== cv2 INTER_AREA when shrinking) on [...,H,W]: exact
    fractional box filter, float32 source positions like TF, separable (rows, then columns)."""
    oh, ow = size
    if (oh, ow) == tuple(x.shape[-2:]):
        return x
    x = _area_resize_rows(x, oh) if oh != x.shape[-2] else x.transpose(-1, -2).contiguous()   # [..., W, oh]
    return _area_resize_rows(x, ow)                                                          # [..., oh, ow]


def _crop_and_resize(images: torch.Tensor, boxes: torch.Tensor, image_ids: torch.Tensor, size: int) -> torch.Tensor:
    """tf.image.crop_and_resize(images, float32([y1/H, x1/W, y2/H, x2/W]), ids, (size, size)), bilinear,
    extrapolation value 0, with TensorFlow's float32 arithmetic step by step (sample row of box b:
    y1n*(H-1) + i*((y2n-y1n)*(H-1)/(size-1)); a sample outside [0, H-1] is 0; lerp top/bottom of left/right).
    All boxes of all images at once with four gathers. images [B,C,H,W] float32; boxes [N,4] pixel x1,y1,x2,y2.
    Returns [N,C,size,size] in channels-last memory layout."""
    n = boxes.shape[0]
    bsz, ch, h, w = images.shape
    if n == 0:
        return images.new_zeros(0, ch, size, size)
    dev = images.device
    nb = (boxes / boxes.new_tensor([w, h, w, h])).float()            # what TF receives: float32 boxes
    hm1 = torch.tensor(float(h - 1), device=dev)
    wm1 = torch.tensor(float(w - 1), device=dev)
    steps = torch.arange(size, device=dev, dtype=torch.float32)
    denom = torch.tensor(float(size - 1), device=dev)
    hs = (nb[:, 3] - nb[:, 1]) * hm1 / denom
    ws = (nb[:, 2] - nb[:, 0]) * wm1 / denom
    in_y = (nb[:, 1] * hm1)[:, None] + steps[None, :] * hs[:, None]  # [N,size]
    in_x = (nb[:, 0] * wm1)[:, None] + steps[None, :] * ws[:, None]
    valid = ((in_y >= 0) & (in_y <= hm1))[:, :, None] & ((in_x >= 0) & (in_x <= wm1))[:, None, :]
    top, left = torch.floor(in_y), torch.floor(in_x)
    y_lerp = (in_y - top)[:, :, None, None]                           # [N,size,1,1]
    x_lerp = (in_x - left)[:, None, :, None]                          # [N,1,size,1]
    t_i = top.long().clamp(0, h - 1)
    b_i = torch.ceil(in_y).long().clamp(0, h - 1)
    l_i = left.long().clamp(0, w - 1)
    r_i = torch.ceil(in_x).long().clamp(0, w - 1)
    flat = images.permute(0, 2, 3, 1).reshape(bsz * h * w, ch)       # NHWC rows
    if flat.stride(1) != 1 and 4 * n * size * size * 8 >= flat.shape[0]:
        # A row of an NCHW image's view has its channels H*W apart: gathering from it is ~7x slower than from
        # NHWC memory, which pays for its one copy once the gathers reach ~1/8 of the pixels (crowds, not a
        # few faces on a large photo). Values unchanged.
        flat = flat.contiguous()
    base = (image_ids * h)[:, None]

    def take(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        idx = ((base + rows)[:, :, None] * w + cols[:, None, :]).reshape(-1)
        return flat.index_select(0, idx).view(n, size, size, ch)

    tl, tr, bl, br = take(t_i, l_i), take(t_i, r_i), take(b_i, l_i), take(b_i, r_i)
    # top = tl + (tr - tl) * x_lerp, bottom likewise, out = top + (bottom - top) * y_lerp: in place in the
    # gathered copies, same operations (a + b == b + a exactly)
    top_v = tr.sub_(tl).mul_(x_lerp).add_(tl)
    bottom_v = br.sub_(bl).mul_(x_lerp).add_(bl)
    out = bottom_v.sub_(top_v).mul_(y_lerp).add_(top_v)
    out.masked_fill_(~valid[..., None], 0.0)
    return out.permute(0, 3, 1, 2)                                    # NCHW view of NHWC memory


# --------------------------------------------------------------------------------------------- boxes

def _iou(a: torch.Tensor, b: torch.Tensor, method: str) -> torch.Tensor:
    """The package's IoU of boxes a[..., :4] and b[..., :4], elementwise with broadcasting (a[:, None], b[None]
    gives the [i, j] matrix); areas unclamped, 'union' or 'min' denominator."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = iw * ih
    if method == "union":
        return inter / (area_a + area_b - inter)
    return inter / torch.minimum(area_a, area_b)


def _fast_nms_sorted(boxes: torch.Tensor, threshold: float, method: str) -> torch.Tensor:
    """boxes [n,4] sorted by score (highest first) -> keep mask: box j survives unless any i < j overlaps it
    above the threshold (mtcnn 1.0 `nms`). Computed in column blocks to bound memory."""
    n = boxes.shape[0]
    suppressed = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    chunk = max(1, _NMS_BLOCK // max(n, 1))
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        iou = _iou(boxes[:c1, None], boxes[None, c0:c1], method)        # [c1, c1-c0]
        above = (iou > threshold) & (torch.arange(c1, device=boxes.device)[:, None]
                                     < torch.arange(c0, c1, device=boxes.device)[None, :])
        suppressed[c0:c1] = above.any(0)
    return ~suppressed


# Sort ties like this machine's numpy does (see _score_order); for equivalence checks only.
NUMPY_TIE_ORDER = False


def _score_order(scores: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Indices by group, then score descending. The package sorts with numpy's reversed `argsort`, whose order
    among EXACTLY equal scores (P-Net/R-Net probabilities saturate at 1.0 in float32) is unspecified and differs
    between platforms (numpy >= 2 uses SIMD sorts on x86). Default here, deterministic: among equal scores the
    later candidate first (what the reversed argsort of classic insertion/merge sorts gives). With
    NUMPY_TIE_ORDER the order is taken from numpy's argsort itself (a host round trip per group), which
    reproduces the package exactly on the same machine for single images."""
    if NUMPY_TIE_ORDER:
        import numpy as np

        parts = []
        for g in torch.unique(groups).tolist():
            idx = torch.nonzero(groups == g).flatten()
            desc = np.argsort(scores[idx].double().cpu().numpy())[::-1].copy()
            parts.append(idx[torch.from_numpy(desc).to(idx.device)])
        return torch.cat(parts)
    order = torch.argsort(scores, stable=True).flip(0)
    return order[torch.argsort(groups[order], stable=True)]


def _dense_nms_sorted(b: torch.Tensor, counts: torch.Tensor, threshold: float, method: str) -> torch.Tensor:
    """The package's NMS on boxes sorted by group then score, by full IoU matrices: all groups padded to
    [G, nmax] when small, else group by group in column blocks. Keep mask in the sorted order. The reference the
    pruned version (`_sparse_nms_sorted`) is tested against, and the path for negative thresholds."""
    n_groups, nmax = counts.numel(), int(counts.max().item())
    if n_groups * nmax * nmax > _NMS_BLOCK:
        return torch.cat([_fast_nms_sorted(piece, threshold, method) for piece in torch.split(b, counts.tolist())])
    # All groups at once: pad to [G, nmax] and mask pairs across groups / padding out.
    starts = torch.cumsum(counts, 0) - counts
    gi = torch.repeat_interleave(torch.arange(n_groups, device=b.device), counts)
    slot = torch.arange(b.shape[0], device=b.device) - starts[gi]
    pad = b.new_zeros(n_groups, nmax, 4)
    pad[gi, slot] = b
    present = torch.zeros(n_groups, nmax, dtype=torch.bool, device=b.device)
    present[gi, slot] = True
    iou = _iou(pad[:, :, None], pad[:, None, :], method)
    upper = torch.ones(nmax, nmax, dtype=torch.bool, device=b.device).triu(1)
    above = (iou > threshold) & upper & present[:, :, None]
    keep = ~above.any(1)
    return keep[gi, slot]


def _sparse_nms_sorted(b: torch.Tensor, g: torch.Tensor, threshold: float, method: str) -> torch.Tensor:
    """Same keep mask as `_dense_nms_sorted` (b [n,4] sorted by group g, then score), computing the IoU only
    for pairs whose x ranges overlap.

    Why the skipped pairs cannot matter (threshold >= 0): a pair whose x ranges do not overlap has iw = 0 after
    the clamp, so inter is 0 (or NaN when ih is infinite) and the IoU is 0, -0 or NaN, never > threshold. Boxes
    without positive width and height (or with a NaN coordinate) have iw or ih = 0 (or NaN) with every box, so
    they take no part. For the remaining boxes, sorted by (group, x1), the partners of box i with x1_j >= x1_i
    and x1_j < x2_i are a contiguous run (found with one searchsorted on integer keys: group, then the rank of
    the coordinate among all x1/x2 values, so that equal floats compare exactly); for each pair the IoU is the
    same float expression as the dense one, and the box earlier in score order suppresses the later. On the CPU
    the pairs whose y ranges do not overlap either are dropped before the IoU (2.5x faster on a crowd photo:
    about 1 in 8 x-overlapping pairs overlaps in y); elsewhere that compaction would sync with the host per
    block, so all x-overlapping pairs get their IoU. Pairs are processed in blocks of about _NMS_PAIRS; all
    vectorised, three host syncs in all on GPUs (none per block)."""
    n = b.shape[0]
    dev = b.device
    live = torch.nonzero((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).flatten()     # positions in score order
    m = live.numel()
    if m < 2:
        return torch.ones(n, dtype=torch.bool, device=dev)
    lg = g[live]
    # exact integer ranks of all x1 and x2 values (equal floats get equal ranks), then (group, x1) keys
    _, rank = torch.unique(torch.cat([b[live, 0], b[live, 2]]), sorted=True, return_inverse=True)
    key1, by_x = torch.sort(lg * (2 * m) + rank[:m], stable=True)
    key2 = (lg * (2 * m) + rank[m:])[by_x]
    pos = live[by_x]                                        # score-order position of each box, in x order
    compact = dev.type == "cpu" if _NMS_Y_FILTER is None else _NMS_Y_FILTER
    y1x, y2x = (b[pos, 1], b[pos, 3]) if compact else (None, None)
    end = torch.searchsorted(key1, key2)                    # first box in x order with key >= (group, x2)
    count = (end - torch.arange(1, m + 1, device=dev)).clamp(min=0)   # its partners: the boxes in between
    cum = torch.cumsum(count, 0)
    # blocks of boxes whose partner runs hold at most 2 * _NMS_PAIRS pairs (or one box's run if longer);
    # block bounds and their pair counts come to the host once
    total = int(cum[-1].item())
    hits = torch.zeros(n, dtype=torch.int32, device=dev)
    if total == 0:
        return hits == 0
    cuts = torch.searchsorted(cum, torch.arange(_NMS_PAIRS, max(total, _NMS_PAIRS), _NMS_PAIRS, device=dev), right=True)
    bounds = torch.unique_consecutive(torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), m)]))
    cum0 = torch.cat([cum.new_zeros(1), cum])
    bounds, pairs = torch.stack([bounds, cum0[bounds]]).tolist()
    for a0, a1, p0, p1 in zip(bounds[:-1], bounds[1:], pairs[:-1], pairs[1:]):
        if p1 == p0:
            continue
        cnt = count[a0:a1]
        first = torch.repeat_interleave(torch.arange(a0, a1, device=dev), cnt, output_size=p1 - p0)
        offs = torch.cumsum(cnt, 0) - cnt
        second = first + 1 + (torch.arange(p1 - p0, device=dev) - offs[first - a0])
        if compact:
            # only pairs whose y ranges overlap too (the others have ih = 0, as for x)
            sel = torch.nonzero((y1x[second] < y2x[first]) & (y1x[first] < y2x[second])).flatten()
            first, second = first[sel], second[sel]
        i, j = pos[first], pos[second]
        lo = torch.minimum(i, j)                            # earlier in score order: the suppressor (row)
        hi = torch.maximum(i, j)
        iou = _iou(b[lo], b[hi], method)
        hits.index_add_(0, hi, (iou > threshold).int())
    return hits == 0


def _grouped_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, threshold: float,
                 method: str = "union", dense: bool = False) -> torch.Tensor:
    """Indices kept by the package's NMS applied independently per group, ordered by group, then score desc.
    dense=True computes every IoU pair (the reference for the tests); by default only pairs that can overlap."""
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = _score_order(scores, groups)
    g = groups[order]
    b = boxes[order]
    if dense or not threshold >= 0:
        _, counts = torch.unique_consecutive(g, return_counts=True)
        keep_sorted = _dense_nms_sorted(b, counts, threshold, method)
    else:
        keep_sorted = _sparse_nms_sorted(b, g, threshold, method)
    return order[keep_sorted]


def _box_dtype(device: torch.device) -> torch.dtype:
    """Box arithmetic in float64 like the package's numpy code, except on devices without float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """mtcnn `resize_to_square`: side = max(w, h), same centre, no rounding."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    x1 = boxes[:, 0] + w * 0.5 - side * 0.5
    y1 = boxes[:, 1] + h * 0.5 - side * 0.5
    return torch.stack([x1, y1, x1 + side, y1 + side], dim=1)


def _refine(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """mtcnn `adjust_bboxes`: box += offsets * (w+1, h+1, w+1, h+1). In the package the offsets are a float32
    TensorFlow tensor, so product and sum happen in float32 (TF converts the numpy operands) and the refined
    boxes are float32 values; reproduced."""
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    delta = offsets.float() * torch.stack([w, h, w, h], dim=1).float()
    return (boxes.float() + delta).to(boxes.dtype)


# --------------------------------------------------------------------------------------------- detector

class MTCNNDetector:
    """MTCNN (Zhang et al. 2016) with the weights of the `mtcnn` PyPI package; see the module docstring.

    detect(images [B,3,H,W] RGB in [0,1]) -> per image a float32 tensor [K,15]: x1,y1,x2,y2,score and the five
    landmarks (x,y): left eye, right eye, nose, left mouth corner, right mouth corner (as seen in the image),
    in pixels of the given image, highest score first."""

    name = "mtcnn"

    def __init__(self, weights: dict[str, list] | None = None, device="cpu", dtype: torch.dtype = torch.float32):
        weights = weights if weights is not None else load_mtcnn_weights()
        self.pnet, self.rnet, self.onet = _PNet(), _RNet(), _ONet()
        for net, key in ((self.pnet, "pnet"), (self.rnet, "rnet"), (self.onet, "onet")):
            net.load_keras(weights[key])
            net.eval().requires_grad_(False)
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.to(device, dtype)

    @classmethod
    def load(cls, device="cpu", dtype: torch.dtype = torch.float32) -> "MTCNNDetector":
        """Build from the installed `mtcnn` package's weights (raises ModelFileNotFound / ModelFileInvalid)."""
        return cls(load_mtcnn_weights(), device=device, dtype=dtype)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "MTCNNDetector":
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        self.pnet.to(device=self.device, dtype=self.dtype)
        # R-/O-Net run on many small crops: channels-last is about 2x faster on CPU and suits cuDNN too.
        for net in (self.rnet, self.onet):
            net.to(device=self.device, dtype=self.dtype, memory_format=torch.channels_last)
        return self

    # ---------------------------------------------------------------- public

    @torch.no_grad()
    def detect(self, images: torch.Tensor, score_threshold: float = 0.9, min_face_size: float = 20,
               max_side: int | None = None, *, scale_factor: float = 0.709,
               stage_thresholds: Sequence[float] = (0.6, 0.7),
               nms_thresholds: Sequence[float] = (0.5, 0.7, 0.7, 0.7)) -> list[torch.Tensor]:
        """Detect faces in a batch [B,C,H,W] (C = 3 RGB; 1 gray and 4 RGBA are accepted) in [0,1].

        score_threshold: O-Net probability a face must exceed (the package's threshold_onet; 0.8 there).
        min_face_size: smallest face side in pixels the pyramid looks for (of the image after `max_side`).
        max_side: if set, images whose longer side is larger are first downscaled to it (antialiased bilinear)
        and the results mapped back. stage_thresholds: P-Net, R-Net; nms_thresholds: P-Net per scale, P-Net
        across scales, R-Net (IoU over union), O-Net (IoU over the smaller box)."""
        if not torch.is_tensor(images) or images.dim() != 4:
            raise InvalidImage(f"MTCNN expects a [B,3,H,W] image tensor, got "
                               f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        elif images.shape[1] == 4:
            images = images[:, :3]
        elif images.shape[1] != 3:
            raise InvalidImage(f"MTCNN expects 3 colour channels, got an image with {images.shape[1]}")
        if min_face_size <= 0:
            raise ValueError(f"min_face_size must be positive, got {min_face_size}")
        bsz, _, h, w = images.shape
        if bsz == 0:
            return []
        images = images.to(self.device, torch.float32)
        # a new tensor (never the caller's), which _detect then normalises in place
        images = torch.nan_to_num(images, nan=0.0, posinf=1.0, neginf=0.0).clamp_(0, 1)
        scale = 1.0
        if max_side:
            images, scale = resize_for_detection(images, int(max_side))
        dets = self._detect(images, float(score_threshold), float(min_face_size), float(scale_factor),
                            tuple(stage_thresholds), tuple(nms_thresholds))
        if scale != 1.0:
            sh, sw = images.shape[-2:]
            dets = rescale_detections(dets, sw / w, sh / h)
        return dets

    __call__ = detect

    # ---------------------------------------------------------------- stages

    def _detect(self, images, score_threshold, min_face_size, scale_factor, stage_thr, nms_thr):
        """images: detect's own float32 copy in [0, 1] (overwritten)."""
        bsz, _, h, w = images.shape
        dev = images.device
        empty = [torch.zeros(0, 15, device=dev) for _ in range(bsz)]
        x = images.mul_(255.0).sub_(127.5).div_(128.0)  # float32, normalised: (x*255 - 127.5)/128 in detect's copy
        boxes, ids = self._stage_pnet(x, min_face_size, scale_factor, stage_thr[0], nms_thr[0], nms_thr[1])
        if boxes.shape[0] == 0:
            return empty
        boxes, ids = self._stage_rnet(x, boxes, ids, stage_thr[1], nms_thr[2])
        if boxes.shape[0] == 0:
            return empty
        boxes, scores, marks, ids = self._stage_onet(x, boxes, ids, score_threshold, nms_thr[3])
        # fit_to_image (package default): boxes into [0, W-1] x [0, H-1]; landmarks left as predicted.
        boxes = torch.stack([boxes[:, 0].clamp(0, w - 1), boxes[:, 1].clamp(0, h - 1),
                             boxes[:, 2].clamp(0, w - 1), boxes[:, 3].clamp(0, h - 1)], dim=1)
        pts = torch.stack([marks[:, :5], marks[:, 5:]], dim=2).reshape(-1, 10)  # x1..x5,y1..y5 -> (x,y) pairs
        rows = torch.cat([boxes.float(), scores[:, None].float(), pts.float()], dim=1)
        return [rows[ids == b] for b in range(bsz)]

    def _stage_pnet(self, x, min_face_size, scale_factor, threshold, nms_scale, nms_all):
        bsz, _, h, w = x.shape
        dev = x.device
        bdt = _box_dtype(dev)
        all_boxes, all_scores, all_groups = [], [], []
        scales = pyramid_scales(h, w, min_face_size, scale_factor)
        # On the GPU the whole batch goes through each level at once; on the CPU image by image, which keeps the
        # tensors small (measured 1.7x faster per image for 4 x 2.5 MP: big allocations page-fault).
        step = bsz if dev.type != "cpu" else 1
        for level, s in enumerate(scales):
            hs, ws = int(h * s), int(w * s)                                      # numpy float -> int32 truncation
            if hs < 12 or ws < 12:
                continue
            for b0 in range(0, bsz, step):
                level_img = area_resize(x[b0:b0 + step], (hs, ws))
                all_boxes, all_scores, all_groups = self._pnet_candidates(
                    level_img, b0, s, level, len(scales), threshold, bdt, all_boxes, all_scores, all_groups)
        if not all_boxes:
            return torch.zeros(0, 4, device=dev, dtype=bdt), torch.zeros(0, dtype=torch.long, device=dev)
        boxes, scores, groups = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_groups)
        keep = _grouped_nms(boxes, scores, groups, nms_scale, "union")          # per image and scale
        boxes, scores, ids = boxes[keep], scores[keep], groups[keep] // len(scales)
        keep = _grouped_nms(boxes, scores, ids, nms_all, "union")               # per image, all scales
        return _square(boxes[keep]), ids[keep]

    def _pnet_candidates(self, level_img, b0, s, level, n_levels, threshold, bdt, all_boxes, all_scores,
                         all_groups):
        reg, prob = self.pnet(level_img.to(self.dtype))
        b_idx, yy, xx = torch.nonzero(prob > threshold, as_tuple=True)
        if b_idx.numel():
            # The package does this in float64 numpy from the float32 network outputs; so do we (CPU/CUDA).
            r = reg[b_idx, :, yy, xx].to(bdt)                                    # [n,4]
            x0 = (xx * 2 + 1).to(bdt)
            y0 = (yy * 2 + 1).to(bdt)
            box = torch.stack([x0 + r[:, 0] * 11, y0 + r[:, 1] * 11, x0 + 11 + r[:, 2] * 11, y0 + 11 + r[:, 3] * 11],
                              dim=1) / s
            all_boxes.append(box)
            all_scores.append(prob[b_idx, yy, xx])
            all_groups.append((b_idx + b0) * n_levels + level)
        return all_boxes, all_scores, all_groups

    def _run_chunked(self, net, crops):
        crops = crops.to(self.dtype).contiguous(memory_format=torch.channels_last)
        outs = [net(crops[i:i + _NET_CHUNK]) for i in range(0, crops.shape[0], _NET_CHUNK)]
        return [torch.cat(parts) for parts in zip(*outs)]

    def _stage_rnet(self, x, boxes, ids, threshold, nms_thr):
        crops = _crop_and_resize(x, boxes, ids, 24)
        offsets, scores = self._run_chunked(self.rnet, crops)
        boxes = _refine(boxes, offsets)
        sel = scores > threshold
        boxes, scores, ids = boxes[sel], scores[sel], ids[sel]
        keep = _grouped_nms(boxes, scores, ids, nms_thr, "union")
        return _square(boxes[keep]), ids[keep]

    def _stage_onet(self, x, boxes, ids, threshold, nms_thr):
        crops = _crop_and_resize(x, boxes, ids, 48)
        offsets, marks, scores = self._run_chunked(self.onet, crops)
        bw = boxes[:, 2:3] - boxes[:, 0:1] + 1
        bh = boxes[:, 3:4] - boxes[:, 1:2] + 1
        # computed in float64 and stored into the float32 array of the network output, as in the package
        marks = torch.cat([bw * marks[:, :5] + boxes[:, 0:1] - 1, bh * marks[:, 5:] + boxes[:, 1:2] - 1], dim=1)
        marks = marks.float()
        boxes = _refine(boxes, offsets)
        sel = scores > threshold
        boxes, scores, marks, ids = boxes[sel], scores[sel], marks[sel], ids[sel]
        keep = _grouped_nms(boxes, scores, ids, nms_thr, "min")
        return boxes[keep], scores[keep], marks[keep], ids[keep]
