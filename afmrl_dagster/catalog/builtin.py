"""The built-in catalog: the project's own deterministic fine-grained retrieval benchmark.

Each product line holds families: a family is one base design with one fictional brand and
one silhouette, and its sibling products differ from the base in exactly one or two
attributes, and from each other in one or two, so every sibling is a hard negative of the
others (often with near colours: navy vs black, red vs dark red). Each product has several
listings: photos under different conditions (:mod:`afmrl_dagster.catalog.images`) with
titles, descriptions and seller attributes written the way sellers write them.

Everything derives from ``(seed, line, family, sibling, listing)`` through ``zlib.crc32``,
so the same config gives the same bytes on every run and machine with the same Pillow, and
adding families never changes the ones already there.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field

from afmrl_dagster.catalog import images
from afmrl_dagster.catalog.schema import CatalogBatch, make_catalog

_NONE = "none"  # "no printed text": kept in a design, left out of the ground truth

LINE_AXES: dict[str, dict[str, tuple[str, ...]]] = {
    "tops": {
        "colour": tuple(images.COLOURS),
        "neckline": ("v-neck", "round-neck", "boat-neck"),
        "pattern": ("solid", "stripes", "dots"),
        "sleeve": ("short", "long"),
        "printed_text": (_NONE, "surf", "nyc", "wild", "tokyo", "1987", "be kind", "love"),
    },
    "bags": {
        "colour": tuple(images.COLOURS),
        "handle": ("round", "square", "strap"),
        "pattern": ("solid", "stripes", "dots"),
        "size": ("small", "large"),
        "printed_text": (_NONE, "eco", "paris", "city", "shop local", "bonjour"),
    },
    "mugs": {
        "colour": tuple(images.COLOURS),
        "printed_text": (_NONE, "best dad", "hello", "monday", "best mum", "coffee", "good vibes"),
        "handle": ("round", "square"),
        # "solid", not "none": normalize_attributes drops the value "none".
        "pattern": ("solid", "band", "dots"),
        "size": ("250 ml", "400 ml"),
    },
    "caps": {
        "colour": tuple(images.COLOURS),
        "visor": ("curved", "flat"),
        "pattern": ("solid", "two-tone", "stripes"),
        "printed_text": (_NONE, "la", "surf", "crew", "ny", "wild"),
    },
}
BUILTIN_PRODUCT_LINES: tuple[str, ...] = tuple(LINE_AXES)

# Colours a sibling most often switches to: the look-alikes that make retrieval hard.
NEAR_COLOURS: dict[str, tuple[str, ...]] = {
    "black": ("navy", "charcoal"), "charcoal": ("black", "gray"), "gray": ("charcoal", "white"),
    "white": ("cream", "gray"), "cream": ("white", "beige"), "beige": ("cream", "brown"),
    "brown": ("beige", "dark red"), "navy": ("black", "blue"), "blue": ("navy", "light blue"),
    "light blue": ("blue", "teal"), "teal": ("green", "blue"), "green": ("dark green", "teal"),
    "dark green": ("green", "olive"), "olive": ("dark green", "mustard"), "mustard": ("yellow", "olive"),
    "yellow": ("mustard", "cream"), "orange": ("red", "mustard"), "red": ("dark red", "orange"),
    "dark red": ("red", "brown"), "pink": ("red", "purple"), "purple": ("dark red", "navy"),
}
_AXIS_WEIGHTS = {"colour": 3.0, "printed_text": 2.0}
_MAX_SIBLINGS = 12
_SIZE_SCALE = {"small": 0.7, "large": 0.94, "250 ml": 0.72, "400 ml": 0.94}
_BRAND_HEADS = ("Nor", "Al", "Ves", "Kor", "Mar", "Lun", "Ost", "Bel", "Tam", "Ri", "Sol", "Fen", "Hal", "Ju", "Pel",
                "Wren")
_BRAND_TAILS = ("vik", "ma", "lo", "den", "ley", "ora", "tus", "ford", "by", "sen", "ette", "ko")


@dataclass(frozen=True)
class BuiltinCatalogConfig:
    """Size and seed of the built-in catalog; the defaults render 240 images in a few seconds."""

    seed: int = 0
    product_lines: tuple[str, ...] = ("tops", "bags", "mugs")
    families_per_line: int = 6
    siblings_per_family: int = 5
    listings_per_product: int = 5
    image_size: int = 224
    jpeg_quality_range: tuple[int, int] = (35, 92)

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        unknown = [line for line in self.product_lines if line not in LINE_AXES]
        if not self.product_lines or unknown:
            raise ValueError(f"product_lines must name lines of {BUILTIN_PRODUCT_LINES}, got {self.product_lines!r}")
        if len(set(self.product_lines)) != len(self.product_lines):
            raise ValueError(f"product_lines has duplicates: {self.product_lines!r}")
        if self.families_per_line < 1:
            raise ValueError(f"families_per_line must be >= 1, got {self.families_per_line}")
        if not 1 <= self.siblings_per_family <= _MAX_SIBLINGS:
            raise ValueError(f"siblings_per_family must be in 1..{_MAX_SIBLINGS}, got {self.siblings_per_family}")
        if self.listings_per_product < 2:
            raise ValueError(
                f"listings_per_product must be >= 2 (a query and a match), got {self.listings_per_product}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 pixels, got {self.image_size}")
        low, high = self.jpeg_quality_range
        if not 1 <= low <= high <= 100:
            raise ValueError(f"jpeg_quality_range must satisfy 1 <= low <= high <= 100, got {self.jpeg_quality_range}")


@dataclass(frozen=True)
class ProductDesign:
    """One product: its design (every axis, ``printed_text`` may be ``"none"``) and its family's."""

    line: str
    family: int
    sibling: int
    brand: str
    values: dict[str, str]
    base_values: dict[str, str]
    look: images.Look = field(repr=False)

    @property
    def product_id(self) -> str:
        return f"{self.line}-f{self.family}-s{self.sibling}"

    @property
    def attributes(self) -> dict[str, str]:
        """Ground truth, already normalised: the design without "none" values, plus the brand."""
        return {k: v for k, v in self.values.items() if v != _NONE} | {"brand": self.brand.lower()}

    @property
    def base_attributes(self) -> dict[str, str]:
        return {k: v for k, v in self.base_values.items() if v != _NONE} | {"brand": self.brand.lower()}


