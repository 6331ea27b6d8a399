"""effnetv2.viz: heat maps, colour bars, overlays, galleries, click → cell, attention mass in a box."""
import numpy as np
import pytest
import torch
from PIL import Image

from effnetv2 import viz


def _brightness(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64).sum(-1)


def test_upsample_is_block_replication_on_non_square_grids():
    values = np.arange(6.0).reshape(2, 3)
    big = viz.upsample_nearest(values, (90, 40))  # (width, height)
    assert big.shape == (40, 90)
    assert np.array_equal(big, np.repeat(np.repeat(values, 20, axis=0), 30, axis=1))
    uneven = viz.upsample_nearest(values, (7, 5))  # blocks differ by at most one pixel
    assert uneven.shape == (5, 7)
    for (row, col), value in np.ndenumerate(values):
        x0, y0, x1, y1 = viz.cell_box((row, col), (2, 3), (7, 5))
        assert np.all(uneven[y0:y1, x0:x1] == value)
    boxes = [viz.cell_box((r, c), (2, 3), (7, 5)) for r in range(2) for c in range(3)]
    assert sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes) == 7 * 5  # the cells tile the image
    with pytest.raises(ValueError, match=r"\[h, w\] map"):
        viz.upsample_nearest(np.zeros((2, 2, 2)), (4, 4))


def test_heatmap_is_brightest_where_the_attention_is():
    maps = torch.full((3, 5), 0.01)
    maps[2, 1] = 0.9  # bottom row, second column
    heat = viz.heatmap(maps, (100, 60))
    assert heat.size == (100, 60) and heat.mode == "RGB"
    bright = _brightness(heat)
    y, x = np.unravel_index(bright.argmax(), bright.shape)
    assert viz.cell_from_click((x, y), heat.size, (3, 5)) == (2, 1)
    x0, y0, x1, y1 = viz.cell_box((2, 1), (3, 5), heat.size)
    assert np.all(bright[y0:y1, x0:x1] == bright.max())  # the whole cell, one block
    assert np.all(np.delete(bright, np.s_[y0:y1], axis=0) < bright.max())
    # values are scaled to [0, vmax]: the same map with a larger vmax is darker
    assert _brightness(viz.heatmap(maps, (100, 60), vmax=2.0)).max() < bright.max()


def test_overlay_blends_with_alpha():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    maps = np.random.default_rng(1).random((2, 3))
    heat = np.asarray(viz.heatmap(maps, image.size), dtype=np.float64)
    for alpha in (0.0, 0.3, 1.0):
        blended = np.asarray(viz.overlay(image, maps, alpha=alpha), dtype=np.float64)
        expected = (1 - alpha) * np.asarray(image, dtype=np.float64) + alpha * heat
        assert np.abs(blended - expected).max() <= 1.0  # uint8 rounding only
    with pytest.raises(ValueError, match="alpha must be in"):
        viz.overlay(image, maps, alpha=1.5)


def test_colorbar_shows_the_scale():
    picture = viz.with_colorbar(Image.new("RGB", (80, 100), "red"), 0.0, 0.5)
    bar = picture.crop((80 + 4, 0, picture.width, 100))
    pixels = _brightness(bar)[:, 2]  # a column inside the colour ramp
    assert picture.height == 100 and pixels[0] > pixels[50] > pixels[99]  # high values bright, at the top
    assert picture.getpixel((10, 10)) == (255, 0, 0) and picture.getpixel((81, 50)) == (255, 255, 255)
    labels = _brightness(bar)[:, 20:]  # the tick labels: dark text on white, saying the values
    assert labels.min() < 300
    other = viz.with_colorbar(Image.new("RGB", (80, 100), "red"), 0.0, 0.9)
    assert not np.array_equal(labels, _brightness(other)[:, 84 + 20:])


def test_head_gallery_has_each_head_and_the_mean():
    maps = torch.zeros(2, 2, 3)
    maps[0, 1, 2] = 1.0  # head 1 looks at the bottom-right cell
    maps[1] = 1 / 6
    view = Image.new("RGB", (90, 60), (0, 0, 0))
    mean, *gallery = viz.head_gallery(view, maps)
    assert [c.split(":")[0] for _, c in [mean, *gallery]] == ["mean of heads", "head 1", "head 2"]  # summary first
    assert "peak 1.000 at cell (1, 2)" in gallery[0][1] and "peak 0.167" in gallery[1][1]
    assert "peak 0.583 at cell (1, 2)" in mean[1]
    first = gallery[0][0]
    assert first.height == 60 and first.width > 90  # the overlay plus its colour bar
    assert sum(first.getpixel((80, 50))) > sum(first.getpixel((10, 10)))


