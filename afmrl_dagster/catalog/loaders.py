"""Loaders that read real product datasets, in their own published layouts, into the catalog schema.

Each loader takes the dataset's root folder (any copy, not only the shared one) and returns a
:func:`~afmrl_dagster.catalog.schema.conform`-ed frame; ``image_uri`` is the absolute path of an
existing image file, or null.

Malformed input policy: a loader is strict about *structure* and raises
:class:`CatalogLoadError` with ``file:line`` and the problem (bytes that are not UTF-8, a line
with the wrong number of fields, a missing field, an id that the match list names but no table
holds, a photo listed but absent). Silently skipping such lines would hide a broken copy of a
dataset. *Content* problems inside well-formed records (a blank title, say) are left in the
frame for :func:`~afmrl_dagster.catalog.schema.validate_catalog` to report row by row.
"""

from __future__ import annotations

import ast
import csv
import gzip
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import polars as pl

from afmrl_dagster.catalog.schema import conform, make_catalog, slugify

PathLike = str | os.PathLike


class CatalogLoadError(ValueError):
    """Raised for structurally malformed input; the message starts with ``file:line``."""


def load_error(path: PathLike, line: int | None, problem: str) -> CatalogLoadError:
    """The error to raise for ``problem`` at ``path`` (and ``line``, when known)."""
    where = f"{path}:{line}" if line is not None else str(path)
    return CatalogLoadError(f"{where}: {problem}")


def require_path(path: Path, what: str) -> Path:
    """``path`` itself, or a :class:`CatalogLoadError` naming ``what`` was expected there."""
    if not path.exists():
        raise CatalogLoadError(f"{path}: not found ({what})")
    return path


