"""The visual reader: an offline teacher that writes attributes from what the photo shows.

AFMRL's premise is that a reader of fine detail finds what a global image embedding misses:
the brand on a milk carton, "medium fat" against "standard", "400 ML" on a mug. Without a
vision-language model on the machine, this teacher reads the printed text of the listing
photo with an OCR engine whose weights ship inside its wheel (``rapidocr-onnxruntime``,
PP-OCRv4 detection and recognition on onnxruntime) and turns it into strict attribute JSON:

- values the catalog already knows (the line's seller attributes, e.g. ``brand``,
  ``printed_text``) found in the read text by character trigrams, accents folded on both
  sides (the recogniser has no å/ä/ö: MJÖLK reads "MJOLK") and spaces ignored (words on packs
  merge: "mildlattyoghurt");
- ``variant``: words of the line's catalog titles found in the read text (up to three);
- quantities with units and codes, parsed from the read text by :func:`title_facts`, plus
  percentages (``percentage: 2.1 %``);
- ``colour``: the dominant colour name of the centre of the photo (cheap visual fact);
- ``text_on_pack``: every other word read, as one bag of words, rather than forced into keys.

A listing without an image gets ``{}`` (valid, empty): the reader writes only what it reads
from the photo, and the title already enters the encoder's text. An image that cannot be
read or decoded raises a ``ValueError`` naming the listing and the ``image_uri`` field.

The OCR engine is built once per process, lazily, on ``threads`` threads. Outputs are cached
per listing by content through :func:`annotate_with_cache` (``cache_identity`` names the
version, the image cap and a digest of the lexicon); within a process, reads of the same
image bytes are also remembered, so a changed lexicon costs no second OCR pass.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import polars as pl
from PIL import Image

from ..catalog.images import COLOURS
from ..catalog.schema import seller_attributes_dict
from ..local_files import write_text_atomically
from ..settings import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from ..storage import content_hash
from .format import MAX_KEYS, MAX_VALUE_CHARS, attributes_to_json, normalize_attributes
from .teacher import title_facts

VISUAL_READER = "visual-reader"
DEFAULT_THREADS = 2
DEFAULT_MAX_SIDE = 512  # longest side given to the OCR engine, in pixels
MIN_WORD_SCORE = 0.5  # recogniser confidence below which a word is dropped
MATCH_CONTAINMENT = 0.75  # share of a known value's trigrams found in the read text
MAX_VARIANT_WORDS = 3
# Keys the reader fills from the photo itself; catalog values of these keys are not matched.
_OWN_KEYS = {"colour", "percentage", "text_on_pack", "variant"}
# Keys of quantities: parsed from the read text by title_facts, never matched as words.
_QUANTITY_KEYS = {"storage", "frequency", "power", "battery", "voltage", "resolution", "length", "volume", "weight", "size"}
_TITLE_STOPWORDS = {"with", "from", "and", "the", "for", "new", "sale", "free", "shipping", "best", "seller", "gift", "idea"}
_PERCENT = re.compile(r"(?<![\d.])(\d{1,2}(?:[.,]\d)?)\s?%")


@dataclass(frozen=True)
class ReadWord:
    """One piece of text the OCR engine read: the text, its confidence and its box height in pixels."""

    text: str
    score: float
    height: float


def fold(text: str) -> str:
    """Lower case, accents removed (å -> a, ö -> o), a decimal comma a point, anything but
    letters, digits, '.', '%' a space."""
    decomposed = unicodedata.normalize("NFKD", re.sub(r"(?<=\d),(?=\d)", ".", text or ""))
    ascii_text = "".join(ch for ch in decomposed if not unicodedata.combining(ch)).lower()
    return " ".join(re.sub(r"[^a-z0-9.%]+", " ", ascii_text.replace("ø", "o").replace("æ", "ae")).split())


def trigrams(text: str) -> set[str]:
    """Character trigrams of ``text`` with spaces removed (merged and split words compare alike)."""
    compact = fold(text).replace(" ", "")
    if len(compact) < 3:
        return {compact} if compact else set()
    return {compact[i : i + 3] for i in range(len(compact) - 2)}


# ---- the OCR engine, once per process -------------------------------------------------------

_ENGINES: dict[int, object] = {}
_ENGINE_LOCK = threading.Lock()


def ocr_engine(threads: int = DEFAULT_THREADS):
    """The process's RapidOCR engine for ``threads`` intra-op threads, built on first use."""
    with _ENGINE_LOCK:
        if threads not in _ENGINES:
            try:
                from rapidocr_onnxruntime import RapidOCR
            except ImportError as error:  # pragma: no cover - the dependency is pinned in pyproject.toml
                raise ImportError("the visual-reader teacher needs rapidocr-onnxruntime (pip install rapidocr-onnxruntime==1.4.4)") from error
            _ENGINES[threads] = RapidOCR(intra_op_num_threads=threads, inter_op_num_threads=1)
        return _ENGINES[threads]