def _rng(*parts) -> random.Random:
    return random.Random(zlib.crc32("|".join(map(str, parts)).encode()))


def design_distance(a: dict[str, str], b: dict[str, str]) -> int:
    """Number of attributes in which two attribute dicts differ (a missing key is a difference)."""
    return sum(a.get(key) != b.get(key) for key in set(a) | set(b))


def _other_value(axis: str, values: tuple[str, ...], current: str, rng: random.Random) -> str:
    if axis == "colour" and rng.random() < 0.75:
        return rng.choice(NEAR_COLOURS[current])
    return rng.choice([value for value in values if value != current])


def _sibling_designs(axes: dict[str, tuple[str, ...]], base: dict[str, str], count: int,
                     rng: random.Random) -> list[dict[str, str]]:
    """``count`` distinct designs, each 1-2 changes from ``base`` and at most 2 from each other.

    Half the families vary along one pair of axes (a sibling changes one or both, e.g. colour
    and print); the others change a single axis per sibling. Either way any two siblings
    differ in one or two attributes, and the rejection sampling below cannot get stuck.
    """
    names = list(axes)
    weights = [_AXIS_WEIGHTS.get(name, 1.0) for name in names]
    pair: list[str] = []
    while len(pair) < 2:
        name = rng.choices(names, weights)[0]
        if name not in pair:
            pair.append(name)
    if rng.random() < 0.5 or len(axes[pair[0]]) * len(axes[pair[1]]) - 1 < 2 * count:
        pair = []
    chosen: list[dict[str, str]] = []
    for _ in range(20000):
        if len(chosen) == count:
            return chosen
        if pair:
            picked = rng.choice((pair[:1], pair[1:], pair, pair))
        else:
            picked = rng.choices(names, weights)
        candidate = dict(base)
        for name in picked:
            candidate[name] = _other_value(name, axes[name], base[name], rng)
        if candidate not in chosen:
            chosen.append(candidate)
    raise RuntimeError(f"could not design {count} siblings around {base}")  # unreachable: see validation


