"""A synthetic world: LAION-like rows whose images contain objects of known class, colour and box.

Used by the tests, by the README's bundled sample (``build_grounding.py --sample``) and by the
training proof. Everything is deterministic under a seed.

- :func:`make_world` draws images (PIL) with 2-4 coloured objects ("a red ball", "a blue box"),
  a caption that names them, and the true pixel boxes with the phrase spans in the caption.
- :func:`write_world` writes the images, a LAION-style Parquet (``URL``, ``TEXT``, ``WIDTH``,
  ``HEIGHT``, ``punsafe``, ``pwatermark``, ``similarity``), COCO instances JSON and RefCOCO-style
  refs JSON (the annotation detector backend reads those).
- :class:`WorldServer` serves a folder over HTTP on 127.0.0.1, with broken routes mixed in:
  ``/missing/...`` (404), ``/slow/...`` (answers after a delay: a timeout), ``/corrupt/...``
  (bytes that are not an image, served as image/jpeg), ``/notimage/...`` (an HTML page).
"""
from __future__ import annotations

import functools
import http.server
import io
import json
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220),
    "yellow": (240, 220, 20), "purple": (140, 40, 170), "orange": (250, 140, 20),
}
SHAPES = ("ball", "box", "kite", "cone")  # circle, square, diamond, triangle
BACKGROUNDS = {"white": (245, 245, 245), "grey": (170, 170, 170), "beige": (225, 210, 180), "black": (25, 25, 25)}
CATEGORY_IDS = {name: i + 1 for i, name in enumerate(SHAPES)}

WORLD_CAPTION_PATTERNS = (   # the alt-text the synthetic world writes (QA templates: grounding.boxes)
    "{objs} on a {bg} background",
    "Photo of {objs}",
    "{objs}. Stock photo",
    "A picture showing {objs} on a {bg} table",
    "{objs} in a studio",
)


@dataclass
class WorldObject:
    shape: str
    colour: str
    box: tuple[int, int, int, int]  # pixel xyxy, exclusive of nothing: the drawn extent
    start: int = 0                  # span of the phrase ("a red ball") in the caption
    end: int = 0

    @property
    def phrase(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def named(self) -> str:
        """How the caption names it: "a red ball", "an orange box"."""
        return f"{'an' if self.colour[0] in 'aeiou' else 'a'} {self.phrase}"


@dataclass
class WorldImage:
    key: str
    width: int
    height: int
    background: str
    caption: str
    objects: list[WorldObject] = field(default_factory=list)

    def render(self) -> Image.Image:
        img = Image.new("RGB", (self.width, self.height), BACKGROUNDS[self.background])
        d = ImageDraw.Draw(img)
        for o in self.objects:
            x0, y0, x1, y1 = o.box
            c = COLOURS[o.colour]
            if o.shape == "ball":
                d.ellipse([x0, y0, x1 - 1, y1 - 1], fill=c)
            elif o.shape == "box":
                d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=c)
            elif o.shape == "kite":
                cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                d.polygon([(cx, y0), (x1 - 1, cy), (cx, y1 - 1), (x0, cy)], fill=c)
            else:  # cone
                d.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=c)
        return img

    def jpeg(self, quality: int = 95) -> bytes:
        buf = io.BytesIO()
        self.render().save(buf, format="JPEG", quality=quality)
        return buf.getvalue()


