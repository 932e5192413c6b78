"""Renders the template thumbnails (example_workflows/<name>.jpg) from real runs on a ComfyUI server, through the
headless client, on scikit-image's public-domain astronaut photo downscaled x2 (the demo's degradation).

    python workflows/thumbnails.py --server http://127.0.0.1:8188

demo: before (the x2 bicubic enlargement of the degraded photo) / after (the demo graph's output), face region.
The other templates need model files that are not bundled (GFPGAN, SD3 + TSD-SR, IQA and ArcFace weights):
their thumbnails show the degraded input and the face crop the graph would restore, from a real run of the
graph's own detect + align nodes, and say in the picture that no restoration is shown. Re-render them from a
server with the real weights (--real) to show real before/after pictures.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SIZE = (768, 432)  # the thumbnail (16:9, as the templates browser shows them)
NEEDS = {"facemend_fast": "GFPGANv1.4.pth", "facemend_ntire": "GFPGAN v1.4, SD3-medium + TSD-SR",
         "facemend_ntire_full": "GFPGAN v1.3, SD3-medium + TSD-SR, CLIP-IQA, MANIQA, ArcFace",
         "facemend_adapt": "GFPGAN v1.4, the DifFace prior, LPIPS-VGG",
         "facemend_osdface": "SD-2.1-base + OSDFace",
         "facemend_id_preserve": "RestorerID, IP-Adapter-FaceID, CLIP-ViT-H, SD-1.5, ArcFace, MUSIQ"}


def _font(size):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _panel(img, box_w, box_h):
    from PIL import Image

    img = img.copy()
    img.thumbnail((box_w, box_h), Image.LANCZOS)
    return img


def compose(left, right, left_label, right_label, footer):
    from PIL import Image, ImageDraw

    w, h = SIZE
    canvas = Image.new("RGB", (w, h), (24, 24, 28))
    draw = ImageDraw.Draw(canvas)
    pw, ph = w // 2 - 18, h - 96
    for k, (img, label) in enumerate(((left, left_label), (right, right_label))):
        p = _panel(img, pw, ph)
        x = 12 + k * (w // 2) + (pw - p.width) // 2
        canvas.paste(p, (x, 40 + (ph - p.height) // 2))
        draw.text((12 + k * (w // 2), 10), label, fill=(235, 235, 235), font=_font(20))
    for k, line in enumerate(footer.split("\n")):
        draw.text((12, h - 50 + 22 * k), line, fill=(255, 200, 120), font=_font(16))
    return canvas


def detection_graph(api: dict) -> dict:
    """The template's LoadImage -> detector -> detect + align, saving the aligned face crops."""
    from facemend.client.workflow import image_input_node

    photo = image_input_node(api)
    keep = {nid: copy.deepcopy(n) for nid, n in api.items()
            if nid == photo or n["class_type"] in ("FaceMend_DetectorLoader", "FaceMend_DetectAlign")}
    align = next(nid for nid, n in keep.items() if n["class_type"] == "FaceMend_DetectAlign")
    keep["900"] = {"class_type": "SaveImage", "inputs": {"images": [align, 0], "filename_prefix": "crops"}}
    return keep


def face_box(image, scale=1, grow=0.6):
    """The largest detected face's box (embedded MTCNN), grown by `grow` on each side, in output pixels."""
    from facemend.pipelines.face.detectors import EMBEDDED_MTCNN, load_detector
    from facemend.pipelines.io.images import read_image

    det = load_detector(EMBEDDED_MTCNN)
    faces = det.detect(read_image(str(image))[0], 0.8)[0]
    x0, y0, x1, y1 = max(faces.tolist(), key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))[:4]
    w, h = x1 - x0, y1 - y0
    side = max(w, h) * (1 + 2 * grow)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return tuple(int(round(v * scale)) for v in (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", action="append", required=True)
    parser.add_argument("--real", action="store_true", help="the server has the real weights: run every template")
    parser.add_argument("--only", nargs="*", default=None, help="render only these templates")
    parser.add_argument("--work", default=None, help="keep the runs here (a second call reuses finished outputs)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    import conftest  # noqa: F401  (this checkout as `facemend`)
    from PIL import Image

    from facemend.cli import degrade, demo_image, upscale_bicubic
    from facemend.client import Runner, load_workflow
    from facemend.client.progress import Progress
    from facemend.pipelines.io.images import write_image

    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.work or scratch)
        (tmp / "in").mkdir(parents=True, exist_ok=True)
        degraded = degrade(demo_image())
        write_image(str(tmp / "in" / "astronaut.png"), degraded)
        bicubic = upscale_bicubic(degraded)
        before = Image.fromarray((bicubic[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy())
        small = Image.open(tmp / "in" / "astronaut.png").convert("RGB")
        names = [a for a in args.only] if args.only else ["facemend_demo", *NEEDS]
        for name in names:
            api = load_workflow(name)
            real = name == "facemend_demo" or args.real
            graph = api if real else detection_graph(api)
            out = tmp / name
            report = Runner(args.server, graph, out, progress=Progress(1, live=False)).run([tmp / "in"])
            job = report["jobs"][0]
            if job["status"] != "done":
                raise SystemExit(f"{name}: {job['error']}")
            result = Image.open(out / "astronaut.png").convert("RGB")
            if real:
                scale = result.width / small.width
                box = face_box(tmp / "in" / "astronaut.png", scale)
                left = (before if scale == 2 else small).crop(box)
                thumb = compose(left, result.crop(box), "before" + (" (x2 bicubic)" if scale == 2 else ""),
                                "after: " + name.removeprefix("facemend_"),
                                f"{name}: a real run on the public-domain astronaut photo\n(x2 downscaled), face region")
            else:
                thumb = compose(small, result, "input (x2 downscaled)", "face crop this graph restores",
                                f"{name.removeprefix('facemend_')}: needs {NEEDS[name]} (not bundled).\n"
                                "No restoration shown here: only detect + align ran.")
            thumb.save(ROOT / "example_workflows" / f"{name}.jpg", quality=88)
            print("wrote", ROOT / "example_workflows" / f"{name}.jpg")


if __name__ == "__main__":
    main()