def _brand(rng: random.Random, taken: set[str]) -> str:
    """A fictional brand not yet used in the line, so a brand never spans two families."""
    for _ in range(100):
        brand = rng.choice(_BRAND_HEADS) + rng.choice(_BRAND_TAILS) + rng.choice(("", "", "a", "o"))
        if brand not in taken:
            return brand
    return f"{brand}{len(taken)}"


def pack_label(brand: str, values: dict[str, str]) -> tuple[str, ...]:
    """The text printed on the product's label: the brand, and the quantity when it has one
    (a mug's "400 ML"), so a reader of text finds on the photo what sellers write in titles."""
    quantity = values.get("size", "")
    return (brand.upper(),) + ((quantity.upper(),) if any(ch.isdigit() for ch in quantity) else ())


def product_designs(line: str, config: BuiltinCatalogConfig = BuiltinCatalogConfig()) -> list[ProductDesign]:
    """Every product of ``line``: families of siblings around a base design (no rendering)."""
    if line not in LINE_AXES:
        raise ValueError(f"unknown built-in product line {line!r}; known: {BUILTIN_PRODUCT_LINES}")
    axes = LINE_AXES[line]
    designs: list[ProductDesign] = []
    brands: set[str] = set()
    for family in range(config.families_per_line):
        rng = _rng(config.seed, line, family)
        brand = _brand(rng, brands)
        brands.add(brand)
        base = {axis: rng.choice(values) for axis, values in axes.items()}
        shape = (rng.random(), rng.random(), rng.random())
        light = rng.choice(((250, 250, 246), (246, 232, 190), (250, 214, 80)))
        dark = rng.choice(((24, 24, 28), (32, 40, 90), (120, 24, 30)))
        white_inside = rng.random() < 0.6
        for sibling, values in enumerate(_sibling_designs(axes, base, config.siblings_per_family, rng)):
            look = images.Look(values, shape, light, dark, white_inside, pack_label(brand, values))
            designs.append(ProductDesign(line, family, sibling, brand, values, base, look))
    return designs


def product_attributes(line: str, config: BuiltinCatalogConfig = BuiltinCatalogConfig()) -> dict[str, dict[str, str]]:
    """Ground-truth attributes of every product of ``line``, keyed by ``product_id``."""
    return {design.product_id: design.attributes for design in product_designs(line, config)}


# ---- how sellers write about a product -------------------------------------------------

