"""Engagement (reactions normalised by audience and age) and the preference pairs built from it."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest

from ml.preferences.engagement import (
    REACTION_COLUMNS,
    EngagementConfig,
    build_pairs,
    engagement,
    engagement_details,
    engagement_pairs,
    estimate_shrinkage,
    heldout_images,
    split_pairs_by_image,
)

AS_OF = datetime(2025, 6, 1, tzinfo=UTC)


def columns(likes, users, ages_days, **counts):
    """A column mapping: ``likes`` per image, other counts 0 unless given, createdAt from ages."""
    n = len(likes)
    out = {name: np.zeros(n, dtype=np.int64) for name in REACTION_COLUMNS}
    out["likeCount"] = np.asarray(likes)
    for name, values in counts.items():
        out[name] = np.asarray(values)
    as_of = np.datetime64(AS_OF.replace(tzinfo=None), "us")
    ages = np.asarray(ages_days, dtype=np.float64)
    out["createdAt"] = as_of - (ages * 86_400e6).astype("timedelta64[us]")
    out["userHash"] = np.asarray(users, dtype=object)
    return out


def spearman(a, b):
    ra = np.argsort(np.argsort(a))
    rb = np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_reach_and_age_do_not_make_an_image_win():
    """Reactions = audience x exposure(age) x appeal: raw counts follow the uploader's reach and
    the image's age; engagement follows the appeal."""
    rng = np.random.default_rng(0)
    users, ages, appeal, reach = [], [], [], []
    for u in range(40):
        audience = 2000.0 if u % 2 == 0 else 20.0  # half the uploaders have 100x the reach
        for _ in range(12):
            users.append(f"u{u}")
            ages.append(rng.uniform(2, 120))
            appeal.append(rng.lognormal(0, 0.7))
            reach.append(audience)
    ages, appeal, reach = np.array(ages), np.array(appeal), np.array(reach)
    exposure = 1 - np.exp(-ages / 30)
    likes = np.round(reach * exposure * appeal).astype(np.int64)
    result = engagement_details(columns(likes, users, ages), AS_OF)
    values = result.values
    assert np.isfinite(values).all()
    assert result.shrinkage < 1.0  # audiences differ a lot: the estimate trusts the uploader
    assert spearman(values, appeal) > 0.85
    assert spearman(likes, appeal) < 0.6
    top = len(values) // 10
    famous = reach > 100
    assert famous[np.argsort(-likes)[:top]].all()  # raw: the top 10 % are all famous
    assert famous[np.argsort(-values)[:top]].mean() < 0.75  # engagement: about half

    famous_worst = np.flatnonzero(famous)[np.argmin(appeal[famous])]
    small_best = np.flatnonzero(~famous)[np.argmax(appeal[~famous])]
    assert likes[famous_worst] > likes[small_best]
    assert values[small_best] > values[famous_worst]


def test_shrinkage_is_estimated_from_how_much_audiences_differ():
    rng = np.random.default_rng(9)
    codes = np.repeat(np.arange(50), 8)
    noise = rng.normal(0, 1, codes.size)
    apart = estimate_shrinkage(codes, noise + 2 * rng.normal(0, 1, 50)[codes])
    alike = estimate_shrinkage(codes, noise)
    assert apart is not None and alike is not None
    assert apart < 0.1 * alike  # sigma_w^2 / sigma_b^2: 1/4 vs (almost) no between variance
    assert apart == pytest.approx(1 / 4, rel=0.5)
    far_apart = estimate_shrinkage(codes, noise + 100 * rng.normal(0, 1, 50)[codes])
    assert far_apart == 0.1  # clamped
    assert estimate_shrinkage(codes[:16], noise[:16]) is None  # two uploaders: too few
    fixed = engagement_details(
        columns([1, 5, 9, 30], ["a", "a", "b", "b"], [40] * 4), AS_OF, EngagementConfig(shrinkage=2)
    )
    assert fixed.shrinkage == 2.0
    fallback = engagement_details(columns([1, 5, 9], ["a", "a", "b"], [40] * 3), AS_OF)
    assert fallback.shrinkage == EngagementConfig().fallback_shrinkage


