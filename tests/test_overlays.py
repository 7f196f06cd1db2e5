"""One display rule for every painted activation map (report, `dml-ray explain`, explain gallery):
ReLU, then divide by the maximum (what activation-decomposition-tip2021's figures and the authors' code
show), so negative evidence is never painted as weak positive."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest

from dml_ray.report.overlays import overlay, to_pixels


def test_signed_map_shows_positive_evidence_only_scaled_by_its_max():
    signed = np.array([[-4.0, 0.0], [1.0, 2.0]], dtype=np.float32)
    shown = to_pixels(signed, (2, 2))  # same size: no interpolation
    np.testing.assert_allclose(shown, [[0.0, 0.0], [0.5, 1.0]])
    # min-max stretching would have painted the most negative cell 0 and the zero cell 4 / 6
    assert shown[0, 1] == 0.0
    # upsampled: values stay in [0, 1], the maximum reaches 1, every negative-only region stays 0
    up = to_pixels(signed, (20, 20))
    assert up.min() == 0.0 and up.max() == pytest.approx(1.0)
    assert (up[:5, :5] == 0).all()


@pytest.mark.parametrize("grid", [np.full((3, 3), -1.0), np.zeros((3, 3)), np.full((3, 3), 2.5)])
def test_maps_without_contrast(grid):
    shown = to_pixels(grid, (7, 5))
    assert shown.shape == (7, 5)
    expected = 1.0 if grid.max() > 0 else 0.0  # a constant positive map is all evidence, a non-positive one none
    np.testing.assert_allclose(shown, expected, rtol=1e-6)


def test_overlay_paints_the_rule():
    fig, ax = plt.subplots()
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    activation = np.array([[-3.0, 1.0], [0.5, -1.0]], dtype=np.float32)
    overlay(ax, image, activation, "t")
    painted = ax.images[1]
    np.testing.assert_allclose(painted.get_array(), to_pixels(activation, (8, 8)))
    assert painted.get_clim() == (0.0, 1.0)
    plt.close(fig)
