"""2-D projection: PCA recovers a plane exactly, is deterministic, and fails clearly."""

from __future__ import annotations

import numpy as np
import pytest

from ml.projection import Projection, project_2d


def _plane(n: int, d: int, seed: int) -> np.ndarray:
    """n points on a random 2-D plane (through an offset) in d dimensions."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(d, 2)))  # orthonormal columns
    coords = rng.normal(size=(n, 2)) * np.array([3.0, 1.0])
    return (coords @ basis.T + rng.normal(size=d)).astype(np.float32)


def _pairwise(points: np.ndarray) -> np.ndarray:
    p = points.astype(np.float64)
    return np.linalg.norm(p[:, None, :] - p[None, :, :], axis=2)


def test_pca_of_a_plane_explains_everything_and_keeps_distances() -> None:
    vectors = _plane(300, 16, seed=0)
    projection = project_2d(vectors)
    assert isinstance(projection, Projection)
    assert projection.method == "pca"
    assert projection.xy.shape == (300, 2)
    assert projection.xy.dtype == np.float32
    assert projection.fit_rows == 300
    ratio = projection.explained_variance_ratio
    assert ratio is not None
    assert ratio.shape == (2,)
    assert ratio.sum() == pytest.approx(1.0, abs=1e-5)
    assert ratio[0] > ratio[1]  # the plane's long axis (std 3) comes first
    np.testing.assert_allclose(_pairwise(projection.xy), _pairwise(vectors), atol=1e-3)


def test_pca_of_a_noisy_cloud_explains_less() -> None:
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(400, 10)).astype(np.float32)
    ratio = project_2d(vectors).explained_variance_ratio
    assert ratio is not None
    assert 0.15 < ratio.sum() < 0.5  # two of ten isotropic dimensions: ~0.2 to 0.3


def test_fitted_on_a_sample_applied_to_all_rows() -> None:
    vectors = _plane(2000, 8, seed=2)
    projection = project_2d(vectors, fit_sample=100, seed=5)
    assert projection.fit_rows == 100
    assert projection.xy.shape == (2000, 2)
    assert np.isfinite(projection.xy).all()
    # A plane is a plane from any 100 of its points: geometry is kept for every row.
    some = np.arange(0, 2000, 40)
    np.testing.assert_allclose(_pairwise(projection.xy[some]), _pairwise(vectors[some]), atol=1e-3)


def test_deterministic_for_the_same_seed() -> None:
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(1000, 12)).astype(np.float32)
    first = project_2d(vectors, fit_sample=200, seed=7)
    again = project_2d(vectors, fit_sample=200, seed=7)
    np.testing.assert_array_equal(first.xy, again.xy)
    other = project_2d(vectors, fit_sample=200, seed=8)
    assert not np.array_equal(first.xy, other.xy)


def test_rejects_bad_input() -> None:
    good = _plane(10, 4, seed=0)
    with pytest.raises(ValueError, match="at least 3 rows"):
        project_2d(good[:2])
    with pytest.raises(ValueError, match="2-D"):
        project_2d(good[0])
    with pytest.raises(ValueError, match="at least 2 columns"):
        project_2d(good[:, :1])
    with pytest.raises(ValueError, match="unknown projection method 'umap'"):
        project_2d(good, method="umap")
    with pytest.raises(ValueError, match="fit_sample"):
        project_2d(good, fit_sample=2)
    with pytest.raises(ValueError, match="identical"):
        project_2d(np.ones((5, 3), dtype=np.float32))


def test_non_finite_rows_are_named_inside_and_outside_the_fit_sample() -> None:
    vectors = _plane(50, 4, seed=0)
    vectors[7, 2] = np.nan
    with pytest.raises(ValueError, match="row 7"):
        project_2d(vectors)
    # Whether or not the 3-row fit sample holds row 49, the error names it.
    vectors = _plane(50, 4, seed=0)
    vectors[49, 0] = np.inf
    with pytest.raises(ValueError, match="row 49"):
        project_2d(vectors, fit_sample=3)
