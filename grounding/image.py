"""Images, one way everywhere: decoding encoded bytes (header first, with the pixel limit), the reason a
row's image is unusable, and the vision towers' transform (resize to a square, normalise).

The frame is the stored one: pixels as encoded, an EXIF ``Orientation`` tag NOT applied, which is the frame
a shard's ``width`` / ``height`` and boxes were measured in. The pipeline stores downloads upright and without
the tag (:func:`upright_bytes`, :mod:`pipeline.download`), so for its shards the stored frame is the displayed
one; rows of shards made before that keep tagged bytes with boxes in the stored frame, and stay consistent,
since nothing here turns them. Exports drop a leftover tag without turning the pixels (:func:`untagged_bytes`),
so loaders that apply EXIF (detectron2, mmcv) and loaders that ignore it (plain ``PIL.Image.open``,
torchvision's ``CocoDetection``, GroundingDINO's ODVG loader) see the frame of the boxes alike.

Used by the renderer (grounding.render), the detector's command line (grounding.detect_cli), the trainer's data
(model.data), the evaluator (model.evaluate) and the model's vision tower (model.cogvlm), which ships
its :class:`ImageTransform` so nobody re-implements normalisation.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
from PIL import Image

MAX_PIXELS = 89_478_485          # PIL's decompression-bomb limit (img2dataset applies it too)

# per-channel (mean, std) of the towers' training images, RGB in 0..1
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
NORMALIZATION = {"clip": (CLIP_MEAN, CLIP_STD), "siglip": (SIGLIP_MEAN, SIGLIP_STD)}

ImageSource = Union[bytes, str, os.PathLike]

ORIENTATION_TAG = 0x0112   # EXIF Orientation: 1 upright, 2-8 a flip and/or rotation to apply for display
# orientation -> the transpose that turns the stored pixels into the displayed frame (as ImageOps.exif_transpose)
_TO_DISPLAY = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_90}


class ImageTooLarge(ValueError):
    """The header declares more pixels than allowed (a decompression bomb, or just too big)."""


def _open(source: ImageSource) -> Image.Image:
    return Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source)


def orientation(im: Image.Image) -> int:
    """The EXIF orientation (1..8) of an opened image, from its header, no pixel decoded (a PNG's tag is read
    from an eXIf chunk before the pixel data only: ``getexif`` would decode the whole PNG to look past it);
    1 without a tag or with a broken one."""
    try:
        if im.format == "PNG":
            raw = im.info.get("exif")
            exif = Image.Exif()
            if raw:
                exif.load(raw)
        else:
            exif = im.getexif()
        o = int(exif.get(ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - malformed EXIF: treat as upright, as viewers do
        return 1
    return o if o in _TO_DISPLAY else 1


def image_header(source: ImageSource, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` of the stored pixels from the encoded header, without decoding pixels.

    Raises :class:`ImageTooLarge` when ``width * height > max_pixels`` (PIL's own bomb check maps to it
    too) and PIL's errors for bytes that are not an image.
    """
    try:
        with _open(source) as im:
            w, h = im.size
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(str(e)) from e
    if w * h > max_pixels:
        raise ImageTooLarge(f"{w}x{h} = {w * h} pixels > {max_pixels}")
    return w, h


def decode_image(source: ImageSource, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Encoded bytes (or a file) -> RGB image of the stored pixels, the header's size checked before any
    pixel is decoded.

    Raises :class:`ImageTooLarge` or PIL's error; :func:`try_decode_image` turns those into a reason.
    """
    image_header(source, max_pixels)
    with _open(source) as im:
        im.load()
        return im.convert("RGB")


def upright_bytes(data: bytes, quality: int = 95) -> bytes:
    """Encoded image bytes whose pixels are turned into the displayed frame and carry no orientation tag (what
    the pipeline stores of a download). Bytes with no orientation to apply come back unchanged."""
    return _without_orientation(data, quality, turn=True)


def untagged_bytes(data: bytes, quality: int = 95) -> bytes:
    """Encoded image bytes with an orientation tag dropped and the pixels left as stored (what an export writes
    of a row whose boxes are in the stored frame). Bytes with no orientation tag come back unchanged."""
    return _without_orientation(data, quality, turn=False)


def _without_orientation(data: bytes, quality: int, turn: bool) -> bytes:
    """Tagged bytes decoded, turned (or not) and re-encoded in their own format (JPEG at ``quality``; a phone's
    MPO as JPEG), ICC profile kept, EXIF dropped; others unchanged (no re-encoding)."""
    with _open(data) as im:
        o, fmt, icc = orientation(im), im.format, im.info.get("icc_profile")
        if o == 1:
            return bytes(data)
        im.load()
        pixels = im.transpose(_TO_DISPLAY[o]) if turn else im.copy()
    fmt = "JPEG" if fmt in ("JPEG", "MPO") else fmt or "PNG"
    buf = io.BytesIO()
    options = {"quality": quality} if fmt == "JPEG" else {}
    if icc:
        options["icc_profile"] = icc
    pixels.save(buf, format=fmt, **options)
    return buf.getvalue()


def decode_failure(e: Exception) -> str:
    """The reason a row carries for an image that did not decode: ``too_many_pixels`` or
    ``corrupt_image: <ExceptionType>`` (the type only: PIL's messages hold object addresses, and skip
    counts keyed by reason must stay few)."""
    return "too_many_pixels" if isinstance(e, ImageTooLarge) else f"corrupt_image: {type(e).__name__}"


def try_decode_image(source: ImageSource, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image | None, str | None]:
    """``(RGB image, None)`` or ``(None, reason)``: a broken image is data, not a crash."""
    try:
        return decode_image(source, max_pixels), None
    except Exception as e:  # PIL raises many kinds for bad bytes
        return None, decode_failure(e)


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> ``(3, size, size)`` float32 tensor: RGB, bicubic resize to a square, normalised.

    No crop and no padding: relative (0..999) box coordinates stay valid after the resize. Picklable, so
    data-loader workers get their own copy. A vision tower owns one (``model.image_transform``).
    """
    size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self):
        if self.size <= 0:
            raise ValueError(f"image size must be positive, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need 3 values each, std > 0")

    def __call__(self, image: Image.Image):
        import torch

        img = image.convert("RGB").resize((self.size, self.size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0  # (3, S, S)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (x - mean) / std

    def batch(self, images: Sequence[Image.Image]):
        import torch

        return torch.stack([self(im) for im in images])  # (B, 3, S, S)