def test_an_old_image_does_not_beat_a_better_recent_one():
    # Same uploader; the old image has twice the likes of the recent one, which has had only
    # 28 % of its exposure (10 days, tau 30) and so is ~1.8x as appealing per view.
    users = ["a"] * 6
    likes = [100, 50, 60, 60, 60, 60]
    ages = [365, 10, 200, 200, 200, 200]
    values = engagement(columns(likes, users, ages), AS_OF)
    assert likes[0] > likes[1]
    assert values[1] > values[0]


def test_exposure_and_reactions_follow_the_documented_formula():
    table = columns(
        likes=[10, 3, 0],
        users=["a", "b", "c"],
        ages_days=[30, 90, 5],
        heartCount=[4, 0, 0],
        commentCount=[2, 0, 0],
        laughCount=[4, 0, 0],
        cryCount=[0, 0, 4],
        dislikeCount=[1, 10, 0],
    )
    result = engagement_details(table, AS_OF)
    # 10 + 4 + 0.5*2 + 0.25*4 - 1 = 15; 3 - 10 floors at 0; 0.25*4 = 1
    np.testing.assert_allclose(result.reactions, [15.0, 0.0, 1.0])
    np.testing.assert_allclose(result.exposure, 1 - np.exp(-np.array([1.0, 3.0, 5 / 30])))
    np.testing.assert_allclose(result.log_reactions, np.log1p(result.reactions / result.exposure))
    assert result.log_reactions[1] == 0.0  # no reactions is 0 whatever the age


def test_leave_one_out_excludes_the_image_itself():
    users = ["a", "a", "a", "b", "c"]
    ages = [100] * 5
    base = columns([5, 20, 80, 7, 9], users, ages)
    boosted = columns([5000, 20, 80, 7, 9], users, ages)
    before = engagement_details(base, AS_OF)
    after = engagement_details(boosted, AS_OF)
    # image 0's own reactions do not move its audience, they do move its uploader-mates'
    assert after.audience[0] == pytest.approx(before.audience[0])
    assert after.audience[1] != pytest.approx(before.audience[1])
    assert after.values[0] > before.values[0]
    # by hand: two others (median = mean of the two), k = 5 pseudo-images at the global mean
    z = before.log_reactions
    mu = z[1:].mean()  # the prior leaves the image out too
    expected = (2 * np.median(z[[1, 2]]) + 5 * mu) / (2 + 5)
    assert before.audience[0] == pytest.approx(expected)


def test_audience_matches_a_brute_force_leave_one_out_median():
    rng = np.random.default_rng(3)
    n = 400
    users = rng.choice([f"u{i}" for i in range(30)], size=n).astype(object)
    users[rng.random(n) < 0.05] = None  # no uploader: on its own
    likes = rng.integers(0, 500, n)
    ages = rng.uniform(2, 300, n)
    ages[:15] = 0.5  # too new (< 1 day): excluded from everyone's audience
    config = EngagementConfig(shrinkage=3.0)
    result = engagement_details(columns(likes, users, ages), AS_OF, config)
    valid = result.valid
    assert 0 < (~valid).sum() < n
    z = result.log_reactions
    assert result.global_mean == pytest.approx(z[valid].mean())
    checked = 0
    for i in np.flatnonzero(valid):
        mu = (z[valid].sum() - z[i]) / (valid.sum() - 1)
        if users[i] is None:
            others = np.empty(0)
        else:
            mates = (users == users[i]) & valid
            mates[i] = False
            others = result.log_reactions[mates]
        m = others.size
        expected = (m * np.median(others) + 3.0 * mu) / (m + 3.0) if m else mu
        assert result.audience[i] == pytest.approx(expected, abs=1e-12)
        checked += 1
    assert checked == valid.sum()
    assert result.n_uploaders == len({u for u, ok in zip(users, valid, strict=True) if ok and u})


