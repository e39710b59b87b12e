"""Pillow drawings of the built-in catalog's products and the photo conditions of a listing.

A product is drawn once, as a cut-out on a transparent canvas at twice the output size
(:func:`draw_product`); :func:`photograph` then places that cut-out on a background under
one listing's conditions (scale, crop, rotation, lighting, blur, sensor noise, occlusion)
and :func:`encode_jpeg` compresses it. Every random choice comes from the generators the
caller passes in, so the same seeds give the same bytes.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

RGB = tuple[int, int, int]

# Canonical colour names (already in the form `normalize_value` produces) and their paint.
COLOURS: dict[str, RGB] = {
    "black": (28, 28, 30),
    "charcoal": (62, 64, 68),
    "gray": (132, 134, 136),
    "white": (238, 238, 232),
    "cream": (236, 224, 192),
    "beige": (208, 188, 150),
    "brown": (112, 72, 40),
    "navy": (30, 40, 82),
    "blue": (40, 92, 196),
    "light blue": (136, 184, 226),
    "teal": (20, 124, 124),
    "green": (44, 142, 64),
    "dark green": (26, 78, 44),
    "olive": (108, 110, 44),
    "mustard": (204, 160, 36),
    "yellow": (240, 204, 48),
    "orange": (232, 116, 32),
    "red": (200, 32, 38),
    "dark red": (118, 20, 30),
    "pink": (234, 150, 172),
    "purple": (106, 52, 138),
}

ShapeFn = Callable[[ImageDraw.ImageDraw, int], None]


@dataclass(frozen=True)
class Look:
    """What a drawing needs: a product's attribute values and its family's fixed style.

    ``shape`` holds three family proportions in [0, 1) so siblings share one silhouette;
    ``light_accent``/``dark_accent`` paint patterns and print on dark/light products.
    """

    values: Mapping[str, str]
    shape: tuple[float, float, float]
    light_accent: RGB
    dark_accent: RGB
    white_inside: bool = True
    label: tuple[str, ...] = ()  # lines of the printed pack label (brand, then e.g. the quantity)

    @property
    def colour(self) -> RGB:
        return COLOURS[self.values["colour"]]

    @property
    def accent(self) -> RGB:
        return self.light_accent if luminance(self.colour) < 0.55 else self.dark_accent

    @property
    def text(self) -> str | None:
        text = self.values.get("printed_text", "none")
        return None if text == "none" else text.upper()


def luminance(colour: RGB) -> float:
    r, g, b = colour
    return (0.299 * r + 0.587 * g + 0.114 * b) / 255.0


def _scaled(colour: RGB, factor: float) -> RGB:
    return tuple(max(0, min(255, round(c * factor))) for c in colour)  # type: ignore[return-value]


@lru_cache(maxsize=128)
def _font(pixels: int) -> ImageFont.FreeTypeFont:
    # Pillow's bundled font: no system font files, so every machine draws the same glyphs.
    return ImageFont.load_default(size=pixels)


class _Canvas:
    """An RGBA canvas addressed in unit coordinates (0..1 on both axes)."""

    def __init__(self, size: int):
        self.size = size
        self.image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        self.draw = ImageDraw.Draw(self.image)

    def pts(self, points) -> list[tuple[float, float]]:
        return [(x * self.size, y * self.size) for x, y in points]

    def box(self, x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        return (x0 * self.size, y0 * self.size, x1 * self.size, y1 * self.size)

    def px(self, width: float) -> int:
        return max(1, round(width * self.size))

    def region(self, shape: ShapeFn, colour: RGB, pattern: str = "solid", accent: RGB = (255, 255, 255),
               vertical: bool = False) -> None:
        """Paint ``colour`` (and a stripes/dots ``pattern``) inside the area ``shape`` draws."""
        mask = Image.new("L", self.image.size, 0)
        shape(ImageDraw.Draw(mask), 255)
        paint = Image.new("RGB", self.image.size, colour)
        if pattern in ("stripes", "dots"):
            _pattern(ImageDraw.Draw(paint), self.size, pattern, accent, vertical)
        self.image.paste(paint, (0, 0), mask)

    def text(self, text: str, centre: tuple[float, float], max_width: float, max_height: float, colour: RGB,
             outline: RGB) -> None:
        """Print ``text`` as large as fits; the ``outline`` keeps it readable on stripes and dots."""
        pixels = max(6, round(max_height * self.size))
        while pixels > 6:
            left, top, right, bottom = self.draw.textbbox((0, 0), text, font=_font(pixels))
            if right - left <= max_width * self.size:
                break
            pixels = round(pixels * 0.9)
        x, y = centre
        self.draw.text((x * self.size, y * self.size), text, font=_font(pixels), fill=colour, anchor="mm",
                       stroke_width=max(1, pixels // 12), stroke_fill=outline)

    def shade(self, x0: float, x1: float, depth: float, highlight: float = 0.5) -> None:
        """Darken towards the sides of [x0, x1] like light on a rounded surface."""
        t = (np.arange(self.size, dtype=np.float32) / self.size - x0) / max(x1 - x0, 1e-6)
        profile = np.clip(1.06 - depth * (t - highlight) ** 2 * 4.0, 0.55, 1.12)
        rows = 1.03 - 0.08 * np.arange(self.size, dtype=np.float32) / self.size
        factor = rows[:, None] * profile[None, :]
        pixels = np.asarray(self.image).astype(np.float32)
        pixels[..., :3] *= factor[..., None]
        self.image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGBA")
        self.draw = ImageDraw.Draw(self.image)


def _pattern(draw: ImageDraw.ImageDraw, size: int, pattern: str, accent: RGB, vertical: bool) -> None:
    period = 0.07 * size
    if pattern == "stripes":
        for k in range(int(size / period) + 2):
            a, b = k * period, k * period + 0.42 * period
            draw.rectangle((a, 0, b, size) if vertical else (0, a, size, b), fill=accent)
        return
    radius = 0.016 * size
    for row in range(int(size / period) + 2):
        offset = period / 2 if row % 2 else 0.0
        for col in range(int(size / period) + 2):
            x, y = col * period + offset, row * period
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=accent)


def draw_top(look: Look, size: int) -> Image.Image:
    """A flat-lay t-shirt: neckline, sleeve length, pattern and chest print are visible."""
    c = _Canvas(size)
    v, (p0, p1, _) = look.values, look.shape
    body, hem = 0.24 + 0.04 * p0, 0.90 + 0.04 * p1
    neck = 0.17 if v["neckline"] == "boat-neck" else 0.095
    armpit = 0.35
    if v["sleeve"] == "long":
        sleeve = [(0.5 - body - 0.16, 0.82), (0.5 - body - 0.06, 0.84)]
    else:
        sleeve = [(0.5 - body - 0.19, 0.36), (0.5 - body - 0.10, 0.44)]
    left = [(0.5 - neck, 0.12), (0.5 - body - 0.07, 0.19), *sleeve, (0.5 - body, armpit), (0.5 - body - 0.01, hem)]
    outline = left + [(1.0 - x, y) for x, y in reversed(left)]
    c.region(lambda d, f: d.polygon(c.pts(outline), fill=f), look.colour, v["pattern"], look.accent)
    trim, inside = _scaled(look.colour, 0.82), _scaled(look.colour, 0.5)
    c.draw.polygon(c.pts(outline), outline=_scaled(look.colour, 0.65), width=c.px(0.006))
    for a, b in (sleeve, [(1.0 - x, y) for x, y in sleeve]):
        c.draw.line(c.pts([a, b]), fill=trim, width=c.px(0.012))
    c.draw.line(c.pts([(0.5 - body, hem - 0.015), (0.5 + body, hem - 0.015)]), fill=trim, width=c.px(0.006))
    if v["neckline"] == "v-neck":
        c.draw.ellipse(c.box(0.5 - neck, 0.095, 0.5 + neck, 0.145), fill=inside)
        vee = [(0.5 - neck, 0.12), (0.5, 0.30), (0.5 + neck, 0.12)]
        c.draw.polygon(c.pts(vee), fill=inside)
        c.draw.line(c.pts(vee), fill=trim, width=c.px(0.02), joint="curve")
    elif v["neckline"] == "boat-neck":
        c.draw.ellipse(c.box(0.5 - neck, 0.10, 0.5 + neck, 0.165), fill=inside, outline=trim, width=c.px(0.016))
    else:
        c.draw.ellipse(c.box(0.5 - neck, 0.095, 0.5 + neck, 0.205), fill=inside, outline=trim, width=c.px(0.02))
    if look.text:
        c.text(look.text, (0.5, 0.47), 1.3 * body, 0.11, look.accent, look.colour)
    c.shade(0.5 - body - 0.2, 0.5 + body + 0.2, depth=0.12)
    return c.image


def draw_bag(look: Look, size: int) -> Image.Image:
    """A tote bag: handle shape, pattern and front print are visible."""
    c = _Canvas(size)
    v, (p0, p1, p2) = look.values, look.shape
    half, top, bottom, taper = 0.27 + 0.05 * p0, 0.38 + 0.05 * p1, 0.93, 0.02 + 0.03 * p2
    strap = _scaled(look.colour, 0.78)
    handle_width = c.px(0.032)
    if v["handle"] == "round":
        for dx, shade in ((0.025, 0.6), (0.0, 1.0)):
            c.draw.arc(c.box(0.35 + dx, top - 0.28, 0.65 + dx, top + 0.28), 180, 360,
                       fill=_scaled(strap, shade), width=handle_width)
    elif v["handle"] == "square":
        for dx, shade in ((0.025, 0.6), (0.0, 1.0)):
            x0, x1, y0 = 0.36 + dx, 0.64 + dx, top - 0.24
            for rect in ((x0 - 0.016, y0, x0 + 0.016, top + 0.01), (x1 - 0.016, y0, x1 + 0.016, top + 0.01),
                         (x0 - 0.016, y0, x1 + 0.016, y0 + 0.032)):
                c.draw.rectangle(c.box(*rect), fill=_scaled(strap, shade))
    else:
        c.draw.arc(c.box(0.5 - half + taper + 0.01, top - 0.36, 0.5 + half - taper - 0.01, top + 0.36), 180, 360,
                   fill=strap, width=c.px(0.018))
        for x in (0.5 - half + taper + 0.01, 0.5 + half - taper - 0.01):
            c.draw.rectangle(c.box(x - 0.018, top - 0.03, x + 0.018, top + 0.01), fill=_scaled(look.accent, 0.9))
    outline = [(0.5 - half + taper, top), (0.5 + half - taper, top), (0.5 + half, bottom), (0.5 - half, bottom)]
    c.region(lambda d, f: d.polygon(c.pts(outline), fill=f), look.colour, v["pattern"], look.accent, vertical=True)
    c.draw.polygon(c.pts(outline), outline=_scaled(look.colour, 0.65), width=c.px(0.006))
    c.draw.line(c.pts([(0.5 - half + taper, top + 0.035), (0.5 + half - taper, top + 0.035)]),
                fill=_scaled(look.colour, 0.75), width=c.px(0.006))
    if look.text:
        c.text(look.text, (0.5, (top + bottom) / 2 + 0.02), 1.4 * half, 0.12, look.accent, look.colour)
    c.shade(0.5 - half, 0.5 + half, depth=0.1)
    return c.image


def draw_mug(look: Look, size: int) -> Image.Image:
    """A mug from the side: handle shape, band/dots pattern and the printed words are visible."""
    c = _Canvas(size)
    v, (p0, p1, _) = look.values, look.shape
    width, top, bottom, rim = 0.44 + 0.06 * p0, 0.20 + 0.06 * p1, 0.88, 0.035
    x0, x1 = 0.44 - width / 2, 0.44 + width / 2
    handle_box = c.box(x1 - 0.07, top + 0.12, x1 + 0.17, bottom - 0.16)
    handle_colour, handle_width = _scaled(look.colour, 0.9), c.px(0.05)
    if v["handle"] == "round":
        c.draw.ellipse(handle_box, outline=handle_colour, width=handle_width)
    else:
        c.draw.rectangle(handle_box, outline=handle_colour, width=handle_width)

    def body(d: ImageDraw.ImageDraw, f: int) -> None:
        d.rectangle(c.box(x0, top, x1, bottom), fill=f)
        d.ellipse(c.box(x0, bottom - rim, x1, bottom + rim), fill=f)

    c.region(body, look.colour, "dots" if v["pattern"] == "dots" else "solid", look.accent)
    if v["pattern"] == "band":
        c.draw.rectangle(c.box(x0, top + 0.09, x1, top + 0.16), fill=look.accent)
        c.draw.rectangle(c.box(x0, top + 0.175, x1, top + 0.19), fill=look.accent)
    inside = (236, 234, 228) if look.white_inside else _scaled(look.colour, 0.85)
    c.draw.ellipse(c.box(x0, top - rim, x1, top + rim), fill=_scaled(look.colour, 1.15))
    c.draw.ellipse(c.box(x0 + 0.012, top - rim + 0.008, x1 - 0.012, top + rim - 0.006), fill=_scaled(inside, 0.7))
    if look.text:
        c.text(look.text, ((x0 + x1) / 2, (top + bottom) / 2 + 0.06), 0.75 * width, 0.11, look.accent, look.colour)
    c.shade(x0, x1, depth=0.35, highlight=0.38)
    return c.image


def draw_cap(look: Look, size: int) -> Image.Image:
    """A baseball cap in three-quarter view: visor shape (curved/flat), two-tone/stripes and print are visible."""
    c = _Canvas(size)
    v, (p0, p1, _) = look.values, look.shape
    cx, half, top, base = 0.42, 0.29 + 0.03 * p0, 0.18 + 0.05 * p1, 0.62
    crown_box = c.box(cx - half, top, cx + half, 2 * base - top)
    c.region(lambda d, f: d.pieslice(crown_box, 180, 360, fill=f), look.colour,
             "stripes" if v["pattern"] == "stripes" else "solid", look.accent)
    # Two-tone: a front panel in the accent, the print in the other accent on top of it.
    two_tone = v["pattern"] == "two-tone"
    other_accent = look.dark_accent if look.accent == look.light_accent else look.light_accent
    panel, ink = (look.accent, other_accent) if two_tone else (look.colour, look.accent)
    if two_tone:
        c.draw.pieslice(c.box(cx - 0.62 * half, top + 0.004, cx + 0.62 * half, 2 * base - top), 180, 360, fill=panel)
    seam = _scaled(look.colour, 0.68)
    c.draw.arc(c.box(cx - 0.62 * half, top, cx + 0.62 * half, 2 * base - top), 180, 360, fill=seam, width=c.px(0.006))
    c.draw.line(c.pts([(cx, top), (cx, base)]), fill=seam, width=c.px(0.006))
    c.draw.ellipse(c.box(cx - 0.025, top - 0.018, cx + 0.025, top + 0.016), fill=_scaled(look.colour, 0.85))
    c.draw.line(c.pts([(cx - half, base), (cx + half, base)]), fill=_scaled(look.colour, 0.6), width=c.px(0.014))
    brim, edge = _scaled(look.colour, 0.88), _scaled(look.colour, 0.62)
    if v["visor"] == "flat":
        flat = [(cx - 0.06, base), (cx + half + 0.01, base - 0.01),
                (cx + half + 0.25, base + 0.09), (cx + 0.1, base + 0.15)]
        c.draw.polygon(c.pts(flat), fill=brim, outline=edge, width=c.px(0.007))
        c.draw.ellipse(c.box(cx + half + 0.02, base + 0.05, cx + half + 0.09, base + 0.1), fill=(214, 178, 62))
    else:
        c.draw.chord(c.box(cx - 0.14, base - 0.13, cx + half + 0.26, base + 0.17), 8, 172,
                     fill=brim, outline=edge, width=c.px(0.007))
        c.draw.arc(c.box(cx - 0.06, base - 0.07, cx + half + 0.18, base + 0.11), 20, 160, fill=edge, width=c.px(0.005))
    if look.text:
        c.text(look.text, (cx, base - 0.12), 1.0 * half, 0.1, ink, panel)
    c.shade(cx - half, cx + half, depth=0.22, highlight=0.45)
    return c.image


DRAWINGS: dict[str, Callable[[Look, int], Image.Image]] = {
    "tops": draw_top,
    "bags": draw_bag,
    "mugs": draw_mug,
    "caps": draw_cap,
}


# Where each line carries its label (centre, in unit coordinates): a sewn-on tag, a pack label.
LABEL_CENTRES: dict[str, tuple[float, float]] = {
    "tops": (0.5, 0.74), "bags": (0.5, 0.80), "mugs": (0.44, 0.72), "caps": (0.42, 0.37),
}
_LABEL_WIDTH, _LINE_HEIGHT = 0.34, 0.07


def draw_label(image: Image.Image, centre: tuple[float, float], lines: tuple[str, ...]) -> None:
    """A white label with dark print, one line per entry: large enough for a reader of text
    (OCR) to read at the listing image size, small enough to leave the design visible."""
    if not lines:
        return
    c = _Canvas(image.size[0])
    c.image, c.draw = image, ImageDraw.Draw(image)
    x, y = centre
    half_h = _LINE_HEIGHT * len(lines) / 2 + 0.012
    c.draw.rounded_rectangle(c.box(x - _LABEL_WIDTH / 2, y - half_h, x + _LABEL_WIDTH / 2, y + half_h),
                             radius=c.px(0.012), fill=(250, 250, 246), outline=(70, 70, 70), width=c.px(0.004))
    for i, text in enumerate(lines):
        line_y = y - half_h + 0.012 + _LINE_HEIGHT * (i + 0.5)
        c.text(text, (x, line_y), _LABEL_WIDTH - 0.03, _LINE_HEIGHT * 0.82, (24, 24, 28), (250, 250, 246))


def draw_product(line: str, look: Look, size: int) -> Image.Image:
    """Draw one product of ``line`` as an RGBA cut-out on a ``size`` x ``size`` canvas."""
    image = DRAWINGS[line](look, size)
    draw_label(image, LABEL_CENTRES[line], look.label)
    return image


def _background(size: int, rng: random.Random, noise: np.random.Generator) -> np.ndarray:
    """A table, wall, sheet or studio sweep behind the product, as float RGB pixels."""
    kind = rng.choice(("plain", "gradient", "wood", "fabric", "gradient"))
    base = np.array(rng.choice(((232, 228, 220), (214, 210, 204), (240, 236, 226), (196, 204, 210),
                                (226, 214, 196), (180, 176, 170), (246, 246, 246), (210, 224, 214))),
                    dtype=np.float32)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "gradient":
        light = 1.05 - 0.25 * y
    elif kind == "wood":
        base = np.array(rng.choice(((164, 116, 74), (196, 156, 110), (120, 84, 56))), dtype=np.float32)
        phase = noise.uniform(0, 2 * math.pi)
        light = 1.0 + 0.08 * np.sin(60 * y + 4 * np.sin(3 * x + phase)) + 0.04 * np.sin(190 * y + phase)
    elif kind == "fabric":
        light = 1.0 + 0.04 * np.sin(size * 0.9 * x) * np.sin(size * 0.9 * y)
    else:
        light = np.ones_like(x)
    pixels = base[None, None, :] * light[..., None]
    return pixels + noise.normal(0.0, 3.0, size=(size, size, 1)).astype(np.float32)


def _occlude(image: Image.Image, rng: random.Random) -> None:
    """Cover part of the frame from one edge: a thumb, a price sticker, another object."""
    size = image.size[0]
    width, height = (round(size * rng.uniform(0.16, 0.3)) for _ in range(2))
    edge = rng.choice(("left", "right", "top", "bottom"))
    x = {"left": 0, "right": size - width}.get(edge, rng.randrange(0, size - width))
    y = {"top": 0, "bottom": size - height}.get(edge, rng.randrange(0, size - height))
    colour = rng.choice(((224, 172, 140), (198, 140, 110), (250, 250, 250), (60, 60, 64), (190, 40, 40)))
    ImageDraw.Draw(image).rounded_rectangle((x, y, x + width, y + height), radius=size // 20, fill=colour)


def photograph(cutout: Image.Image, size: int, scale: float, rng: random.Random, clean: bool = False) -> Image.Image:
    """Photograph an RGBA ``cutout`` into a ``size`` x ``size`` RGB listing image.

    ``clean`` gives the catalog shot: white studio background, centred, object at ``scale``
    of the frame, neutral light. Otherwise scale, offset, rotation, background, lighting,
    blur, noise and occlusion are drawn from ``rng``.
    """
    noise = np.random.default_rng(rng.getrandbits(63))
    target = max(8, round(size * (scale if clean else scale * rng.uniform(0.72, 1.18))))
    # Resize premultiplied so transparent edge pixels do not bleed dark fringes.
    obj = cutout.convert("RGBa").resize((target, target), Image.LANCZOS)
    if not clean:
        obj = obj.rotate(rng.uniform(-12.0, 12.0), resample=Image.BICUBIC)
    obj = obj.convert("RGBA")
    shift = 0 if clean else 0.12 * size
    left = round((size - target) / 2 + rng.uniform(-shift, shift))
    top = round((size - target) / 2 + rng.uniform(-shift, shift))
    if clean:
        pixels = np.full((size, size, 3), 250.0, dtype=np.float32)
    else:
        pixels = _background(size, rng, noise)
    frame = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    alpha = obj.getchannel("A")
    shadow = alpha.filter(ImageFilter.GaussianBlur(max(1.0, size / 60))).point(lambda a: a * 0.35)
    offset = max(1, size // 45)
    frame.paste((40, 40, 40), (left + offset, top + offset), shadow)
    frame.paste(obj, (left, top), obj)
    if clean:
        return frame
    pixels = np.asarray(frame).astype(np.float32)
    contrast, brightness = rng.uniform(0.8, 1.2), rng.uniform(0.78, 1.18)
    cast = np.array([rng.uniform(0.9, 1.1) for _ in range(3)], dtype=np.float32)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * math.pi)
    falloff = 1.0 + rng.uniform(0.0, 0.15) * ((x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle))
    pixels = ((pixels - 128.0) * contrast + 128.0) * brightness * cast * falloff[..., None]
    pixels += noise.normal(0.0, rng.uniform(0.0, 5.0), size=pixels.shape).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.1)))
    if rng.random() < 0.35:
        _occlude(image, rng)
    return image


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """JPEG bytes of ``image`` (baseline, no optimisation pass: byte-identical on every run)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(quality))
    return buffer.getvalue()
