"""Training curves as PNG bytes, for MLflow artefacts."""

from __future__ import annotations

import io


def curve_png(history: list[dict], keys: list[str], x_key: str, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [key for key in keys if history and key in history[0]]
    figure, axes = plt.subplots(1, max(1, len(keys)), figsize=(4 * max(1, len(keys)), 3), squeeze=False)
    for axis, key in zip(axes[0], keys):
        axis.plot([row[x_key] for row in history], [row[key] for row in history])
        axis.set_title(key)
        axis.set_xlabel(x_key)
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return buffer.getvalue()


def retrieval_examples(
    query_rows: list[int], embeddings, product_ids: list[str], k: int = 4
) -> list[tuple[int, list[tuple[int, float, bool]]]]:
    """For each query row: its top-``k`` other rows of ``embeddings`` (unit vectors) as
    ``(row, score, same product)``, best first; the query itself is left out."""
    import numpy as np

    matrix = np.asarray(embeddings, dtype=np.float32)
    examples = []
    for row in query_rows:
        scores = matrix @ matrix[row]
        scores[row] = -np.inf
        best = np.argsort(-scores, kind="stable")[:k]
        examples.append((row, [(int(j), float(scores[j]), product_ids[j] == product_ids[row]) for j in best]))
    return examples


def retrieval_grid_png(
    examples: list[tuple[int, list[tuple[int, float, bool]]]],
    image_of,
    title_of,
    tile: int = 112,
) -> bytes:
    """A picture of retrieval results: one line per query, the query's photo first (grey frame),
    then its results with a green frame when they show the same product and a red one when not.

    ``image_of(row)`` gives a PIL image or None (drawn as a blank tile), ``title_of(row)`` the
    caption under the tile."""
    from PIL import Image, ImageDraw, ImageOps

    columns = 1 + max((len(results) for _, results in examples), default=0)
    caption, frame, gap = 28, 5, 6
    width, height = columns * (tile + gap) + gap, len(examples) * (tile + caption + gap) + gap
    canvas = Image.new("RGB", (width, max(height, tile)), "white")
    draw = ImageDraw.Draw(canvas)

    def place(row: int, column: int, line: int, colour: str, label: str) -> None:
        x, y = gap + column * (tile + gap), gap + line * (tile + caption + gap)
        draw.rectangle([x, y, x + tile - 1, y + tile - 1], fill=colour)
        image = image_of(row)
        inner = tile - 2 * frame
        if image is not None:
            canvas.paste(ImageOps.fit(image.convert("RGB"), (inner, inner)), (x + frame, y + frame))
        else:
            draw.rectangle([x + frame, y + frame, x + tile - frame - 1, y + tile - frame - 1], fill="#eeeeee")
        for offset, text in enumerate([label, title_of(row)]):
            draw.text((x, y + tile + 1 + offset * 13), text[: tile // 6], fill="black")

    for line, (query, results) in enumerate(examples):
        place(query, 0, line, "#888888", "query")
        for column, (row, score, correct) in enumerate(results, start=1):
            place(row, column, line, "#2e9e44" if correct else "#d0312d", f"#{column} {score:.2f} {'same' if correct else 'other'}")
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def held_out_examples_png(catalog, embeddings, query_mask, read_image, count: int, k: int = 4) -> bytes:
    """The first ``count`` queries of ``query_mask`` by listing id whose product has another
    listing, with their top-``k`` results (the same pictures every run); ``read_image(uri)``
    gives a decoded image."""
    import numpy as np

    products = catalog["product_id"].to_list()
    shared = {product for product, n in catalog.group_by("product_id").len().rows() if n > 1}
    order = np.argsort(np.array(catalog["listing_id"].to_list()), kind="stable")
    rows = [int(i) for i in order if query_mask[i] and products[i] in shared][:count]
    uris, titles = catalog["image_uri"].to_list(), catalog["title"].to_list()
    return retrieval_grid_png(retrieval_examples(rows, embeddings, products, k=k),
                              lambda row: read_image(uris[row]) if uris[row] else None, lambda row: titles[row])