def decode_capped(data: bytes, max_side: int = DEFAULT_MAX_SIDE) -> Image.Image:
    """RGB image from bytes, refusing oversize bytes or pixel counts before decoding, then
    shrunk so its longest side is at most ``max_side``. Raises ``ValueError`` with the cause."""
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"image is {len(data)} bytes, more than {MAX_IMAGE_BYTES}")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ValueError(f"image is {width}x{height} pixels, more than {MAX_IMAGE_PIXELS}")
        image.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale when possible
        image = image.convert("RGB")
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"image bytes cannot be decoded: {error}") from error
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


def read_words(image: Image.Image, threads: int = DEFAULT_THREADS) -> list[ReadWord]:
    """Every piece of text the OCR engine reads on ``image``, in reading order."""
    result, _ = ocr_engine(threads)(np.asarray(image))
    words = []
    for box, text, score in result or []:
        ys = [point[1] for point in box]
        words.append(ReadWord(str(text), float(score), float(max(ys) - min(ys))))
    return words


def dominant_colour(image: Image.Image) -> str:
    """Name (of the catalog palette) of the commonest colour in the centre half of the photo."""
    width, height = image.size
    centre = image.crop((width // 4, height // 4, width - width // 4, height - height // 4)).resize((24, 24))
    pixels = np.asarray(centre, dtype=np.float32).reshape(-1, 3)
    names = list(COLOURS)
    palette = np.array([COLOURS[name] for name in names], dtype=np.float32)
    nearest = ((pixels[:, None, :] - palette[None, :, :]) ** 2).sum(axis=2).argmin(axis=1)
    return names[Counter(nearest.tolist()).most_common(1)[0][0]]


# ---- from read words to attributes -----------------------------------------------------------

@dataclass(frozen=True)
class Lexicon:
    """What the catalog knows: values by key (``brand``, ``printed_text``...) and title words."""

    values: Mapping[str, frozenset[str]]
    title_words: frozenset[str] = frozenset()

    def digest(self) -> str:
        parts = [f"{key}={'|'.join(sorted(values))}" for key, values in sorted(self.values.items())]
        return content_hash(*parts, "titles=" + "|".join(sorted(self.title_words)))[:16]


def lexicon_from_catalog(listings: pl.DataFrame) -> Lexicon:
    """The known values of a catalog frame: the normalised seller attributes of every key the
    reader can find in text (not quantities, not the keys it fills itself), and the words of
    the titles of listings that carry seller attributes (the catalog entries)."""
    values: dict[str, set[str]] = {}
    title_words: set[str] = set()
    cells = listings["seller_attributes"].to_list() if "seller_attributes" in listings.columns else [None] * listings.height
    for cell, title in zip(cells, listings["title"].to_list()):
        attributes = normalize_attributes(seller_attributes_dict(cell))
        for key, value in attributes.items():
            if key not in _OWN_KEYS and key not in _QUANTITY_KEYS and len(fold(value).replace(" ", "")) >= 2:
                values.setdefault(key, set()).add(value)
        if attributes:
            title_words.update(word for word in fold(title or "").split() if len(word) >= 4 and word.isalpha() and word not in _TITLE_STOPWORDS)
    brand_words = {word for brand in values.get("brand", ()) for word in fold(brand).split()}
    return Lexicon({key: frozenset(found) for key, found in values.items()}, frozenset(title_words - brand_words))


def _match_score(value: str, tokens: list[str], text_grams: set[str]) -> float:
    """How surely ``value`` appears in the read text: exact token for short values, else the
    best share of trigrams found, over the value's words of 3+ characters and the whole value."""
    compact = fold(value).replace(" ", "")
    if len(compact) <= 3:
        return 1.0 if compact in tokens else 0.0
    candidates = [compact] + [word for word in fold(value).split() if len(word) >= 4]
    best = 0.0
    for candidate in candidates:
        grams = trigrams(candidate)
        if grams:
            best = max(best, len(grams & text_grams) / len(grams) * (1.0 if candidate == compact else 0.9))
    return best


def attributes_from_words(words: Iterable[ReadWord], lexicon: Lexicon | None = None, colour: str | None = None) -> dict[str, str]:
    """Attributes from what was read (see the module docstring), normalised, at most ``MAX_KEYS``."""
    kept = sorted((w for w in words if w.score >= MIN_WORD_SCORE and fold(w.text)), key=lambda w: -w.height)
    tokens = [token for w in kept for token in fold(w.text).split()]
    text = " ".join(fold(w.text) for w in kept)
    text_grams = trigrams(text)
    attributes: dict[str, str] = {}
    used: set[str] = set()
    for key, values in sorted((lexicon.values if lexicon else {}).items()):
        scored = sorted(((_match_score(value, tokens, text_grams), len(value), value) for value in values), reverse=True)
        if scored and scored[0][0] >= MATCH_CONTAINMENT:
            attributes[key] = scored[0][2]
            value_grams = trigrams(scored[0][2])
            used.update(token for token in tokens if trigrams(token) and len(trigrams(token) & value_grams) / len(trigrams(token)) >= 0.5)
    if lexicon and lexicon.title_words:
        variant: list[str] = []
        for word in sorted(lexicon.title_words, key=lambda w: (-len(w), w)):  # longest first: "mellanmjolk" hides "mjolk"
            if len(variant) == MAX_VARIANT_WORDS:
                break
            if (_match_score(word, tokens, text_grams) >= MATCH_CONTAINMENT and not any(word in chosen for chosen in variant)
                    and not any(word in value for value in attributes.values())):
                variant.append(word)
        if variant:
            attributes["variant"] = " ".join(sorted(variant))
            used.update(token for token in tokens for word in variant if word in token or token in word)
    for key, value in title_facts(text).items():
        attributes.setdefault(key, value)
        used.update(value.replace(" ", "").split(","))
    percent = _PERCENT.search(text)
    if percent:
        attributes["percentage"] = f"{percent.group(1).replace(',', '.')} %"
    if colour:
        attributes["colour"] = colour
    bag: list[str] = []
    for token in tokens:
        if len(token) >= 2 and token not in used and token not in bag and not token.replace(".", "").isdigit():
            if len(" ".join([*bag, token])) > MAX_VALUE_CHARS:
                break
            bag.append(token)
    if bag:
        attributes["text_on_pack"] = " ".join(bag)
    normalised = normalize_attributes({key: value[:MAX_VALUE_CHARS] for key, value in attributes.items()})
    return dict(list(normalised.items())[:MAX_KEYS])


class WordCache:
    """Words read per image and its dominant colour, on disk by image content (one JSON file
    each), so an experiment that reads the same photos again runs no OCR: ``read`` counts the
    images read this time and ``seconds`` their OCR time."""

    def __init__(self, folder: str | Path, threads: int = DEFAULT_THREADS, max_side: int = DEFAULT_MAX_SIDE):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.threads, self.max_side = threads, max_side
        self.seconds, self.read = 0.0, 0

    def words(self, data: bytes) -> tuple[list[ReadWord], str]:
        path = self.folder / f"{content_hash(data, str(self.max_side))[:32]}.json"
        if path.is_file():
            cached = json.loads(path.read_text())
            return [ReadWord(**word) for word in cached["words"]], cached["colour"]
        started = time.perf_counter()
        image = decode_capped(data, self.max_side)
        words, colour = read_words(image, self.threads), dominant_colour(image)
        self.seconds += time.perf_counter() - started
        self.read += 1
        write_text_atomically(path, json.dumps({"words": [w.__dict__ for w in words], "colour": colour}))
        return words, colour


# ---- the teacher -------------------------------------------------------------------------------

class VisualReaderTeacher:
    """Attribute JSON from the text printed on the listing photo (see the module docstring).

    ``read_image`` reads an ``image_uri`` to bytes (the artefact store's reader in the
    pipeline). ``lexicon`` holds the values the catalog knows (:func:`lexicon_from_catalog`);
    without it only quantities, codes, percentages, the colour and the bag of words are written.
    """

    name = VISUAL_READER
    version = "1"

    def __init__(self, read_image: Callable[[str], bytes], lexicon: Lexicon | None = None,
                 threads: int = DEFAULT_THREADS, max_side: int = DEFAULT_MAX_SIDE):
        if threads < 1 or max_side < 32:
            raise ValueError(f"threads must be >= 1 and max_side >= 32, got {threads} and {max_side}")
        self.read_image, self.lexicon, self.threads, self.max_side = read_image, lexicon, threads, max_side
        self._memo: dict[str, tuple[list[ReadWord], str]] = {}

    @property
    def cache_identity(self) -> str:
        lexicon = self.lexicon.digest() if self.lexicon else "none"
        return f"{self.name}:{self.version}:max_side={self.max_side}:lexicon={lexicon}"

    def read(self, data: bytes) -> tuple[list[ReadWord], str]:
        """Words read on the image bytes and its dominant colour (remembered by content)."""
        key = content_hash(data, str(self.max_side))
        if key not in self._memo:
            image = decode_capped(data, self.max_side)
            self._memo[key] = (read_words(image, self.threads), dominant_colour(image))
        return self._memo[key]

    def annotate(self, listings: pl.DataFrame) -> list[str]:
        """One canonical JSON text per row of ``listings``; ``{}`` for a listing without image."""
        uris = listings["image_uri"].to_list() if "image_uri" in listings.columns else [None] * listings.height
        outputs = []
        for listing_id, uri in zip(listings["listing_id"].to_list(), uris):
            if not uri:
                outputs.append(attributes_to_json({}))
                continue
            try:
                outputs.append(self.write(self.read_image(uri)))
            except (OSError, ValueError) as error:
                raise ValueError(f"visual-reader: listing {listing_id!r}, field 'image_uri' ({uri}): {error}") from error
        return outputs

    def write(self, data: bytes) -> str:
        """The canonical attribute JSON of one photo's bytes: what :meth:`annotate` writes for a
        listing, and what ``afmrl search`` reads off a query photo."""
        words, colour = self.read(data)
        return attributes_to_json(attributes_from_words(words, self.lexicon, colour))

