"""Pictures of grounding rows: images with their boxes and phrase labels, as a contact sheet PNG.

Look at the boxes before spending GPU-days training on them::

    from grounding.query import connect
    from grounding.render import render_contact_sheet
    sheet = render_contact_sheet(connect("OUT"), where="num_boxes >= 3", seed=0)
    sheet.image.save("sheet.png")

or ``grounding-query render sheet.png --data OUT --where "num_boxes >= 3" -n 16``.

Each phrase keeps its colour everywhere (a hash of the lower-cased phrase picks the hue), so "red
ball" is the same colour in every cell and every run. Labels sit on a filled tag of the box's colour
with black or white text, whichever contrasts more (at least WCAG's 4.5:1 for every hue used here).
An image that does not decode becomes a grey cell that says why; it never stops the sheet.
"""
from __future__ import annotations

import colorsys
import hashlib
import textwrap
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

from grounding.boxes import denormalize_box
from grounding.image import try_decode_image
from grounding.schema import phrase_prompt

RGB = tuple[int, int, int]
BLACK: RGB = (0, 0, 0)
WHITE: RGB = (255, 255, 255)


@dataclass
class ContactSheetConfig:
    count: int = 16                 # images on the sheet
    columns: int = 4
    cell: int = 320                 # thumbnail box side in pixels (images are scaled to fit, up or down)
    font_size: int = 14
    line_width: int = 3
    caption_lines: int = 2          # caption text under each thumbnail
    show_scores: bool = True        # "red ball 0.87" on each label
    min_score: float = 0.0          # boxes scored below this are not drawn
    max_label_chars: int = 28       # longer phrases are cut with an ellipsis
    padding: int = 8
    background: RGB = (255, 255, 255)

    def __post_init__(self):
        for name in ("count", "columns", "cell", "font_size", "line_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cell < 4 * self.font_size:
            raise ValueError(f"cell ({self.cell}) must be at least 4x font_size ({self.font_size}) for legible labels")
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"min_score must be in [0, 1], got {self.min_score}")
        if self.max_label_chars < 4:
            raise ValueError(f"max_label_chars must be >= 4, got {self.max_label_chars}")
        if self.caption_lines < 0 or self.padding < 0:
            raise ValueError("caption_lines and padding must be >= 0")


def phrase_colour(phrase: str) -> RGB:
    """A stable, saturated colour for a phrase: the same phrase gets the same colour in every run."""
    digest = hashlib.md5(phrase.strip().lower().encode("utf-8")).digest()
    hue = int.from_bytes(digest[:4], "big") / 2**32
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return (round(r * 255), round(g * 255), round(b * 255))


def _luminance(c: RGB) -> float:
    def lin(v: float) -> float:
        v /= 255
        return v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4
    r, g, b = (lin(v) for v in c)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(a: RGB, b: RGB) -> float:
    """WCAG 2 contrast ratio between two colours (1 to 21)."""
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def text_colour(background: RGB) -> RGB:
    """Black or white, whichever reads better on ``background``."""
    return BLACK if contrast_ratio(BLACK, background) >= contrast_ratio(WHITE, background) else WHITE


def load_font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def phrase_label(phrase: Mapping[str, Any]) -> str:
    """What a box is called on the picture: the detector prompt, else the caption text."""
    return phrase_prompt(phrase).strip()


@dataclass
class Label:
    """Where one box's label went (for tests and callers that lay out their own pictures)."""

    text: str
    colour: RGB
    box: tuple[float, float, float, float]      # pixel xyxy on the drawn image
    tag: tuple[int, int, int, int]              # the filled label rectangle