NOUNS = {
    "tops": ("t-shirt", "tee", "top", "T-Shirt", "tshirt", "Tee Shirt"),
    "bags": ("tote", "bag", "handbag", "tote bag", "shopper bag", "Tote"),
    "mugs": ("mug", "cup", "coffee mug", "Mug", "tea cup"),
    "caps": ("cap", "baseball cap", "hat", "Cap", "snapback"),
}
TITLE_PHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "neckline": {"v-neck": ("V-Neck", "v neck", "vneck"), "round-neck": ("crew neck", "round neck", "crewneck"),
                 "boat-neck": ("boat neck", "bateau neck", "slash neck")},
    "pattern": {"solid": ("plain", "solid", ""), "stripes": ("striped", "stripe", "breton stripe"),
                "dots": ("polka dot", "dotted", "spotty"), "band": ("banded", "stripe band"),
                "two-tone": ("two tone", "trucker", "two-colour")},
    "sleeve": {"short": ("short sleeve", "short-sleeved", "SS"), "long": ("long sleeve", "long-sleeved", "LS")},
    "handle": {"round": ("round handle", "loop handle"), "square": ("square handle", "box handle"),
               "strap": ("shoulder strap", "long strap", "crossbody")},
    "size": {"small": ("small", "mini", "S"), "large": ("large", "big", "XL"),
             "250 ml": ("250ml", "250 ml", "small"), "400 ml": ("400ml", "400 ml", "large")},
    "visor": {"curved": ("curved brim", "curved visor"), "flat": ("flat brim", "flat peak")},
}
SELLER_KEYS = {
    "colour": ("colour", "color", "Color", "Colour", "main colour", "colour_name"),
    "neckline": ("neckline", "Neckline", "neck", "neck line"),
    "pattern": ("pattern", "Pattern", "print"),
    "sleeve": ("sleeve", "Sleeve", "sleeve length"),
    "printed_text": ("printed_text", "text", "logo", "Printed Text"),
    "handle": ("handle", "Handle", "handle shape"),
    "size": ("size", "Size", "size_name"),
    "visor": ("visor", "Visor", "brim"),
    "brand": ("brand", "Brand", "brand name", "manufacturer"),
}
SELLER_VALUES = {
    "gray": ("gray", "grey", "Grey"), "v-neck": ("v-neck", "vneck", "V Neck", "V-Neck"),
    "round-neck": ("round-neck", "crew neck", "Crewneck", "round neck"), "stripes": ("stripes", "striped", "Stripe"),
    "dots": ("dots", "dotted", "polka dots", "Polka-Dot"), "solid": ("solid", "plain", "Plain"),
    "250 ml": ("250ml", "250 ml", "250 ML"), "400 ml": ("400ml", "400 ml", "400ML"),
    "navy": ("navy", "Navy", "navy blue"), "boat-neck": ("boat-neck", "Boat-Neck", "bateau"),
}
_FLUFF = ("NEW", "2024", "gift idea", "free shipping", "best seller", "unisex", "sale")
_DESCRIPTIONS = {
    "tops": ("Soft cotton {noun} for everyday wear.", "Classic {noun}, regular fit.",
             "Lightweight {noun}, machine washable."),
    "bags": ("Sturdy canvas {noun} for shopping and travel.", "Everyday {noun} with inner pocket.",
             "Roomy {noun}, easy to carry."),
    "mugs": ("Ceramic {noun}, dishwasher and microwave safe.", "Glazed stoneware {noun}.",
             "A {noun} for your morning coffee."),
    "caps": ("Adjustable {noun} with breathable panels.", "Cotton twill {noun}, one size fits most.",
             "Classic {noun} for sunny days."),
}