def test_single_image_uploader_gets_the_global_mean():
    result = engagement_details(columns([3, 300, 30, 12], ["a", "b", "b", "b"], [50] * 4), AS_OF)
    z = result.log_reactions
    assert result.audience[0] == pytest.approx(z[1:].mean())  # everyone else's mean
    assert result.values[0] == pytest.approx(z[0] - z[1:].mean())
    # shrinkage: with 2 others, the uploader's median gets weight 2 / (2 + 5)
    prior = z[[0, 2, 3]].mean()
    assert result.audience[1] == pytest.approx((2 * z[[2, 3]].mean() + 5 * prior) / 7)


def test_bad_rows_are_nan_counted_and_do_not_touch_the_others():
    as_of = datetime(2025, 6, 1)
    created = [as_of - timedelta(days=d) for d in (40, 40, 40, 40, 40, 40, 0.5)]
    created[2] = None
    created[3] = as_of + timedelta(days=2)
    table = pa.table(
        {
            "likeCount": pa.array([10, None, 5, 5, 8, -3, 4], pa.int64()),
            "heartCount": pa.array([1, 1, 1, 1, 1, 1, 1], pa.int64()),
            "commentCount": pa.array([0, 0, 0, 0, 0, 0, 0], pa.int64()),
            "laughCount": pa.array([0, 0, 0, 0, 0, 0, 0], pa.int64()),
            "cryCount": pa.array([0, 0, 0, 0, 0, 0, 0], pa.int64()),
            "dislikeCount": pa.array([0, 0, 0, 0, 0, 0, 0], pa.int64()),
            "createdAt": pa.array(created, pa.timestamp("us")),
            "userHash": pa.array(["a", "a", "a", "a", "a", "a", "b"]),
        }
    )
    result = engagement_details(table, as_of)
    assert result.excluded == {
        "missing_count": 1,
        "missing_created_at": 1,
        "created_after_as_of": 1,
        "too_new": 1,
        "negative_count": 1,
    }
    assert np.isnan(result.values[[1, 2, 3, 5, 6]]).all()
    assert np.isfinite(result.values[[0, 4]]).all()
    clean = engagement_details(table.take([0, 4]), as_of)
    np.testing.assert_allclose(result.values[[0, 4]], clean.values)
    assert result.metrics()["n_valid"] == 2


def test_engagement_logs_the_excluded_counts(caplog):
    import logging

    log = logging.getLogger("test.engagement")
    with caplog.at_level(logging.WARNING, logger="test.engagement"):
        values = engagement(columns([1, 2], ["a", "a"], [10, 0.1]), AS_OF, log=log)
    assert np.isnan(values[1]) and np.isfinite(values[0])
    assert "too_new: 1" in caplog.text


def test_missing_or_mistyped_columns_are_errors():
    table = columns([1, 2], ["a", "b"], [10, 20])
    del table["cryCount"]
    with pytest.raises(ValueError, match="cryCount"):
        engagement_details(table, AS_OF)
    table = columns([1, 2], ["a", "b"], [10, 20])
    table["createdAt"] = np.array([1.0, 2.0])
    with pytest.raises(TypeError, match="createdAt"):
        engagement_details(table, AS_OF)
    with pytest.raises(ValueError, match="tau_days"):
        EngagementConfig(tau_days=0)
    with pytest.raises(ValueError, match="dislike_weight"):
        EngagementConfig(dislike_weight=1.0)


# ---------------------------------------------------------------------------------------------
# Pairs


def brute_force_pairs(cluster, values, margin):
    return {
        (i, j)
        for i in range(len(values))
        for j in range(len(values))
        if cluster[i] >= 0
        and cluster[i] == cluster[j]
        and np.isfinite(values[i])
        and np.isfinite(values[j])
        and values[i] - values[j] >= margin
    }