def _clean(text: str | None) -> str | None:
    """Collapse whitespace (including no-break spaces); blank becomes ``None``."""
    if text is None:
        return None
    text = re.sub(r"\s+", " ", str(text).replace("\u00a0", " ")).strip()
    return text or None


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` of a UTF-8 text file (``.gz`` too), naming the line of bad bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise load_error(path, number, f"not valid UTF-8 ({error.reason} at byte {error.start})") from None
            if number == 1:
                text = text.lstrip("\ufeff")
            yield number, text.rstrip("\r\n")


def _read_text(path: Path) -> str:
    return "\n".join(text for _, text in read_lines(path))


# ---- Grocery Store Dataset --------------------------------------------------------------

GROCERY_SPLITS = ("train.txt", "val.txt", "test.txt")


def _grocery_listing_id(relative_path: str) -> str:
    return "grocery-" + slugify(relative_path.rsplit(".", 1)[0])


def _split_path(root: Path, split_file: PathLike) -> Path:
    return Path(split_file) if Path(split_file).is_absolute() else root / split_file


def _grocery_split(path: Path) -> Iterator[tuple[int, str, int, int]]:
    """Lines ``path, fine_class_id, coarse_class_id`` of a split list, checked."""
    require_path(path, "grocery split list")
    for number, text in read_lines(path):
        if not text.strip():
            continue
        fields = [field.strip() for field in text.split(",")]
        if len(fields) != 3 or not all(fields):
            raise load_error(path, number, f"expected 'path, fine_class_id, coarse_class_id', got {text!r}")
        try:
            fine, coarse = int(fields[1]), int(fields[2])
        except ValueError:
            raise load_error(path, number, f"class ids are not integers: {text!r}") from None
        yield number, fields[0], fine, coarse


def grocery_split_listing_ids(root: PathLike, split_file: PathLike) -> set[str]:
    """Listing ids of the store photos that ``split_file`` (e.g. ``val.txt``) lists."""
    path = _split_path(Path(root).absolute(), split_file)
    return {_grocery_listing_id(relative) for _, relative, _, _ in _grocery_split(path)}


def _grocery_classes(root: Path) -> dict[int, dict]:
    """``classes.csv``: fine class id -> name, coarse class, iconic image and description file."""
    path = require_path(root / "classes.csv", "grocery classes.csv")
    classes: dict[int, dict] = {}
    for number, text in read_lines(path):
        if number == 1 or not text.strip():
            continue
        fields = next(csv.reader([text]))
        if len(fields) != 6:
            raise load_error(path, number, f"expected 6 fields, got {len(fields)}")
        name, fine, coarse_name, coarse, iconic, description = (field.strip() for field in fields)
        try:
            fine_id, coarse_id = int(fine), int(coarse)
        except ValueError:
            raise load_error(path, number, "class ids are not integers") from None
        classes[fine_id] = {
            "product_id": slugify(name), "name": name, "coarse": coarse_name, "coarse_id": coarse_id,
            "iconic": require_path(root / iconic.lstrip("/"), f"iconic image named in {path.name}:{number}"),
            "description": root / description.lstrip("/"),
        }
    return classes


def _grocery_information(folder: Path) -> dict[str, str]:
    """Fields of a product's ``*Information.txt``: ``Key: value`` lines; indented lines continue a key."""
    files = sorted(folder.glob("*Information.txt"))  # one class spells it "-Information.txt"
    if not files:
        return {}
    fields: dict[str, str] = {}
    key = None
    for number, text in read_lines(files[0]):
        if not text.strip():
            continue
        if text[0].isspace() and key:
            fields[key] += " " + text.strip()
            continue
        if ":" not in text:
            raise load_error(files[0], number, f"expected 'Key: value', got {text!r}")
        key, value = (part.strip() for part in text.split(":", 1))
        fields[key] = value
    return {name: cleaned for name, value in fields.items() if (cleaned := _clean(value))}


def _amount_attribute(amount: str) -> dict[str, str]:
    """``ca 180g`` -> ``{"weight": "180g"}``; ``1l`` -> ``{"volume": "1l"}``."""
    amount = re.sub(r"^(ca\.?|approx\.?)\s*", "", amount.strip(), flags=re.IGNORECASE)
    if not amount:
        return {}
    unit = re.search(r"[a-z]+$", amount.lower())
    return {"weight" if unit and unit.group() in ("g", "kg") else "volume": amount}


def _grocery_attributes(info: dict[str, str]) -> dict[str, str]:
    """Brand, country and volume/weight from ``Manufacturer and volume: ARLA KO , 1l``-style fields."""
    attributes: dict[str, str] = {}
    for key, name in (("Manufacturer and volume", "brand"), ("Country and volume", "country")):
        if key in info:
            head, comma, amount = info[key].rpartition(",")
            if not comma:
                head, amount = amount, ""
            if _clean(head):
                attributes[name] = _clean(head)
            attributes |= _amount_attribute(amount)
    for key in ("Country", "Manufacturing country"):
        if key in info:
            attributes["country"] = info[key]
    return attributes


def _grocery_iconic(cls: dict) -> dict:
    info = _grocery_information(cls["iconic"].parent)
    description = _clean(_read_text(cls["description"])) if cls["description"].is_file() else None
    return {
        "listing_id": f"grocery-iconic-{cls['product_id']}",
        "product_id": cls["product_id"],
        "product_line": slugify(cls["coarse"]),
        "title": info.get("Title") or cls["name"].replace("-", " "),
        "description": description or info.get("Description"),
        "image_uri": str(cls["iconic"]),
        "seller_attributes": _grocery_attributes(info),
        "source": "grocery",
    }


def load_grocery(root: PathLike, split_files: Sequence[PathLike] | None = None) -> pl.DataFrame:
    """The Grocery Store Dataset: store photos of the split lists plus one iconic listing per class.

    ``product_id`` is the fine class (slug of its name), ``product_line`` the coarse class. The
    iconic listing carries the catalog title, description and attributes (brand, country,
    volume/weight) of ``_Information.txt``; store photos are titled by the coarse class only,
    as a shopper names them. ``split_files`` defaults to every split list present
    (``train.txt``, ``val.txt``, ``test.txt``).
    """
    root = Path(root).absolute()
    classes = _grocery_classes(root)
    rows = [_grocery_iconic(cls) for _, cls in sorted(classes.items())]
    if split_files is None:
        split_files = [name for name in GROCERY_SPLITS if (root / name).is_file()]
    seen: set[str] = set()
    for split_path in (_split_path(root, name) for name in split_files):
        for number, relative, fine_id, coarse_id in _grocery_split(split_path):
            cls = classes.get(fine_id)
            if cls is None or cls["coarse_id"] != coarse_id:
                raise load_error(split_path, number, f"class ids ({fine_id}, {coarse_id}) do not match classes.csv")
            listing_id = _grocery_listing_id(relative)
            if listing_id in seen:  # the same photo in two lists is still one listing
                continue
            seen.add(listing_id)
            image = root / relative
            if not image.is_file():
                raise load_error(split_path, number, f"photo {image} does not exist")
            rows.append({
                "listing_id": listing_id,
                "product_id": cls["product_id"],
                "product_line": slugify(cls["coarse"]),
                "title": cls["coarse"].replace("-", " "),
                "image_uri": str(image),
                "source": "grocery",
            })
    return conform(make_catalog(rows))


# ---- WDC Products -------------------------------------------------------------------------

WDC_PRODUCT_LINE = "wdc-products"  # the pair files carry no category: one line for all offers


def _price(price, currency) -> str | None:
    price = _clean(price)
    if price is None:
        return None
    try:
        price = f"{float(price):.2f}"  # the files mix "57.00" and "1.3494E2"
    except ValueError:
        pass
    return f"{price} {currency}" if _clean(currency) else price


def load_wdc_products(root: PathLike, files: Sequence[PathLike] | None = None) -> pl.DataFrame:
    """Offers of the WDC Products pair files, deduplicated by offer id; ``product_id`` is ``cluster_id``.

    ``files`` (names inside ``root`` or paths) defaults to every ``*.json.gz``/``*.json`` file.
    Brand and price become seller attributes; there are no images.
    """
    root = Path(root).absolute()
    require_path(root, "WDC Products folder")
    paths = sorted([*root.glob("*.json.gz"), *root.glob("*.json")]) if files is None else [
        Path(name) if Path(name).is_absolute() else root / name for name in files]
    if not paths:
        raise CatalogLoadError(f"{root}: no WDC Products *.json.gz files found")
    offers: dict[str, dict] = {}
    for path in paths:
        require_path(path, "WDC Products pair file")
        for number, text in read_lines(path):
            if not text.strip():
                continue
            try:
                pair = json.loads(text)
            except json.JSONDecodeError as error:
                raise load_error(path, number, f"not JSON: {error.msg}") from None
            if not isinstance(pair, dict):
                raise load_error(path, number, f"expected a JSON object, got {type(pair).__name__}")
            for side in ("left", "right"):
                missing = [f"{name}_{side}" for name in ("id", "cluster_id", "title") if f"{name}_{side}" not in pair]
                if missing:
                    raise load_error(path, number, f"missing field(s) {missing}")
                offer = _wdc_offer(pair, side)
                known = offers.setdefault(offer["listing_id"], offer)
                if known["product_id"] != offer["product_id"]:
                    raise load_error(path, number, f"offer {pair[f'id_{side}']} has cluster {offer['product_id']}, "
                                              f"before {known['product_id']}")
    return conform(make_catalog(list(offers.values())))


def _wdc_offer(pair: dict, side: str) -> dict:
    """One side (``left``/``right``) of a labelled pair as a catalog row."""
    return {
        "listing_id": f"wdc-{slugify(str(pair[f'id_{side}']))}",
        "product_id": str(pair[f"cluster_id_{side}"]),
        "product_line": WDC_PRODUCT_LINE,
        "title": _clean(pair[f"title_{side}"]),
        "description": _clean(pair.get(f"description_{side}")),
        "seller_attributes": {key: value for key, value in (
            ("brand", _clean(pair.get(f"brand_{side}"))),
            ("price", _price(pair.get(f"price_{side}"), pair.get(f"priceCurrency_{side}"))),
        ) if value},
        "source": "wdc_products",
    }


# ---- Amazon-GoogleProducts ------------------------------------------------------------------

AMAZON_GOOGLE_LINE = "amazon-google"  # matches pair the two tables: a line per table would split every product
_AMAZON_GOOGLE_HEADER = ["id", "title", "description", "manufacturer", "price"]


def _read_hash_table(path: Path) -> dict[str, dict[str, str]]:
    rows: dict[str, dict[str, str]] = {}
    lines = read_lines(path)
    header = next(lines, (1, ""))[1].split("#")
    if header != _AMAZON_GOOGLE_HEADER:
        raise load_error(path, 1, f"expected header {'#'.join(_AMAZON_GOOGLE_HEADER)!r}, got {'#'.join(header)!r}")
    for number, text in lines:
        if not text.strip():
            continue
        fields = text.split("#")
        if len(fields) != len(header):
            raise load_error(path, number, f"expected {len(header)} '#'-separated fields, got {len(fields)}")
        record = dict(zip(header, fields))
        if not record["id"].strip() or record["id"] in rows:
            raise load_error(path, number, f"missing or duplicate id {record['id']!r}")
        rows[record["id"]] = record
    return rows


def load_amazon_google(root: PathLike) -> pl.DataFrame:
    """Amazon-GoogleProducts: both tables, one listing per record, products from the match list.

    A product is a connected component of ``gt.csv`` over both tables (an unmatched record is its
    own product, ``product_id`` = the id of its first listing). Manufacturer and price are seller
    attributes (Amazon's price 0.0 means unknown and is left out).
    """
    root = Path(root).absolute()
    tables = {
        "amazon": _read_hash_table(require_path(root / "amazon.csv", "Amazon table")),
        "gp": _read_hash_table(require_path(root / "gp.csv", "Google Products table")),
    }
    parent: dict[str, str] = {}

    def find(node: str) -> str:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    gt_path = require_path(root / "gt.csv", "match list")
    for number, text in read_lines(gt_path):
        fields = text.strip().split("#")
        if not text.strip() or (number == 1 and not fields[0].isdigit()):  # blank or the "D1#D2" header
            continue
        if len(fields) != 2 or fields[0] not in tables["amazon"] or fields[1] not in tables["gp"]:
            raise load_error(gt_path, number, f"expected 'amazon_id#gp_id' of existing records, got {text!r}")
        a, b = find(f"amazon-{fields[0]}"), find(f"gp-{fields[1]}")
        if a != b:
            parent[max(a, b, key=_listing_order)] = min(a, b, key=_listing_order)
    rows = []
    for table, records in tables.items():
        for record_id, record in records.items():
            listing_id = f"{table}-{record_id}"
            price = _clean(record["price"])
            if price and re.fullmatch(r"0+(\.0*)?", price):  # Amazon writes 0.0 for an unknown price
                price = None
            rows.append({
                "listing_id": listing_id,
                "product_id": find(listing_id),
                "product_line": AMAZON_GOOGLE_LINE,
                "title": _clean(record["title"]),
                "description": _clean(record["description"]),
                "seller_attributes": {key: value for key, value in (
                    ("manufacturer", _clean(record["manufacturer"])),
                    ("price", price),
                ) if value},
                "source": "amazon_google",
            })
    return conform(make_catalog(rows))


def _listing_order(listing_id: str) -> tuple[int, int]:
    """Amazon before Google, then by numeric id: the representative of a product is stable."""
    table, _, number = listing_id.partition("-")
    return (0 if table == "amazon" else 1, int(number) if number.isdigit() else 0)


# ---- Amazon Berkeley Objects samples ----------------------------------------------------------

ABO_PRODUCT_LINE = "abo"
_ABO_VALUE = re.compile(r"\{language_tag=([^,]*), value=(.*?)\}(?=, \{language_tag=|\]$)", re.DOTALL)
_ABO_ATTRIBUTES = {"brand": "brand", "color": "colour", "model_number": "model_number", "material": "material",
                   "fabric_type": "fabric_type", "finish_type": "finish_type", "style": "style"}
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def _abo_values(field) -> list[str]:
    """Values of an ABO field, English first.

    The samples store ``"[{language_tag=en_US, value=...}, ...]"`` strings; ABO's JSON listings
    store the same as a list of dicts, which is accepted too.
    """
    if isinstance(field, list):
        found = [(str(item.get("language_tag")), str(item.get("value", "")))
                 for item in field if isinstance(item, dict)]
    else:
        found = _ABO_VALUE.findall(str(field).strip())
    english = [value for tag, value in found if tag.startswith("en")]
    return [cleaned for value in english + [value for tag, value in found if not tag.startswith("en")]
            if (cleaned := _clean(value))]


def _abo_dimensions(field: str) -> str | None:
    sides = re.findall(r"(height|length|width)=\{normalized_value=\{[^}]*\}, value=([\d.]+), unit=(\w+)\}", str(field))
    if not sides:
        return None
    numbers = " x ".join(f"{float(value):g}" for _, value, _ in sides)
    return f"{numbers} {sides[0][2]} ({', '.join(side for side, _, _ in sides)})"


def _abo_metadata(path: Path) -> dict:
    try:
        metadata = ast.literal_eval(_read_text(path))  # a Python literal; never eval()
    except (SyntaxError, ValueError) as error:
        raise load_error(path, getattr(error, "lineno", None), f"not a Python literal dict: {error}") from None
    if not isinstance(metadata, dict):
        raise load_error(path, 1, f"expected a dict, got {type(metadata).__name__}")
    return metadata


def load_abo(root: PathLike) -> pl.DataFrame:
    """Amazon Berkeley Objects sample folders: each folder a product, each photo in it a listing.

    ``metadata.txt`` gives brand, name (``item_name``, else model name or style, else the first
    bullet point), bullet points as description, and colour, model number, material and
    dimensions as seller attributes. ``product_line`` is ``product_type`` when present, else "abo".
    """
    root = Path(root).absolute()
    require_path(root, "ABO samples folder")
    rows = []
    for folder in sorted(path for path in root.iterdir() if (path / "metadata.txt").is_file()):
        metadata = _abo_metadata(folder / "metadata.txt")
        first = {key: (_abo_values(value) or [None])[0] for key, value in metadata.items()}
        attributes = {name: first[key] for key, name in _ABO_ATTRIBUTES.items() if first.get(key)}
        if dimensions := _abo_dimensions(metadata.get("item_dimensions", "")):
            attributes["dimensions"] = dimensions
        bullets = _abo_values(metadata.get("bullet_point", ""))
        name = first.get("item_name") or first.get("model_name") or first.get("style")
        if not name and bullets:  # no name at all: the first clause of the first bullet point
            name = re.split(r"(?<=[.;!?])\s|\s\(", bullets[0])[0].rstrip(".;!? ")
            name = name if len(name) <= 70 else name[:70].rsplit(" ", 1)[0].rstrip(",;:")
        brand = first.get("brand")
        title = name or brand
        if name and brand and not name.lower().startswith(brand.lower()):
            title = f"{brand} {name}"
        line = slugify(first["product_type"]) if first.get("product_type") else ABO_PRODUCT_LINE
        for photo in sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES):
            rows.append({
                "listing_id": f"abo-{slugify(folder.name)}-{slugify(photo.stem)}",
                "product_id": folder.name,
                "product_line": line,
                "title": title,
                "description": " ".join(bullets) or None,
                "image_uri": str(photo),
                "seller_attributes": attributes,
                "source": "abo",
            })
    return conform(make_catalog(rows))


# ---- by name --------------------------------------------------------------------------------

CATALOG_LOADERS: dict[str, Callable[..., pl.DataFrame]] = {
    "grocery": load_grocery,
    "wdc_products": load_wdc_products,
    "amazon_google": load_amazon_google,
    "abo": load_abo,
}
# The dataset folders' own names are accepted too.
_ALIASES = {"grocery_store": "grocery", "wdc": "wdc_products", "abo_samples": "abo"}


def parse_catalog_spec(spec: str) -> tuple[str, Path]:
    """Split ``"name:path"`` (e.g. ``grocery:../shared/data/grocery_store``) into a loader name and a path."""
    name, sep, path = str(spec).partition(":")
    name = name.strip().lower().replace("-", "_")
    name = _ALIASES.get(name, name)
    if not sep or not path.strip():
        raise ValueError(f"catalog spec {spec!r} is not 'name:path'; names: {sorted(CATALOG_LOADERS)}")
    if name not in CATALOG_LOADERS:
        raise ValueError(f"unknown catalog {name!r} in spec {spec!r}; known: {sorted(CATALOG_LOADERS)}")
    return name, Path(path.strip()).expanduser()


def load_catalog(spec: str, **kwargs) -> pl.DataFrame:
    """Load the catalog that ``spec`` (``name:path``) names; ``kwargs`` go to its loader."""
    name, path = parse_catalog_spec(spec)
    return CATALOG_LOADERS[name](path, **kwargs)