def draw_boxes(image: Image.Image, phrases: Sequence[Mapping[str, Any]], *, font_size: int = 14,
               line_width: int = 3, show_scores: bool = True, min_score: float = 0.0,
               max_label_chars: int = 28) -> list[Label]:
    """Draw every phrase's boxes (``boxes_norm``, 0..999) and labels on ``image``, in place.

    The normalised boxes refer to the stored image's frame, so they are drawn at ``image``'s own
    size whatever it was scaled to. Boxes scored below ``min_score`` are skipped; phrases longer
    than ``max_label_chars`` are cut with an ellipsis. Returns the labels drawn.
    """
    draw = ImageDraw.Draw(image)
    font = load_font(font_size)
    w, h = image.size
    boxes = []  # outlines first, then every label on top, so no outline crosses a label
    for p in phrases:
        name = phrase_label(p)
        scores = p.get("det_scores") or []
        shown = name if len(name) <= max_label_chars else name[: max_label_chars - 1].rstrip() + "…"
        for i, nb in enumerate(p["boxes_norm"]):
            if i < len(scores) and scores[i] < min_score:
                continue
            text = f"{shown} {scores[i]:.2f}" if show_scores and i < len(scores) else shown
            boxes.append((text, phrase_colour(name), denormalize_box(nb, w, h)))
    for _, colour, box in boxes:
        draw.rectangle(list(box), outline=colour, width=line_width)
    labels: list[Label] = []
    pad = max(2, font_size // 6)
    for text, colour, (x0, y0, x1, y1) in boxes:
        tl, tt, tr, tb = draw.textbbox((0, 0), text, font=font)
        tag_w, tag_h = tr - tl + 2 * pad, tb - tt + 2 * pad
        tag = _place_tag((x0, y0, x1, y1), tag_w, tag_h, (w, h), line_width, [lab.tag for lab in labels])
        draw.rectangle(tag, fill=colour)
        draw.text((tag[0] + pad - tl, tag[1] + pad - tt), text, fill=text_colour(colour), font=font)
        labels.append(Label(text, colour, (x0, y0, x1, y1), tag))
    return labels


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def _place_tag(box, tag_w: int, tag_h: int, size: tuple[int, int], line_width: int,
               placed: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    """Where a label goes: above the box, else just inside its top edge, below its bottom edge, or
    just inside that, left- then right-aligned; the first spot that covers no earlier label, else
    the least covered."""
    x0, y0, x1, y1 = box
    w, h = size
    best, best_cover = None, None
    for ty in (y0 - tag_h, y0 + line_width, y1, y1 - tag_h - line_width):
        for tx in (x0, x1 - tag_w):  # left-aligned, then right-aligned with the box
            tx = int(min(max(tx, 0), max(w - tag_w, 0)))
            ty = int(min(max(ty, 0), max(h - tag_h, 0)))
            tag = (tx, ty, tx + tag_w, ty + tag_h)
            cover = sum(_overlap(tag, other) for other in placed)
            if best_cover is None or cover < best_cover:
                best, best_cover = tag, cover
            if cover == 0:
                return tag
    return best


def _thumbnail(img: Image.Image, side: int) -> Image.Image:
    scale = side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS)


@dataclass
class ContactSheet:
    image: Image.Image
    keys: list[str]
    errors: dict[str, str] = field(default_factory=dict)        # key -> why its image did not decode
    labels: dict[str, list[Label]] = field(default_factory=dict)  # key -> labels drawn in its cell


def render_rows(rows: Sequence[Mapping[str, Any]], config: ContactSheetConfig | None = None) -> ContactSheet:
    """A contact sheet of ``rows`` (dicts with ``key``, ``caption``, ``image``, ``phrases``)."""
    cfg = config or ContactSheetConfig()
    rows = list(rows)[: cfg.count]
    font = load_font(cfg.font_size)
    line_h = cfg.font_size + 4
    text_h = line_h * (1 + cfg.caption_lines)
    cols = max(1, min(cfg.columns, len(rows)))
    n_rows = max(1, -(-len(rows) // cols))
    cw, ch = cfg.cell + cfg.padding, cfg.cell + text_h + cfg.padding
    sheet = Image.new("RGB", (cols * cw + cfg.padding, n_rows * ch + cfg.padding), cfg.background)
    draw = ImageDraw.Draw(sheet)
    chars = max(8, int(cfg.cell / (0.55 * cfg.font_size)))
    result = ContactSheet(sheet, [str(r["key"]) for r in rows])
    for i, row in enumerate(rows):
        x, y = cfg.padding + (i % cols) * cw, cfg.padding + (i // cols) * ch
        img, err = try_decode_image(row["image"])
        if img is None:
            draw.rectangle([x, y, x + cfg.cell - 1, y + cfg.cell - 1], fill=(200, 200, 200))
            for j, line in enumerate(textwrap.wrap(f"undecodable image: {err}", chars)[:6]):
                draw.text((x + 6, y + 6 + j * line_h), line, fill=BLACK, font=font)
            result.errors[str(row["key"])] = err
        else:
            thumb = _thumbnail(img, cfg.cell)
            result.labels[str(row["key"])] = draw_boxes(thumb, row["phrases"], font_size=cfg.font_size,
                                                        line_width=cfg.line_width, show_scores=cfg.show_scores,
                                                        min_score=cfg.min_score, max_label_chars=cfg.max_label_chars)
            sheet.paste(thumb, (x, y))
        draw.text((x, y + cfg.cell + 2), f"{row['key']}  ({len(row['phrases'])} phrases, {row.get('num_boxes', '?')} boxes)", fill=BLACK, font=font)
        for j, line in enumerate(textwrap.wrap(str(row.get("caption") or ""), chars)[: cfg.caption_lines]):
            draw.text((x, y + cfg.cell + 2 + (j + 1) * line_h), line, fill=(60, 60, 60), font=font)
    return result


def sample_keys(con, *, where: str | None = None, sql: str | None = None, count: int = 16, seed: int = 0) -> list[str]:
    """Keys to show: the first ``count`` of ``sql`` (a query with a ``key`` column), or a random
    sample (``md5(key || ':' || seed)`` order) of the shards passing ``where``. Metadata only."""
    if sql is not None and where is not None:
        raise ValueError("give where or sql, not both")
    if sql is not None:
        rel = con.sql(sql)
        if rel is None or "key" not in rel.columns:
            raise ValueError(f"the query must return a `key` column, got {None if rel is None else rel.columns}")
        return [r[0] for r in rel.select("key").limit(count).fetchall()]
    cond = f"({where})" if where else "true"
    return [r[0] for r in con.sql(f"SELECT key FROM shards WHERE {cond} ORDER BY md5(key || ':' || $seed), key "
                                  f"LIMIT $n", params={"seed": str(seed), "n": count}).fetchall()]


def fetch_rows(con, keys: Sequence[str]) -> list[dict[str, Any]]:
    """The rows (with image bytes) of ``keys``, in the order of ``keys``."""
    if not keys:
        return []
    got = con.sql("SELECT key, caption, width, height, num_boxes, image, phrases FROM shards WHERE key IN (SELECT unnest($keys))",
                  params={"keys": list(keys)}).to_arrow_table().to_pylist()
    by_key: dict[str, dict] = {}
    for r in got:
        by_key.setdefault(r["key"], r)
    return [by_key[k] for k in keys if k in by_key]


def render_contact_sheet(con, *, where: str | None = None, sql: str | None = None, seed: int = 0,
                         config: ContactSheetConfig | None = None) -> ContactSheet:
    """A contact sheet of ``config.count`` images chosen by ``where`` (random under ``seed``) or ``sql``."""
    cfg = config or ContactSheetConfig()
    keys = sample_keys(con, where=where, sql=sql, count=cfg.count, seed=seed)
    return render_rows(fetch_rows(con, keys), cfg)