def test_pairs_are_exactly_the_qualifying_pairs_when_under_the_cap():
    rng = np.random.default_rng(1)
    n = 120
    cluster = rng.integers(-1, 5, n)
    values = np.round(rng.normal(0, 1, n), 1)  # on a 0.1 grid: margins where rounding bites
    values[rng.random(n) < 0.05] = np.nan
    winner, loser = engagement_pairs(cluster, values, 0.3, 10_000, seed=0)
    got = set(zip(winner.tolist(), loser.tolist(), strict=True))
    expected = brute_force_pairs(cluster, values, 0.3)
    assert len(expected) > 100
    assert got == expected
    assert len(got) == winner.size  # no pair twice


def test_pairs_respect_cluster_margin_cap_and_never_self_pair():
    rng = np.random.default_rng(2)
    n = 3000
    cluster = rng.integers(-1, 12, n)
    values = rng.normal(0, 1, n)
    winner, loser = engagement_pairs(cluster, values, 0.5, 200, seed=7)
    assert winner.size > 0 and winner.dtype == np.int64
    assert (cluster[winner] == cluster[loser]).all()
    assert (cluster[winner] >= 0).all()
    assert (values[winner] - values[loser] >= 0.5).all()
    assert (winner != loser).all()
    per_cluster = np.bincount(cluster[winner], minlength=12)
    np.testing.assert_array_equal(per_cluster, np.full(12, 200))  # every cluster has > 200
    assert len(set(zip(winner.tolist(), loser.tolist(), strict=True))) == winner.size