def test_click_to_cell_on_non_square_grids():
    # 90 x 60 image, 2 rows x 3 columns: each cell is 30 x 30 pixels
    assert viz.cell_from_click((0, 0), (90, 60), (2, 3)) == (0, 0)
    assert viz.cell_from_click((29.9, 29.9), (90, 60), (2, 3)) == (0, 0)
    assert viz.cell_from_click((30, 29), (90, 60), (2, 3)) == (0, 1)
    assert viz.cell_from_click((89, 59), (90, 60), (2, 3)) == (1, 2)
    assert viz.cell_from_click((500, -5), (90, 60), (2, 3)) == (0, 2)  # outside: clamped
    # a tall grid on a wide picture: 4 rows x 1 column over 50 x 20 pixels
    assert [viz.cell_from_click((49, y), (50, 20), (4, 1)) for y in (0, 5, 10, 19)] == [(0, 0), (1, 0), (2, 0), (3, 0)]
    # every pixel of a cell's box maps back to that cell
    for cell in [(0, 0), (1, 2), (2, 4)]:
        x0, y0, x1, y1 = viz.cell_box(cell, (3, 5), (101, 67))
        assert {viz.cell_from_click((x, y), (101, 67), (3, 5)) for x in (x0, x1 - 1) for y in (y0, y1 - 1)} == {cell}


def test_grid_image_outlines_the_query_cell():
    picture = viz.grid_image(Image.new("RGB", (90, 60)), (2, 3), (1, 2))
    assert picture.getpixel((60, 30)) == (0, 255, 255) and picture.getpixel((89, 59)) == (0, 255, 255)
    assert picture.getpixel((45, 15)) == (0, 0, 0)
    assert picture.getpixel((30, 15)) == (255, 255, 255)  # a grid line


def _blocks(picture: Image.Image, rows: int, cols: int, cell_px: int) -> np.ndarray:
    """The colour ``[rows, cols, 3]`` of each matrix entry's block; asserts every block is one flat colour."""
    pixels = np.asarray(picture.convert("RGB"))[: rows * cell_px, : cols * cell_px].reshape(rows, cell_px, cols, cell_px, 3)
    inner = pixels[:, 2:-2, :, 2:-2]  # clear of an outline
    assert np.all(inner == inner[:, :1, :, :1])
    return inner[:, 0, :, 0]


def _inferno(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps["inferno"]((values - vmin) / (vmax - vmin))[..., :3] * 255).astype(np.uint8)


def test_matrix_image_colour_follows_the_values():
    values = np.array([[1.0, 0.9, 0.8], [0.7, 0.5, 0.35], [0.2, 0.1, 0.0]])
    picture = viz.matrix_image(values)
    blocks = _blocks(picture, 3, 3, 48)
    # the documented scale: inferno from min(0, min) = 0 to max = 1
    assert np.array_equal(blocks, _inferno(values, 0.0, 1.0))
    lum = blocks.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.array_equal(np.argsort(lum, axis=None), np.argsort(values, axis=None))  # brighter = larger
    # negative scores: the scale starts at the minimum
    signed = viz.matrix_image(values - 0.5)
    assert np.array_equal(_blocks(signed, 3, 3, 48), _inferno(values - 0.5, -0.5, 0.5))


