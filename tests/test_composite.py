"""tasks/composite.py: rendering a layer onto the canvas never corrupts colours, and the wrap check finds
corruption where it is."""

from __future__ import annotations

import numpy as np

from tasks.composite import RenderSpec, render, to_uint8, wrapped_pixels


def _striped_red_layer() -> np.ndarray:
    """A 40x60 saturated red ellipse with black stripes, hard alpha edge: a cubic upscale overshoots at its edge."""
    h, w = 60, 40
    layer = np.zeros((h, w, 4), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    inside = ((xx - 20) / 18.0) ** 2 + ((yy - 30) / 28.0) ** 2 <= 1
    layer[inside] = (255, 0, 0, 255)
    layer[inside & (xx % 3 == 0)] = (0, 0, 0, 255)
    return layer


def test_render_of_saturated_colours_over_white_has_no_wrapped_pixel():
    layer = _striped_red_layer()
    out = render(layer, None, RenderSpec(resolution=512, background_color="white"))
    assert wrapped_pixels(out) == 0
    red = out[..., 0][out[..., 3] == 255]
    assert red.max() == 255 and (out[..., 3] > 0).sum() > 10_000  # the figure is there, at full colour


def test_render_over_a_bright_background_layer_has_no_wrapped_pixel():
    background = np.full((90, 160, 3), 250, np.uint8)
    out = render(_striped_red_layer(), background, RenderSpec(resolution=256))
    assert wrapped_pixels(out) == 0


def test_to_uint8_clips_instead_of_wrapping():
    assert to_uint8(np.array([-0.2, 0.0, 0.5, 1.0, 1.02, 3.0])).tolist() == [0, 0, 128, 255, 255, 255]


def test_the_wrap_check_finds_a_wrapped_contour_and_nothing_in_clean_pictures():
    image = np.full((128, 128, 3), 255, np.uint8)
    image[20:100, 30:90] = (230, 20, 30)
    assert wrapped_pixels(image) == 0
    image[20, 30:60] = (4, 255, 255)  # red 260 cast without a clip
    assert wrapped_pixels(image) == 30
    dark = np.full((64, 64, 3), 255, np.uint8)
    dark[30:34, 10:50] = (10, 10, 10)  # a black outline is not a wrapped colour
    assert wrapped_pixels(dark) == 0


def _figure_with(*parts: tuple[int, int, int, int]) -> np.ndarray:
    """A 100x100 layer: a 40x60 body at (30, 20), plus opaque boxes (x, y, w, h)."""
    layer = np.zeros((100, 100, 4), np.uint8)
    layer[20:80, 30:70] = (0, 128, 0, 255)
    for x, y, w, h in parts:
        layer[y:y + h, x:x + w] = (200, 100, 0, 255)
    return layer


def test_a_crumb_of_scenery_apart_from_the_figure_is_dropped_and_does_not_shrink_it():
    from tasks.composite import drop_crumbs

    crumb = (92, 2, 6, 6)  # a leaf in the top right corner, far from the body
    layer = _figure_with(crumb)
    cleaned = drop_crumbs(layer)
    assert cleaned[2:8, 92:98, 3].max() == 0 and (cleaned[20:80, 30:70, 3] == 255).all()
    spec = RenderSpec(resolution=128, fill=0.8)
    with_crumb, without = render(layer, None, spec), render(_figure_with(), None, spec)
    assert np.array_equal(with_crumb, without)  # the crop is the body's: the figure keeps its size


def test_a_hand_held_apart_by_a_gap_and_a_large_part_stay():
    from tasks.composite import drop_crumbs

    hand = (71, 40, 5, 5)  # 2 px beside the body (x 30..69): within the gap
    large = (0, 0, 20, 20)  # far away, but over a tenth of the body's area: not a crumb
    for part in (hand, large):
        layer = _figure_with(part)
        assert np.array_equal(drop_crumbs(layer), layer), part