def test_pairs_are_deterministic_and_per_cluster():
    rng = np.random.default_rng(4)
    n = 2000
    cluster = rng.integers(0, 6, n)
    values = rng.normal(0, 1, n)
    a = engagement_pairs(cluster, values, 0.5, 100, seed=3)
    b = engagement_pairs(cluster, values, 0.5, 100, seed=3)
    c = engagement_pairs(cluster, values, 0.5, 100, seed=4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    # cluster 0's pairs do not depend on the other clusters being there
    only0 = engagement_pairs(cluster, values, 0.5, 100, seed=3, eligible=cluster == 0)
    in0 = cluster[a[0]] == 0
    np.testing.assert_array_equal(only0[0], a[0][in0])
    np.testing.assert_array_equal(only0[1], a[1][in0])


def test_pairs_edge_cases():
    empty = engagement_pairs(np.array([], dtype=np.int64), np.array([]), 0.5, 10)
    assert empty[0].size == 0 and empty[1].size == 0
    noise_only = engagement_pairs(np.array([-1, -1]), np.array([0.0, 5.0]), 0.5, 10)
    assert noise_only[0].size == 0
    too_close = engagement_pairs(np.array([0, 0]), np.array([0.0, 0.4]), 0.5, 10)
    assert too_close[0].size == 0
    with pytest.raises(ValueError, match="margin"):
        engagement_pairs(np.array([0, 0]), np.array([0.0, 1.0]), 0.0, 10)
    with pytest.raises(ValueError, match="max_pairs_per_cluster"):
        engagement_pairs(np.array([0, 0]), np.array([0.0, 1.0]), 0.5, 0)
    with pytest.raises(ValueError, match="same length"):
        engagement_pairs(np.array([0, 0, 0]), np.array([0.0, 1.0]), 0.5, 10)
    with pytest.raises(TypeError, match="integers"):
        engagement_pairs(np.array([0.0, 0.0]), np.array([0.0, 1.0]), 0.5, 10)


# ---------------------------------------------------------------------------------------------
# Held-out split


def test_heldout_images_is_a_stable_hash_of_the_id():
    ids = np.arange(1, 200_001, dtype=np.int64) * 7919
    held = heldout_images(ids, 0.1)
    assert 0.095 < held.mean() < 0.105
    np.testing.assert_array_equal(held, heldout_images(ids[::-1], 0.1)[::-1])  # order-free
    assert not heldout_images(ids, 0.0).any()
    assert (heldout_images(ids, 0.05) <= held).all()  # nested: a smaller share is a subset
    assert not np.array_equal(held, heldout_images(ids, 0.1, salt=1))
    with pytest.raises(ValueError, match="fraction"):
        heldout_images(ids, 1.0)


def images_of(winner, loser):
    return set(winner.tolist()) | set(loser.tolist())


def test_build_pairs_shares_no_image_between_train_and_heldout():
    rng = np.random.default_rng(5)
    n = 5000
    ids = rng.permutation(10**6)[:n].astype(np.int64)
    cluster = rng.integers(-1, 20, n)
    values = rng.normal(0, 1, n)
    split = build_pairs(ids, cluster, values, 0.5, 300, heldout_fraction=0.2, seed=0)
    assert split.n_train > 1000 and split.n_heldout > 100
    train_images = images_of(*split.train)
    heldout_images_ = images_of(*split.heldout)
    assert train_images.isdisjoint(heldout_images_)
    held = heldout_images(ids, 0.2)
    assert held[list(heldout_images_)].all() and not held[list(train_images)].any()
    assert 0.1 < split.n_heldout / (split.n_train + split.n_heldout) < 0.3


def test_split_pairs_by_image_drops_and_counts_straddling_pairs():
    rng = np.random.default_rng(6)
    n = 4000
    ids = np.arange(n, dtype=np.int64)
    cluster = rng.integers(0, 8, n)
    values = rng.normal(0, 1, n)
    winner, loser = engagement_pairs(cluster, values, 0.5, 2000, seed=0)
    split = split_pairs_by_image(ids, winner, loser, heldout_fraction=0.3)
    assert split.n_train > 0 and split.n_heldout > 0 and split.dropped > 0
    assert split.n_train + split.n_heldout + split.dropped == winner.size
    assert images_of(*split.train).isdisjoint(images_of(*split.heldout))
    with pytest.raises(IndexError):
        split_pairs_by_image(ids, np.array([n]), np.array([0]))


def test_engagement_is_finite_for_a_realistic_mix():
    # Counts as the warehouse stores them (int64 pyarrow columns, timestamp[us] createdAt).
    rng = np.random.default_rng(8)
    n = 1000
    table = pa.table(
        {
            **{name: pa.array(rng.poisson(3, n)) for name in REACTION_COLUMNS},
            "createdAt": pa.array(
                [datetime(2025, 1, 1) + timedelta(hours=int(h)) for h in rng.integers(0, 3000, n)],
                pa.timestamp("us"),
            ),
            "userHash": pa.array([f"{int(u):064x}" for u in rng.integers(0, 50, n)]),
        }
    )
    result = engagement_details(table, datetime(2025, 6, 1))
    assert result.n_valid == n and not result.excluded
    assert math.isfinite(result.global_mean)
    assert abs(np.nanmean(result.values)) < 0.5


def test_heldout_growing_holds_one_out_of_a_handful_and_only_adds():
    from ml.preferences.engagement import heldout_growing, heldout_images

    for n in range(3, 40):
        ids = np.arange(1_000 * n, 1_000 * n + n)
        held = heldout_growing(ids, 0.2)
        base = heldout_images(ids, 0.2)
        assert held.sum() >= 1 and (~held).sum() >= 2, n
        assert (held | base).sum() == held.sum()  # a superset of the plain split
        assert np.array_equal(held, heldout_growing(ids, 0.2))  # deterministic
    big = np.arange(1, 5_000)
    assert np.array_equal(heldout_growing(big, 0.2), heldout_images(big, 0.2))  # unchanged
    two = np.array([5, 6])
    assert (~heldout_growing(two, 0.2)).sum() >= (~heldout_images(two, 0.2)).sum()  # no growth