def test_score_matrix_is_the_mean_over_heads_with_the_query_row_outlined():
    weights = torch.zeros(2, 6, 6)
    weights[0, :, 4] = 1.0  # head 1: every query looks at key 4
    weights[1] = torch.eye(6)  # head 2: every query looks at itself
    labelled = viz.score_matrix_image(weights, query=(1, 0), grid=(2, 3))  # cell (1, 0) of a 2x3 grid = row 3
    cell_px = 48  # 384 // 6 entries, capped at 48
    top = labelled.height - 6 * cell_px  # tick labels above the columns and left of the rows
    left = int(np.argmax(np.all(np.asarray(labelled)[top + 3 * cell_px] == (0, 255, 255), axis=-1)))
    assert top >= viz.TICK_FONT_PX and left >= viz.TICK_FONT_PX
    margin = _brightness(labelled)
    for row in range(6):  # each row's label is dark text in the left margin, beside its row
        assert margin[top + row * cell_px + 8: top + (row + 1) * cell_px - 8, :left].min() < 300
    assert margin[top - viz.TICK_FONT_PX - 2: top, left: left + cell_px].min() < 300  # the first column's
    picture = labelled.crop((left, top, labelled.width, labelled.height))
    mean = np.zeros((6, 6))  # worked out by hand: 1 at (4, 4), 0.5 on the rest of column 4 and the diagonal
    mean[:, 4] += 0.5
    mean[np.arange(6), np.arange(6)] += 0.5
    assert np.array_equal(_blocks(picture, 6, 6, cell_px), _inferno(mean, 0.0, 1.0))
    pixels = np.asarray(picture)
    assert tuple(pixels[3 * cell_px, 5]) == (0, 255, 255)  # the outline's top edge, on row 3
    assert tuple(pixels[3 * cell_px + cell_px // 2, 0]) == (0, 255, 255)
    assert tuple(pixels[2 * cell_px + 1, 5]) != (0, 255, 255) and tuple(pixels[4 * cell_px + 2, 5]) != (0, 255, 255)


def test_textbook_gallery_draws_each_heads_matrix():
    """Head i's picture is head i's matrix (row = query) on the documented scale; 6 entries: 48 px blocks."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 6, 6, generator=g) * 2
    example = {"weights": scores.softmax(-1), "head_dim": 16}
    gallery = viz.textbook_gallery(example)
    assert [caption for _, caption in gallery] == [f"head {i}: softmax(Q Kᵀ / √16)" for i in range(1, 5)]
    for (picture, _), matrix in zip(gallery, example["weights"].double().numpy()):
        expected = _inferno(matrix, min(0.0, matrix.min()), matrix.max())
        assert np.array_equal(_blocks(picture, 6, 6, 48), expected)


def test_attribution_gallery_is_signed_with_one_scale():
    shares = torch.zeros(2, 2, 2)
    shares[0, 0, 0] = 2.0  # head 1 pushes towards the class at the top-left cell
    shares[1, 1, 1] = -1.0  # head 2 argues against it at the bottom-right cell
    view = Image.new("RGB", (64, 64), (128, 128, 128))
    summed, *gallery = viz.attribution_gallery(view, shares, "star", alpha=1.0)
    assert [caption for _, caption in [summed, *gallery]] == [
        "all heads: +1.00 towards star (strongest cell (0, 0))",  # the summary first
        "head 1: +2.00 towards star (strongest cell (0, 0))",
        "head 2: -1.00 against star (strongest cell (1, 1))"]
    first, second = (np.asarray(picture)[:64, :64] for picture, _ in gallery[:2])
    # one scale for all, from -2 to +2 (the largest |share|): +2 is the top of matplotlib's RdBu_r (dark
    # red), 0 its middle (white), -1 a quarter of the way up (light blue)
    from matplotlib import colormaps

    expected = {value: (np.asarray(colormaps["RdBu_r"](value)[:3]) * 255).astype(np.uint8) for value in (1.0, 0.5, 0.25)}
    assert np.array_equal(first[10, 10], expected[1.0]) and first[10, 10][0] > first[10, 10][2]
    assert np.array_equal(first[50, 50], expected[0.5]) and np.array_equal(second[10, 10], expected[0.5])
    assert np.array_equal(second[50, 50], expected[0.25]) and second[50, 50][2] > second[50, 50][0]
    assert gallery[0][0].width > 64  # the colour bar is beside the map


def test_score_matrix_labels_do_not_overlap_on_a_6x6_grid():
    """36 rows of 10 px: every second row is labelled, each label in its own band of 16 px text."""
    cells = [f"{r},{c}" for r in range(6) for c in range(6)]
    cell_px = 384 // 36
    labelled = np.asarray(viz.with_axis_ticks(Image.new("RGB", (36 * cell_px,) * 2, "black"), cell_px, cells, "q", "k"))
    top, left = labelled.shape[0] - 36 * cell_px, labelled.shape[1] - 36 * cell_px
    ink = (labelled[top:, :left] < 128).any(axis=(1, 2))  # rows of the left margin with text
    bands = np.flatnonzero(np.diff(np.r_[0, ink.astype(int)]) == 1)  # where each label starts
    assert len(bands) == 18  # rows 0, 2, ..., 34
    assert (np.diff(bands) >= viz.TICK_FONT_PX - 4).all()


def test_explanation_picture_outlines_the_top_cells_with_its_colour_bar_below():
    values = torch.tensor([[0.0, 3.0], [1.0, 2.0]])
    view = Image.new("RGB", (50, 50), (128, 128, 128))
    picture = viz.explanation_picture(view, values, region=2, signed=False)
    size = viz.EXPLANATION_PX
    assert picture.width == size and picture.height > size + viz.TICK_FONT_PX  # the bar and its labels under it
    pixels = np.asarray(picture)
    green = np.all(pixels[:size] == (0, 255, 0), axis=-1)
    half, edge = size // 2, size // 40
    assert green[:, half:].any(axis=0).sum() > size // 4  # the right column: 3 and 2
    assert not green[half:size - 2 * edge, edge:half - 2 * edge].any()
    assert np.array_equal(viz.top_cells(values, 2), np.array([[False, True], [False, True]]))
    signed = np.asarray(viz.explanation_picture(view, torch.tensor([[1.0, -2.0], [0.0, 0.0]]), 1, True))
    x, y = size * 3 // 4, size // 4
    assert signed[y, x, 2] > signed[y, x, 0] and signed[y, y, 0] > signed[y, y, 2]  # blue against, red for


def test_grid_image_draws_the_query_attention_on_the_grid():
    view = Image.new("RGB", (60, 60), (0, 0, 0))
    attn = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    pixels = np.asarray(viz.grid_image(view, (2, 2), (1, 1), attn), int)
    assert pixels[10, 10].sum() > pixels[40, 10].sum() + 100  # the attended cell is bright
    assert tuple(pixels[31, 45]) == (0, 255, 255)  # the query cell's outline


def test_bar_chart_colours_follow_the_sign():
    chart = np.asarray(viz.bar_chart(["head 1", "head 2"], [2.0, -1.0], "adds"), int)
    red = (chart[..., 0] > chart[..., 2] + 60).sum()
    blue = (chart[..., 2] > chart[..., 0] + 60).sum()
    assert red > 0 and blue > 0 and red > blue  # the taller bar is the red one
