"""Drawing the synthetic trail-camera sample: individual deer (coat, size, antlers, marks), camera backgrounds, and frames with one or two deer and their boxes, night/IR included. Used by ``sample.write_sample``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

FRAME_W, FRAME_H = 640, 480
SCALE = 2                      # deer are drawn at 2x and downsampled (anti-aliasing)
CLASS_CYCLE = ("doe", "young_buck", "doe", "mature_buck", "fawn", "mid_buck", "doe", "young_buck",
               "doe", "mid_buck", "fawn", "mature_buck")
COATS = [  # distinct coat colours (RGB) seen on white-tailed deer and a few unusual ones
    (150, 98, 58), (118, 96, 80), (170, 120, 70), (95, 70, 50), (160, 140, 110), (130, 80, 45),
    (105, 100, 95), (185, 135, 85), (80, 58, 44), (145, 115, 95), (175, 100, 55), (120, 110, 70),
]
MARK_COLOURS = [(245, 242, 235), (40, 32, 28), (230, 225, 210), (60, 45, 35)]
COLLAR_COLOURS = [(240, 120, 20), (250, 215, 30), (40, 90, 220), (220, 40, 60), (30, 170, 90),
                  (240, 240, 240)]
TEXTURES = ("brindle", "speckled", "mottled", "dappled", "ticked", "banded")


@dataclass(frozen=True)
class Deer:
    identity: str
    classification: str
    size: float
    coat: tuple
    saddle: float                      # darkness of the back (0..0.5)
    marks: tuple                       # ((cx, cy, rx, ry, colour), ...) body-relative
    spots: tuple                       # fawn spots ((cx, cy, r), ...)
    collar: tuple | None               # collar colour or None
    ear_tag: tuple | None
    antler_points: int                 # per side, 0 for does and fawns
    antler_spread: float
    antler_height: float
    face_blaze: bool
    leg_socks: bool
    texture: tuple = ("smooth", 0, 1.0, 0.0, 0.0)   # (kind, seed, period, angle, contrast)


def make_deer(n_deer: int, rng: np.random.Generator) -> list[Deer]:
    herd = []
    # deer i and i+6 share a coat pattern kind; one of them gets a dark coat, the other a pale one
    by_light = sorted(COATS, key=lambda c: 0.3 * c[0] + 0.59 * c[1] + 0.11 * c[2])
    half = len(by_light) // 2
    dark, pale = rng.permutation(half), rng.permutation(half)
    kinds = rng.permutation(len(TEXTURES))
    for i in range(n_deer):
        cls = CLASS_CYCLE[i % len(CLASS_CYCLE)]
        base_size = {"fawn": 0.62, "doe": 0.85, "young_buck": 0.86, "mid_buck": 0.95, "mature_buck": 1.05}[cls]
        block = (i // half) % 2
        coat = np.array(by_light[dark[i % half]] if block == 0 else by_light[half + pale[i % half]], float)
        if i >= len(COATS):
            coat = np.clip(coat + rng.normal(0, 18, 3), 30, 220)
        n_marks = int(rng.integers(3, 6))
        marks = []
        for _ in range(n_marks):
            colour = MARK_COLOURS[int(rng.integers(0, len(MARK_COLOURS)))]
            marks.append((float(rng.uniform(-0.75, 0.75)), float(rng.uniform(-0.55, 0.45)),
                          float(rng.uniform(0.16, 0.38)), float(rng.uniform(0.2, 0.42)), colour))
        spots = ()
        if cls == "fawn":
            spots = tuple((float(rng.uniform(-0.85, 0.8)), float(rng.uniform(-0.7, 0.3)),
                           float(rng.uniform(0.035, 0.07))) for _ in range(int(rng.integers(14, 26))))
        collar = COLLAR_COLOURS[int(rng.integers(0, len(COLLAR_COLOURS)))] if rng.random() < 0.5 else None
        ear_tag = COLLAR_COLOURS[int(rng.integers(0, len(COLLAR_COLOURS)))] if rng.random() < 0.35 else None
        points = {"young_buck": int(rng.integers(1, 3)), "mid_buck": int(rng.integers(3, 5)),
                  "mature_buck": int(rng.integers(4, 6))}.get(cls, 0)
        herd.append(Deer(
            identity=f"deer-{i + 1:02d}", classification=cls,
            size=base_size * float(rng.uniform(0.94, 1.06)), coat=tuple(int(round(c)) for c in coat),
            saddle=float(rng.uniform(0.0, 0.45)), marks=tuple(marks), spots=spots,
            collar=collar, ear_tag=ear_tag, antler_points=points,
            antler_spread=float(rng.uniform(0.7, 1.3)),
            antler_height=float(rng.uniform(0.8, 1.25)) * (1.25 if cls == "mature_buck" else 1.0),
            face_blaze=bool(rng.random() < 0.4), leg_socks=bool(rng.random() < 0.35),
            texture=(TEXTURES[kinds[i % len(TEXTURES)]], int(rng.integers(0, 2**31)),
                     float(rng.uniform(10, 26)), float(rng.uniform(0, math.pi)), float(rng.uniform(0.2, 0.34))),
        ))
    return herd


@lru_cache(maxsize=64)
def coat_texture(texture: tuple, width: int, height: int) -> np.ndarray:
    """The individual's coat pattern: a fixed multiplicative field in [1-c, 1+c] over the
    drawing canvas (so it moves, scales and flips with the deer)."""
    kind, seed, period, angle, contrast = texture
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    period = period * SCALE
    if kind == "brindle":
        u = xx * math.cos(angle) + yy * math.sin(angle)
        wobble = np.sin(yy / (period * 2.3) + rng.uniform(0, 6)) * period * 0.6
        field = np.sign(np.sin(2 * math.pi * (u + wobble) / period))
    elif kind == "banded":
        u = xx * math.cos(angle) + yy * math.sin(angle)
        field = np.sin(2 * math.pi * u / (period * 2.5))
    else:
        n = {"speckled": 900, "dappled": 160, "ticked": 2500, "mottled": 60}[kind]
        r = {"speckled": 0.18, "dappled": 0.45, "ticked": 0.08, "mottled": 1.1}[kind] * period
        img = Image.new("L", (width, height), 128)
        d = ImageDraw.Draw(img)
        for _ in range(n):
            x, y = rng.uniform(0, width), rng.uniform(0, height)
            rr = r * rng.uniform(0.6, 1.4)
            d.ellipse([x - rr, y - rr * 0.8, x + rr, y + rr * 0.8], fill=int(255 if rng.random() < 0.5 else 0))
        field = (np.asarray(img.filter(ImageFilter.GaussianBlur(max(1.0, r * 0.15)))).astype(np.float32) - 128) / 128
    return (1.0 + contrast * np.clip(field, -1, 1)).astype(np.float32)


def _shade(colour, f):
    return tuple(int(max(0, min(255, c * f))) for c in colour)


def render_deer(deer: Deer, rng: np.random.Generator, head_down: bool, leg_phase: float,
                tail_up: bool, night: bool) -> Image.Image:
    """The deer, facing right, on a transparent RGBA canvas (2x resolution, uncropped)."""
    S = SCALE
    W, H = 340 * S, 280 * S
    img = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    coat = deer.coat
    dark = _shade(coat, 0.62)
    belly = _shade((236, 228, 214), 1.0)
    bx, by, brx, bry = 160 * S, 128 * S, 90 * S, 48 * S          # body ellipse

    # legs (behind the body), with hooves
    leg_top = by + bry * 0.55
    ground = 262 * S
    for k, lx in enumerate((bx - 62 * S, bx - 42 * S, bx + 48 * S, bx + 66 * S)):
        swing = math.sin(leg_phase + k * math.pi / 2) * 12 * S
        far = k in (1, 2)
        col = _shade(coat, 0.78 if far else 0.95)
        knee = (lx + swing * 0.4, leg_top + (ground - leg_top) * 0.5)
        foot = (lx + swing, ground)
        d.line([(lx, leg_top), knee, foot], fill=col, width=int(14 * S), joint="curve")
        if deer.leg_socks:
            d.line([((knee[0] + foot[0]) / 2, (knee[1] + foot[1]) / 2), foot], fill=(240, 236, 228), width=int(10 * S))
        d.ellipse([foot[0] - 7 * S, foot[1] - 5 * S, foot[0] + 7 * S, foot[1] + 4 * S], fill=(30, 26, 24))

    # tail: brown on top, white flag when raised
    tx, ty = bx - brx + 6 * S, by - bry * 0.45
    if tail_up:
        d.polygon([(tx, ty), (tx - 30 * S, ty - 38 * S), (tx - 14 * S, ty - 44 * S), (tx + 8 * S, ty - 6 * S)], fill=(248, 246, 242))
    else:
        d.polygon([(tx, ty), (tx - 16 * S, ty + 30 * S), (tx - 4 * S, ty + 34 * S), (tx + 8 * S, ty + 4 * S)], fill=dark)

    # body, darker saddle on the back, pale belly
    d.ellipse([bx - brx, by - bry, bx + brx, by + bry], fill=coat)
    if deer.saddle > 0.02:
        d.ellipse([bx - brx * 0.85, by - bry, bx + brx * 0.8, by - bry * 0.15], fill=_shade(coat, 1 - deer.saddle))
    d.ellipse([bx - brx * 0.7, by + bry * 0.25, bx + brx * 0.65, by + bry * 1.0], fill=belly)
    d.ellipse([bx - brx * 1.0, by - bry * 0.6, bx - brx * 0.62, by + bry * 0.4], fill=(240, 236, 226))  # rump patch
    # individual marks and fawn spots, clipped to the body
    mask = Image.new("L", (W, H), 0)
    ImageDraw.Draw(mask).ellipse([bx - brx, by - bry, bx + brx, by + bry], fill=255)
    marks = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    md = ImageDraw.Draw(marks)
    for cx, cy, rx, ry, colour in deer.marks:
        md.ellipse([bx + cx * brx - rx * brx, by + cy * bry - ry * bry * 2,
                    bx + cx * brx + rx * brx, by + cy * bry + ry * bry * 2], fill=colour + (255,))
    for cx, cy, r in deer.spots:
        md.ellipse([bx + cx * brx - r * brx, by + cy * bry - r * brx, bx + cx * brx + r * brx, by + cy * bry + r * brx],
                   fill=(250, 246, 236, 255))
    alpha = Image.fromarray(np.minimum(np.asarray(marks)[..., 3], np.asarray(mask)))
    marks.putalpha(alpha)
    img.alpha_composite(marks)

    # neck and head
    if head_down:          # browsing: head low and forward
        hx, hy, angle = bx + brx * 1.2, by + 10 * S, 45
    else:
        hx, hy, angle = bx + brx * 1.05, by - 80 * S, -10
    nx0, ny0 = bx + brx * 0.55, by - bry * 0.55
    nx1, ny1 = bx + brx * 0.85, by + bry * 0.2
    d.polygon([(nx0, ny0), (hx - 10 * S, hy - 12 * S), (hx + 12 * S, hy + 10 * S), (nx1, ny1)], fill=coat)
    # throat patch
    d.ellipse([hx - 6 * S, hy + 8 * S, hx + 16 * S, hy + 26 * S] if not head_down else
              [hx - 22 * S, hy - 30 * S, hx - 4 * S, hy - 12 * S], fill=(244, 240, 232))
    if deer.collar:
        t = 0.45
        cxm, cym = nx0 + (hx - nx0) * t, ny0 + (hy - ny0) * t
        d.line([(cxm - 20 * S, cym - 6 * S), (cxm + 20 * S, cym + 10 * S)], fill=deer.collar, width=int(13 * S))
    ang = math.radians(angle)
    snout = (hx + math.cos(ang) * 38 * S, hy + math.sin(ang) * 38 * S)
    d.ellipse([hx - 22 * S, hy - 16 * S, hx + 22 * S, hy + 16 * S], fill=coat)
    d.line([(hx, hy), snout], fill=coat, width=int(22 * S))
    d.ellipse([snout[0] - 9 * S, snout[1] - 8 * S, snout[0] + 9 * S, snout[1] + 8 * S], fill=(35, 30, 28))
    if deer.face_blaze:
        mid = ((hx + snout[0]) / 2, (hy + snout[1]) / 2)
        d.ellipse([mid[0] - 8 * S, mid[1] - 9 * S, mid[0] + 8 * S, mid[1] + 5 * S], fill=(240, 236, 230))
    eye = (hx + 6 * S, hy - 5 * S)
    eye_col = (250, 250, 250) if night else (20, 16, 14)
    d.ellipse([eye[0] - 4 * S, eye[1] - 4 * S, eye[0] + 4 * S, eye[1] + 4 * S], fill=eye_col)
    # ears
    for off in (-14, 2):
        ex, ey = hx + off * S - 6 * S, hy - 14 * S
        d.polygon([(ex, ey), (ex - 16 * S, ey - 30 * S), (ex + 4 * S, ey - 26 * S), (ex + 12 * S, ey)], fill=_shade(coat, 0.9))
        d.polygon([(ex + 0 * S, ey - 4 * S), (ex - 9 * S, ey - 22 * S), (ex + 3 * S, ey - 20 * S)], fill=(225, 205, 190))
    if deer.ear_tag:
        ex, ey = hx + 2 * S - 6 * S, hy - 14 * S
        d.rectangle([ex - 8 * S, ey - 16 * S, ex + 2 * S, ey - 6 * S], fill=deer.ear_tag)
    # antlers: a main beam curving forward with tines rising from it
    if deer.antler_points:
        antler = (214, 198, 168)
        for side, shift in ((0, -6), (1, 4)):
            base = (hx + shift * S - 4 * S, hy - 16 * S)
            beam = []
            length = 70 * S * deer.antler_height
            for t in np.linspace(0, 1, 9):
                bxp = base[0] - 18 * S * deer.antler_spread * math.sin(t * math.pi * 0.9) + t * 46 * S * deer.antler_spread
                byp = base[1] - length * (0.8 * t - 0.25 * t * t)
                beam.append((bxp, byp))
            col = antler if side == 0 else _shade(antler, 0.85)
            d.line(beam, fill=col, width=int(6 * S), joint="curve")
            for p in range(deer.antler_points - 1):
                t = 0.3 + 0.65 * p / max(1, deer.antler_points - 1)
                px, py = beam[int(t * 8)]
                tine = 26 * S * deer.antler_height * (1.1 - 0.3 * p / max(1, deer.antler_points))
                d.line([(px, py), (px + 4 * S, py - tine)], fill=col, width=int(5 * S))
    arr = np.asarray(img).astype(np.float32)
    arr[..., :3] = np.clip(arr[..., :3] * coat_texture(deer.texture, W, H)[..., None], 0, 255)
    return Image.fromarray(arr.astype(np.uint8), "RGBA")


def camera_background(index: int, seed: int) -> tuple[np.ndarray, int]:
    """A fixed scene for one camera: sky/canopy, tree trunks, ground with leaf litter or grass."""
    rng = np.random.default_rng(seed * 1000 + index)
    palettes = [
        ((78, 96, 64), (100, 90, 62), (60, 48, 38)),      # conifer edge
        ((92, 106, 74), (108, 94, 66), (70, 56, 44)),     # creek bottom
        ((100, 110, 86), (116, 102, 74), (78, 64, 50)),   # ridge
        ((110, 120, 90), (124, 112, 80), (84, 72, 56)),   # field edge
    ]
    canopy, ground, trunk = (np.array(c, float) for c in palettes[index % len(palettes)])
    canopy = canopy + rng.normal(0, 8, 3)
    ground = ground + rng.normal(0, 8, 3)
    arr = np.zeros((FRAME_H, FRAME_W, 3), float)
    horizon = int(rng.uniform(0.38, 0.5) * FRAME_H)
    ys = np.arange(FRAME_H)[:, None]
    t = np.clip((ys - horizon) / (FRAME_H - horizon), 0, 1)
    for c in range(3):
        arr[..., c] = np.where(ys < horizon, canopy[c] * (0.85 + 0.3 * ys / max(1, horizon)), ground[c] * (0.8 + 0.35 * t))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(5, 10))):          # trunks
        x = float(rng.uniform(-20, FRAME_W))
        w = float(rng.uniform(10, 45))
        top = float(rng.uniform(-50, horizon * 0.3))
        bottom = horizon + float(rng.uniform(5, 60))
        col = tuple(int(c) for c in np.clip(trunk * rng.uniform(0.7, 1.3), 0, 255))
        d.polygon([(x, top), (x + w, top), (x + w * 1.15, bottom), (x - w * 0.15, bottom)], fill=col)
    for _ in range(400):                                 # leaf litter / grass tufts
        x, y = float(rng.uniform(0, FRAME_W)), float(rng.uniform(horizon, FRAME_H))
        r = float(rng.uniform(1, 5)) * (0.5 + (y - horizon) / (FRAME_H - horizon))
        col = tuple(int(c) for c in np.clip(ground * rng.uniform(0.6, 1.35), 0, 255))
        d.ellipse([x - r, y - r * 0.6, x + r, y + r * 0.6], fill=col)
    for _ in range(250):                                 # foliage blobs
        x, y = float(rng.uniform(0, FRAME_W)), float(rng.uniform(0, horizon))
        r = float(rng.uniform(3, 14))
        col = tuple(int(c) for c in np.clip(canopy * rng.uniform(0.65, 1.3), 0, 255))
        d.ellipse([x - r, y - r, x + r, y + r], fill=col)
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    return np.asarray(img, dtype=np.float32), horizon


@dataclass
class _Placement:
    deer: Deer
    x: float            # centre x of the deer in the frame
    ground_y: float     # y of the hooves
    scale: float        # frame pixels per drawing unit
    facing_right: bool
    head_down: bool
    tail_up: bool
    leg_phase: float


def compose_frame(background: np.ndarray, placements: list[_Placement], rng: np.random.Generator,
                  night: bool, light: float) -> tuple[Image.Image, list[tuple[float, float, float, float]]]:
    """Paste deer (far ones first) on the camera's background; returns the frame and each deer's
    tight box (pixels, x, y, w, h) in the order of ``placements``."""
    frame = Image.fromarray(np.clip(background * light + 3.0 * rng.standard_normal(background.shape, dtype=np.float32), 0, 255).astype(np.uint8))
    frame = frame.convert("RGBA")
    boxes: list = [None] * len(placements)
    order = sorted(range(len(placements)), key=lambda i: placements[i].ground_y)
    for i in order:
        p = placements[i]
        layer = render_deer(p.deer, rng, p.head_down, p.leg_phase, p.tail_up, night)
        if not p.facing_right:
            layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        w = max(1, int(layer.width / SCALE * p.scale))
        h = max(1, int(layer.height / SCALE * p.scale))
        layer = layer.resize((w, h), Image.Resampling.LANCZOS)
        arr = np.asarray(layer).astype(np.float32)
        # per-sighting coat texture and light on the deer
        noise = 6.0 * rng.standard_normal(arr.shape[:2], dtype=np.float32)[..., None]
        arr[..., :3] = np.clip(arr[..., :3] * light + noise, 0, 255)
        layer = Image.fromarray(arr.astype(np.uint8), "RGBA")
        left = int(round(p.x - w / 2))
        top = int(round(p.ground_y - h * (262 / 280)))
        frame.alpha_composite(layer, (max(0, left), max(0, top)),
                              source=(max(0, -left), max(0, -top)))
        a = np.asarray(layer)[..., 3] > 40
        ys, xs = np.nonzero(a)
        x0 = max(0, left + int(xs.min()))
        y0 = max(0, top + int(ys.min()))
        x1 = min(FRAME_W, left + int(xs.max()) + 1)
        y1 = min(FRAME_H, top + int(ys.max()) + 1)
        boxes[i] = (float(x0), float(y0), float(x1 - x0), float(y1 - y0))
    out = frame.convert("RGB")
    if night:
        g = np.asarray(out.convert("L")).astype(np.float32)
        yy, xx = np.mgrid[0:FRAME_H, 0:FRAME_W]
        falloff = 1.25 - 0.55 * (((xx - FRAME_W / 2) / FRAME_W) ** 2 + ((yy - FRAME_H * 0.6) / FRAME_H) ** 2) * 2.2
        g = np.clip(g * falloff * 1.1 + 7.0 * rng.standard_normal(g.shape, dtype=np.float32), 0, 255).astype(np.uint8)
        out = Image.fromarray(g, "L").convert("RGB")
    return out, boxes