def _overlap(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return ix * iy / small


def make_image(rng: random.Random, key: str, size: tuple[int, int] | None = None,
               min_objects: int = 2, max_objects: int = 4) -> WorldImage:
    """One image: objects of distinct (colour, shape), little overlap, caption naming them."""
    if size is None:
        w = rng.choice((160, 192, 224, 256, 320))
        h = rng.choice((160, 192, 224, 256))
    else:
        w, h = size
    bg = rng.choice(list(BACKGROUNDS))
    n = rng.randint(min_objects, max_objects)
    kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n)
    objects: list[WorldObject] = []
    for colour, shape in kinds:
        for _ in range(100):
            side = rng.randint(max(8, int(0.18 * min(w, h))), int(0.45 * min(w, h)))
            bw = side if shape in ("ball", "box") else int(side * rng.uniform(0.7, 1.0))
            x0, y0 = rng.randint(0, w - bw), rng.randint(0, h - side)
            box = (x0, y0, x0 + bw, y0 + side)
            if all(_overlap(box, o.box) < 0.1 for o in objects):
                objects.append(WorldObject(shape, colour, box))
                break
    # The caption names every object: "a red ball, a blue box and a green kite".
    names = [o.named for o in objects]
    objs = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    template = rng.choice(WORLD_CAPTION_PATTERNS)
    caption = template.format(objs=objs, bg=bg)
    caption = caption[0].upper() + caption[1:]
    pos = 0
    for o in objects:
        i = caption.lower().index(o.named, pos)
        o.start, o.end = i, i + len(o.named)
        pos = o.end
    return WorldImage(key, w, h, bg, caption, objects)


def make_world(n: int, seed: int = 0, size: tuple[int, int] | None = None,
               min_objects: int = 2, max_objects: int = 4) -> list[WorldImage]:
    rng = random.Random(seed)
    return [make_image(rng, f"{seed:03d}{i:06d}", size, min_objects, max_objects) for i in range(n)]


# --- files ---------------------------------------------------------------------------------

def coco_json(world: list[WorldImage]) -> dict:
    """COCO instances (``bbox`` is ``[x, y, w, h]``) with each image's ``key`` kept on it."""
    images, anns = [], []
    for i, im in enumerate(world, start=1):
        images.append({"id": i, "file_name": f"{im.key}.jpg", "width": im.width, "height": im.height, "key": im.key})
        for o in im.objects:
            x0, y0, x1, y1 = o.box
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": CATEGORY_IDS[o.shape],
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
                         "colour": o.colour})
    cats = [{"id": cid, "name": name} for name, cid in CATEGORY_IDS.items()]
    return {"images": images, "annotations": anns, "categories": cats}


def refs_json(world: list[WorldImage], coco: dict, val_fraction: float = 0.0) -> list[dict]:
    """RefCOCO-style refs: one per object, its sentence the object's phrase ("red ball")."""
    refs, ann_iter = [], iter(coco["annotations"])
    n_val = int(round(len(world) * val_fraction))
    for i, im in enumerate(world, start=1):
        split = "val" if i > len(world) - n_val else "train"
        for o in im.objects:
            ann = next(ann_iter)
            refs.append({"ref_id": len(refs), "image_id": i, "ann_id": ann["id"], "category_id": ann["category_id"],
                         "split": split, "file_name": f"{im.key}.jpg",
                         "sentences": [{"sent": o.phrase, "raw": f"the {o.phrase}"}]})
    return refs


@dataclass
class WorldFiles:
    root: Path
    images: Path
    parquet: Path
    coco: Path
    refs: Path
    broken_keys: dict[str, str]  # key -> expected failure ("missing", "slow", "corrupt", "notimage")


