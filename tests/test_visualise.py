"""stepwise.visualise: sample grids a person can see, deterministic PNGs, the figure conventions."""
import hashlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

from stepwise.visualise import (GRID_PADDING, MIN_GRID_WIDTH, TITLE_BAND, empty_panel, figure_png, grid_array,
                                grid_png, label_axes, needs_log, pyplot, save_figure, save_grid, series_style)


def images(n=64, c=1, size=28, seed=0):
    return torch.randint(0, 256, (n, c, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def png_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def test_small_images_are_upscaled_nearest_neighbour():
    x = images()
    grid = grid_array(x, nrow=8)  # 28 px images, 8 per row: scale 3
    assert grid.shape == (8 * 84 + 9 * GRID_PADDING, 8 * 84 + 9 * GRID_PADDING, 3)
    assert grid.shape[1] >= MIN_GRID_WIDTH
    first = grid[GRID_PADDING:GRID_PADDING + 84, GRID_PADDING:GRID_PADDING + 84, 0]  # image 0, upscaled
    assert np.array_equal(first, np.kron(x[0, 0].numpy(), np.ones((3, 3), dtype=np.uint8)))
    big = grid_array(images(4, 3, 300), nrow=2)  # already wide: no upscaling
    assert big.shape[1] == 2 * 300 + 3 * GRID_PADDING


def test_grid_png_with_and_without_title():
    x = images(16, 3, 8)
    plain, titled = grid_png(x), grid_png(x, title="unified, step 1000")
    w, h = png_size(plain)
    assert w >= MIN_GRID_WIDTH and png_size(titled) == (w, h + TITLE_BAND)
    assert grid_png(x, title="unified, step 1000") == titled  # deterministic
    assert grid_png(x, title="tdc, step 1000") != titled
    for data in (plain, titled):
        assert b"tEXt" not in data and b"tIME" not in data and b"Software" not in data
    # the title band sits above the untouched grid pixels
    pixels = np.asarray(Image.open(io.BytesIO(titled)).convert("RGB"))
    assert np.array_equal(pixels[TITLE_BAND:], np.asarray(Image.open(io.BytesIO(plain)).convert("RGB")))
    assert (pixels[:TITLE_BAND] < 128).any()  # some dark title text


def test_save_grid_keeps_the_old_call_and_is_byte_identical(tmp_path):
    x = images(5, 3, 8)
    save_grid(x, tmp_path / "a.png")
    save_grid(x, tmp_path / "b.png")
    save_grid(x, tmp_path / "t.png", nrow=5, title="pruned, step 50")
    assert hashlib.sha256((tmp_path / "a.png").read_bytes()).digest() == \
        hashlib.sha256((tmp_path / "b.png").read_bytes()).digest()
    assert png_size((tmp_path / "t.png").read_bytes())[0] >= MIN_GRID_WIDTH


def test_needs_log():
    assert needs_log([1.0, 0.5, 0.001])
    assert not needs_log([1.0, 0.5, 0.2])  # within two decades: linear reads fine
    assert not needs_log([0.0, 1.0, 1000.0])  # zero cannot sit on a log axis
    assert not needs_log([])
    assert needs_log([float("nan"), 1.0, 1e-3])


def test_series_styles_differ_in_more_than_colour():
    styles = [series_style(i, 10, ordered=True) for i in range(10)]
    for a, b in zip(styles, styles[1:]):
        assert a["linestyle"] != b["linestyle"] and a["marker"] != b["marker"] and a["color"] != b["color"]


def test_figure_conventions_and_empty_panel(tmp_path):
    fig, (ax, ax2) = pyplot().subplots(1, 2, figsize=(6, 3))
    ax.plot([0, 1, 2], [1, 0.1, 0.001])
    label_axes(ax, "loss", "training step", "loss (MSE)", values=[1, 0.1, 0.001])
    empty_panel(ax2, "pruning", "not run by design")
    assert ax.get_yscale() == "log" and ax.get_title() == "loss" and ax.get_xlabel() == "training step"
    assert [t.get_text() for t in ax2.texts] == ["not run by design"] and not ax2.get_xticks().size
    save_figure(fig, tmp_path / "f.png")
    data = (tmp_path / "f.png").read_bytes()
    assert b"Software" not in data

    def draw():
        f, a = pyplot().subplots(figsize=(3, 2))
        a.plot([0, 1], [0, 1])
        label_axes(a, "t", "x", "y")
        return figure_png(f)

    assert draw() == draw()


@pytest.mark.parametrize("c", [1, 3])
def test_channels(c):
    assert grid_array(images(4, c, 8)).shape[2] == 3


def test_sample_grids_are_titled_with_model_training_and_sampling():
    from types import SimpleNamespace

    from stepwise.evaluation import grid_title

    scfg = SimpleNamespace(sampler="ddim", steps=50, seed=3)
    assert grid_title("unified", {"steps": 1000}, scfg) == "unified, 1000 training steps; ddim, 50 sampling steps, seed 3"
    assert grid_title("TDC ensemble of 4 experts", {}, scfg).startswith("TDC ensemble of 4 experts; ddim")