def _typo(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    candidates = [i for i, word in enumerate(words) if len(word) >= 4 and word.isalpha()]
    if not candidates:
        return text
    i = rng.choice(candidates)
    word, j = words[i], rng.randrange(1, len(words[i]) - 1)
    words[i] = word[:j] + word[j + 1] + word[j] + word[j + 2:] if rng.random() < 0.5 else word[:j] + word[j + 1:]
    return " ".join(words)


def _phrases(design: ProductDesign, rng: random.Random) -> list[str]:
    """Some of the product's attributes as title words, in the seller's own words."""
    phrases = []
    for axis, value in design.values.items():
        if rng.random() > (0.85 if axis == "colour" else 0.6):
            continue
        if axis == "colour":
            phrases.append(rng.choice((value, value.title(), "grey" if value == "gray" else value)))
        elif axis == "printed_text":
            if value != _NONE:
                phrases.append(rng.choice(('"{}" print', "{} slogan", "'{}'", "{} graphic")).format(value.upper()))
        else:
            phrases.append(rng.choice(TITLE_PHRASES[axis][value]))
    return [phrase for phrase in phrases if phrase]


def listing_title(design: ProductDesign, rng: random.Random) -> str:
    """A seller's title: synonyms, shuffled order, missing attributes, sometimes a typo or odd casing."""
    noun = rng.choice(NOUNS[design.line])
    phrases = _phrases(design, rng)
    rng.shuffle(phrases)
    brand = design.brand if rng.random() < 0.7 else ""
    style = rng.random()
    if style < 0.5:
        title = " ".join(part for part in (brand, *phrases, noun) if part)
    elif style < 0.8:
        head = " ".join(part for part in (brand, noun) if part)
        title = rng.choice((" - ", ", ", " | ", " / ")).join([head, *phrases])
    else:
        title = " ".join(part for part in (*phrases, noun) if part) + (f" by {brand}" if brand else "")
    if rng.random() < 0.25:
        title = f"{title} {rng.choice(_FLUFF)}" if rng.random() < 0.5 else f"{rng.choice(_FLUFF)} {title}"
    if rng.random() < 0.15:
        title = _typo(title, rng)
    casing = rng.random()
    if casing < 0.1:
        title = title.upper()
    elif casing < 0.25:
        title = title.lower()
    elif casing < 0.4:
        title = title.title()
    return title


def listing_description(design: ProductDesign, rng: random.Random) -> str | None:
    """A short sentence, true to the product, or ``None`` as many sellers leave it empty."""
    if rng.random() < 0.3:
        return None
    noun = rng.choice(NOUNS[design.line]).lower()
    sentence = rng.choice(_DESCRIPTIONS[design.line]).format(noun=noun)
    axis = rng.choice([axis for axis, value in design.values.items() if value != _NONE])
    value = design.values[axis]
    detail = {"colour": f"Colour: {value}.", "printed_text": f'Printed with "{value.upper()}".'}.get(
        axis, f"{axis.replace('_', ' ').capitalize()}: {rng.choice(SELLER_VALUES.get(value, (value,)))}.")
    return f"{sentence} {detail}" if rng.random() < 0.7 else sentence


def listing_seller_attributes(design: ProductDesign, rng: random.Random) -> dict[str, str]:
    """About 70% of the product's attributes, with the key and value synonyms sellers use."""
    truth = design.attributes
    kept = [key for key in truth if rng.random() >= 0.3] or [rng.choice(list(truth))]
    attributes = {}
    for key in kept:
        value = truth[key]
        if key == "brand":
            value = rng.choice((design.brand, design.brand.upper()))
        elif key == "printed_text":
            value = rng.choice((value.upper(), value.title(), value))
        elif value in SELLER_VALUES:
            value = rng.choice(SELLER_VALUES[value])
        elif rng.random() < 0.3:
            value = value.title()
        attributes[rng.choice(SELLER_KEYS[key])] = value
    return attributes


def generate_product_line(line: str, config: BuiltinCatalogConfig = BuiltinCatalogConfig()) -> CatalogBatch:
    """Render every listing of ``line``: the listings frame (``image_uri`` null) and JPEG bytes by listing id.

    Listing 0 of each product is the clean catalog shot (white studio, product size shows as
    scale); the others are seller photos under random conditions.
    """
    rows, encoded = [], {}
    low, high = config.jpeg_quality_range
    canvas = 2 * config.image_size  # drawn at twice the size, then downsampled: smooth edges
    for design in product_designs(line, config):
        cutout = images.draw_product(line, design.look, canvas)
        scale = _SIZE_SCALE.get(design.values.get("size", ""), 0.92)
        for k in range(config.listings_per_product):
            rng = _rng(config.seed, line, design.family, design.sibling, k)
            listing_id = f"{line}-{design.family:02d}{design.sibling:02d}-{k}"
            photo = images.photograph(cutout, config.image_size, scale, rng, clean=k == 0)
            encoded[listing_id] = images.encode_jpeg(photo, high if k == 0 else rng.randint(low, high))
            rows.append({
                "listing_id": listing_id,
                "product_id": design.product_id,
                "product_line": line,
                "title": listing_title(design, rng),
                "description": listing_description(design, rng),
                "image_uri": None,
                "seller_attributes": listing_seller_attributes(design, rng),
                "source": "builtin",
            })
    return CatalogBatch(listings=make_catalog(rows), images=encoded)


def generate_builtin_catalog(config: BuiltinCatalogConfig = BuiltinCatalogConfig()) -> dict[str, CatalogBatch]:
    """Every configured product line, keyed by line."""
    return {line: generate_product_line(line, config) for line in config.product_lines}
