"""Pictures for asset metadata: retrieval examples and training curves."""

import io

import numpy as np
from PIL import Image

from afmrl_dagster.plots import curve_png, retrieval_examples, retrieval_grid_png

GREEN, RED, GREY = (46, 158, 68), (208, 49, 45), (136, 136, 136)


def test_retrieval_examples_rank_other_rows_and_mark_the_same_product():
    embeddings = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    products = ["a", "a", "b", "c"]
    (query, results), = retrieval_examples([0], embeddings, products, k=3)
    assert query == 0 and [row for row, _, _ in results] == [1, 3, 2]  # itself left out
    assert [correct for _, _, correct in results] == [True, False, False]
    assert results[0][1] > results[1][1] > results[2][1]


def test_grid_frames_query_grey_and_results_green_or_red():
    examples = [(0, [(1, 0.9, True), (2, 0.5, False)]), (3, [(2, 0.7, False), (1, 0.1, True)])]
    photo = Image.new("RGB", (50, 40), (10, 20, 200))
    png = retrieval_grid_png(examples, lambda row: None if row == 2 else photo, lambda row: f"listing {row}", tile=64)
    picture = Image.open(io.BytesIO(png)).convert("RGB")
    assert picture.size == (3 * (64 + 6) + 6, 2 * (64 + 28 + 6) + 6)

    def frame(column: int, line: int):
        return picture.getpixel((6 + column * 70 + 1, 6 + line * 98 + 1))

    assert frame(0, 0) == GREY and frame(1, 0) == GREEN and frame(2, 0) == RED
    assert frame(1, 1) == RED and frame(2, 1) == GREEN
    assert picture.getpixel((6 + 70 + 32, 6 + 32)) == (10, 20, 200)  # the photo inside the frame


def test_curve_png_draws_one_panel_per_known_key():
    png = curve_png([{"epoch": 0, "loss": 2.0}, {"epoch": 1, "loss": 1.0}], ["loss", "missing"], "epoch", "training")
    assert Image.open(io.BytesIO(png)).size[0] >= 200