def write_world(root: str | os.PathLike, world: list[WorldImage], base_url: str = "http://127.0.0.1:0",
                broken: dict[str, int] | None = None, val_fraction: float = 0.0,
                parquet_name: str = "laion.parquet") -> WorldFiles:
    """Write images, LAION Parquet, COCO and refs JSON under ``root``.

    ``broken`` adds rows whose URL fails: ``{"missing": 2, "corrupt": 1, "notimage": 1, "slow": 1}``.
    The URLs point at ``base_url`` (a :class:`WorldServer`'s); write again with its real address.
    """
    root = Path(root)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for im in world:
        path = img_dir / f"{im.key}.jpg"
        if not path.exists():
            path.write_bytes(im.jpeg())
        rows.append({"key": im.key, "URL": f"{base_url}/images/{im.key}.jpg", "TEXT": im.caption,
                     "WIDTH": im.width, "HEIGHT": im.height, "punsafe": 0.01, "pwatermark": 0.05,
                     "similarity": 0.33})
    broken_keys = {}
    for kind, count in (broken or {}).items():
        if kind not in ("missing", "slow", "corrupt", "notimage"):
            raise ValueError(f"unknown broken-URL kind {kind!r}")
        for j in range(count):
            key = f"broken_{kind}_{j}"
            ext = "html" if kind == "notimage" else "jpg"
            broken_keys[key] = kind
            rows.append({"key": key, "URL": f"{base_url}/{kind}/{key}.{ext}", "TEXT": f"A red ball and a blue box ({kind})",
                         "WIDTH": 200, "HEIGHT": 200, "punsafe": 0.01, "pwatermark": 0.05, "similarity": 0.3})
    parquet = root / parquet_name
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    coco = coco_json(world)
    (root / "coco.json").write_text(json.dumps(coco))
    (root / "refs.json").write_text(json.dumps(refs_json(world, coco, val_fraction)))
    return WorldFiles(root, img_dir, parquet, root / "coco.json", root / "refs.json", broken_keys)


# --- HTTP server -----------------------------------------------------------------------------

class _Handler(http.server.SimpleHTTPRequestHandler):
    slow_seconds = 5.0

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        route = self.path.lstrip("/").split("/", 1)[0]
        if route == "missing":
            self.send_error(404, "Not Found")
        elif route == "slow":
            time.sleep(self.slow_seconds)
            self._send(b"\xff\xd8 too late", "image/jpeg")
        elif route == "corrupt":
            self._send(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10, "image/jpeg")
        elif route == "notimage":
            self._send(b"<html><body>an HTML page, not an image</body></html>", "text/html")
        else:
            super().do_GET()

    def _send(self, body: bytes, ctype: str):
        try:
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass


class WorldServer:
    """Serve ``root`` on 127.0.0.1 (a free port) in a thread; ``with WorldServer(dir) as s: s.base_url``."""

    def __init__(self, root: str | os.PathLike, slow_seconds: float = 5.0):
        handler = type("Handler", (_Handler,), {"slow_seconds": slow_seconds})
        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "WorldServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def __enter__(self) -> "WorldServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- ground-truth shards ---------------------------------------------------------------------

def truth_rows(world: list[WorldImage], min_boxes: int = 1) -> list[dict]:
    """Grounding-shard rows with the world's true boxes (score 1.0): data a test knows exactly."""
    from grounding.boxes import normalize_box
    from grounding.records import build_record

    rows = []
    for i, im in enumerate(world):
        phrases = [{"text": im.caption[o.start:o.end], "start": o.start, "end": o.end, "head": o.shape,
                    "kind": "chunk", "prompt": o.phrase,
                    "boxes_norm": [list(normalize_box(o.box, im.width, im.height))], "det_scores": [1.0]}
                   for o in im.objects]
        row, _ = build_record(key=im.key, url=f"world://{im.key}.jpg", caption=im.caption, image=im.jpeg(),
                              width=im.width, height=im.height, phrases=phrases, min_boxes=min_boxes,
                              source_shard="world", source_row=i)
        if row is not None:
            rows.append(row)
    return rows


def write_truth_shards(world: list[WorldImage], out_dir: str | os.PathLike, rows_per_shard: int = 64) -> list[str]:
    """Write the world as grounding shards ``out_dir/NNNNN.parquet`` (true boxes); returns paths."""
    from grounding.schema import write_shard

    rows = truth_rows(world)
    paths = []
    for s in range(0, len(rows), rows_per_shard):
        path = os.path.join(str(out_dir), f"{s // rows_per_shard:05d}.parquet")
        paths.append(write_shard(rows[s:s + rows_per_shard], path,
                                 provenance={"detector": "world-truth", "source_shard": "world"}))
    return paths
