"""grounding.image: one decoder (header checked against the pixel limit first), one reason vocabulary,
one tower transform."""
from __future__ import annotations

import io
import pickle

import pytest
import torch
from PIL import Image

from grounding.image import (
    CLIP_MEAN, CLIP_STD, MAX_PIXELS, ORIENTATION_TAG, ImageTooLarge, ImageTransform, decode_image, image_header,
    orientation, try_decode_image, untagged_bytes, upright_bytes,
)
from grounding.testing import oriented_jpeg


def png(w: int, h: int, color=(200, 30, 60), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), color if mode == "RGB" else 128).save(buf, "PNG")
    return buf.getvalue()


def test_decodes_bytes_and_files_to_rgb(tmp_path):
    data = png(40, 20, mode="L")
    (tmp_path / "a.png").write_bytes(data)
    for source in (data, str(tmp_path / "a.png")):
        im = decode_image(source)
        assert im.mode == "RGB" and im.size == (40, 20) and im.getpixel((3, 3)) == (128, 128, 128)


def test_size_limit_is_read_from_the_header_before_decoding():
    data = png(300, 200)
    assert image_header(data, max_pixels=60_000) == (300, 200)
    with pytest.raises(ImageTooLarge, match="300x200 = 60000 pixels > 59999"):
        decode_image(data, max_pixels=59_999)
    assert try_decode_image(data, max_pixels=59_999) == (None, "too_many_pixels")
    assert MAX_PIXELS == Image.MAX_IMAGE_PIXELS                  # PIL's own bomb limit, defined once here


def _red(px) -> bool:
    return px[0] > 180 and px[1] < 80 and px[2] < 80


def test_exif_oriented_jpeg_is_measured_and_decoded_in_its_stored_frame():
    """Rows of shards made before downloads were stored upright hold tagged bytes with width/height and boxes
    in the stored frame; header and decoding stay in that frame, so those rows keep lining up."""
    from img2dataset.resizer import Resizer

    resizer = Resizer(image_size=512, resize_mode="keep_ratio_largest", resize_only_if_bigger=True,
                      encode_quality=95, encode_format="jpg", skip_reencode=True)
    stored, *_, err = resizer(io.BytesIO(oriented_jpeg()))
    assert err is None and Image.open(io.BytesIO(stored)).getexif()[ORIENTATION_TAG] == 6
    assert image_header(stored) == (300, 200)
    im = decode_image(stored)
    assert im.size == (300, 200) and _red(im.getpixel((10, 10))) and not _red(im.getpixel((290, 10)))
    assert try_decode_image(stored)[0].size == (300, 200)


def test_upright_bytes_turn_the_pixels_and_untagged_bytes_keep_them_both_without_the_tag():
    tagged = oriented_jpeg()
    up = Image.open(io.BytesIO(upright_bytes(tagged)))
    assert up.format == "JPEG" and up.getexif().get(ORIENTATION_TAG) in (None, 1)
    assert up.size == (200, 300)  # the displayed frame, for loaders that ignore EXIF and those that apply it
    up = up.convert("RGB")
    assert _red(up.getpixel((190, 10))) and not _red(up.getpixel((10, 10)))
    kept = Image.open(io.BytesIO(untagged_bytes(tagged)))
    assert kept.getexif().get(ORIENTATION_TAG) in (None, 1) and kept.size == (300, 200)
    assert _red(kept.convert("RGB").getpixel((10, 10)))          # the stored frame, as an old row's boxes
    plain = png(30, 20)
    assert upright_bytes(plain) == plain and untagged_bytes(plain) == plain  # nothing to do: bytes kept as they are


def test_a_png_orientation_is_read_from_its_header_without_decoding():
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6
    buf = io.BytesIO()
    Image.new("RGB", (30, 20), (220, 20, 20)).save(buf, "PNG", exif=exif.tobytes())
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        assert orientation(im) == 6 and im._im is None   # no pixel decoded
    assert Image.open(io.BytesIO(upright_bytes(buf.getvalue()))).size == (20, 30)
    assert orientation(Image.open(io.BytesIO(png(30, 20)))) == 1


def test_broken_bytes_give_a_short_reason_not_a_crash():
    good = png(16, 16)
    assert try_decode_image(b"not an image") == (None, "corrupt_image: UnidentifiedImageError")
    assert try_decode_image(good[:60]) == (None, "corrupt_image: OSError")      # truncated after the header
    image, reason = try_decode_image(good)
    assert reason is None and image.size == (16, 16)


def test_transform_resizes_without_crop_normalises_and_pickles():
    t = ImageTransform(8)
    x = t(Image.new("RGB", (90, 30), (255, 0, 128)))
    expect = (torch.tensor([255, 0, 128]) / 255.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert x.shape == (3, 8, 8)
    torch.testing.assert_close(x[:, 4, 4], expect)
    assert pickle.loads(pickle.dumps(t)) == t and t.batch([Image.new("RGB", (5, 5))] * 2).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError):
        ImageTransform(0)
