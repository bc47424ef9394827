"""Batched k-means: quality against scikit-learn, the Lloyd iterations and stop rule against a
float64 loop, determinism, labels, degenerate data, bad inputs."""
import importlib

import pytest
import torch
from sklearn.cluster import KMeans

import oracles
from oracles import (
    blobs,
    numpy_seed,
    torch_backend_unless_forced,  # noqa: F401  (autouse: torch backend)
)
from rca_fast import ops

# (L, S, D, K, blob centres): several problems at once, odd S and D.
# K equals the number of blobs: with K < blobs the optimum (which two blobs to merge) is a coin
# toss for any 10-restart k-means, sklearn's included, and the 1% bar became flaky.
BLOB_CASES = [(3, 97, 13, 7, 7), (2, 151, 60, 10, 10), (4, 45, 5, 4, 4), (1, 33, 3, 5, 5)]
BLOB_IDS = [f"L{l}-S{s}-D{d}-K{k}" for l, s, d, k, _ in BLOB_CASES]


@pytest.mark.parametrize("case", BLOB_CASES, ids=BLOB_IDS)
def test_inertia_within_one_percent_of_sklearn_best_of_10(case, gen):
    L, S, D, K, centers = case
    points, problems = blobs(L, S, D, centers, gen)
    # 30 restarts against scikit-learn's 10: both are random searches, and with 10 each ours lands
    # in a worse local minimum now and then (generator seed 2174969388, L1-S33-D3-K5: 81.94 vs
    # 80.04 at n_init 10; 80.04 at 20, 80.10 at 30).  A broken seeding or update is still far off.
    _, _, inertia = ops.kmeans(points, K, seed=numpy_seed(gen), n_init=30)
    assert inertia.shape == (L,)
    for l in range(L):
        best = KMeans(n_clusters=K, n_init=10, random_state=numpy_seed(gen)).fit(problems[l]).inertia_
        assert float(inertia[l]) <= 1.01 * best, f"problem {l}: {float(inertia[l])} vs sklearn {best}"


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_labels_centroids_and_inertia_agree_with_loop(init, gen):
    """Labels are each point's nearest returned centroid; inertia is the sum of those squared
    distances; every centroid is the mean of its cluster or (after convergence) close to it."""
    L, S, D, K = 3, 61, 7, 5
    points, _ = blobs(L, S, D, K, gen, std=2.0)
    centroids, labels, inertia = ops.kmeans(points, K, seed=numpy_seed(gen), init=init)
    assert centroids.shape == (L, K, D) and labels.shape == (L, S) and inertia.shape == (L,)
    assert labels.dtype == torch.int64 and centroids.dtype == points.dtype
    dists, best = oracles.nearest_centroid(points, centroids)
    for l in range(L):
        scale = max(max(row) for row in dists[l])
        total = 0.0
        for s in range(S):
            chosen = dists[l][s][int(labels[l, s])]
            # ties within float32 distance error may go either way
            assert chosen <= best[l][s] + 1e-5 * scale, (l, s)
            total += chosen
        assert abs(float(inertia[l]) - total) <= 1e-4 * total


def record_lloyd(monkeypatch):
    """Wrap the reference's ``assign`` (called once per Lloyd iteration and once at the end) to
    record the initial centres and count the iterations."""
    module = importlib.import_module("rca_fast.ref.kmeans")
    calls = []
    real = module.assign

    def assign(x, centers):
        calls.append(centers.clone())
        return real(x, centers)

    monkeypatch.setattr(module, "assign", assign)
    return calls


@pytest.mark.parametrize("init,tol",
                         [("k-means++", 1e-4), ("random", 3e-3), ("k-means++", 0.0), ("random", 0.0)],
                         ids=["kmeans++-tol1e-4", "random-tol3e-3", "kmeans++-tol0", "random-tol0"])
def test_lloyd_iterations_and_stop_rule_match_a_float64_loop(init, tol, monkeypatch, gen):
    """From the op's own initial centres, the centroids and the number of Lloyd iterations equal a
    float64 loop applying scikit-learn's rule (summed squared shift <= tol * mean per-feature
    variance, or labels unchanged).  Overlapping uniform data converges slowly, so the
    tolerance decides where it stops; with tol = 0 only the unchanged labels stop it.  At that
    point (tol = 0) every centroid is the mean of the points labelled with it."""
    L, S, D, K = 2, 120, 6, 5  # two problems: one that stops first must keep its centroids
    for _ in range(5):  # the oracle does not re-seed: redraw in the rare case a cluster empties
        points = torch.rand(L, S, D, generator=gen, dtype=torch.float64)
        calls = record_lloyd(monkeypatch)
        centroids, labels, _ = ops.kmeans(points, K, seed=numpy_seed(gen), init=init, tol=tol)
        try:
            runs = [oracles.lloyd(points[l].tolist(), calls[0][l].tolist(), 100, tol) for l in range(L)]
        except oracles.EmptyCluster:
            continue
        break
    else:
        pytest.fail("5 draws in a row emptied a cluster")
    n_iters = [n for _, _, n in runs]
    assert len(calls) - 1 == max(n_iters), f"{len(calls) - 1} Lloyd iterations, the loops ran {n_iters}"
    assert min(n_iters) > 2
    for l, (want, _, _) in enumerate(runs):
        torch.testing.assert_close(centroids[l], torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-9)
    if tol == 0:
        for l in range(L):
            for k in range(K):
                members = [s for s in range(S) if int(labels[l, s]) == k]
                assert members, f"problem {l}: cluster {k} is empty"
                for d in range(D):
                    mean = sum(float(points[l, s, d]) for s in members) / len(members)
                    assert abs(mean - float(centroids[l, k, d])) < 1e-12


def test_stop_rule_divides_the_summed_variance_by_the_features(monkeypatch, gen):
    """The tolerance is tol x the MEAN per-feature variance (scikit-learn), not their sum: on
    data and a tol chosen where the two rules stop at different Lloyd iterations (the shifts of
    a tol = 0 run of the float64 loop pick it), the op runs the iterations of the mean rule."""
    S, D, K = 150, 9, 6
    for _ in range(5):  # the oracle does not re-seed: redraw in the rare case a cluster empties
        points = torch.rand(1, S, D, generator=gen, dtype=torch.float64)
        seed = numpy_seed(gen)
        calls = record_lloyd(monkeypatch)
        ops.kmeans(points, K, seed=seed, tol=0.0)
        pts, init, shifts = points[0].tolist(), calls[0][0].tolist(), []
        try:
            oracles.lloyd(pts, init, 100, 0.0, shifts=shifts)
        except oracles.EmptyCluster:
            continue
        break
    else:
        pytest.fail("5 draws in a row emptied a cluster")
    means = [sum(p[d] for p in pts) / S for d in range(D)]
    summed_var = sum(sum((p[d] - means[d]) ** 2 for p in pts) / S for d in range(D))

    def stop(threshold):  # iterations run: the first shift <= threshold, else where the labels stop
        return next((j + 1 for j, v in enumerate(shifts) if v <= threshold), len(shifts))

    for i in range(1, len(shifts) - 1):  # tol putting the SUM rule's threshold just above shift i
        tol = shifts[i] * (1 + 1e-6) / summed_var
        by_mean, by_sum = stop(tol * summed_var / D), stop(tol * summed_var)
        if by_sum < by_mean:
            break
    else:
        pytest.fail(f"no tol separates the two rules on this draw (shifts {shifts})")
    calls = record_lloyd(monkeypatch)
    centroids, _, _ = ops.kmeans(points, K, seed=seed, tol=tol)
    want, _, n_iter = oracles.lloyd(pts, init, 100, tol)
    assert n_iter == by_mean
    assert len(calls) - 1 == by_mean, (
        f"{len(calls) - 1} Lloyd iterations; the mean rule stops after {by_mean}, the sum rule after {by_sum}"
    )
    torch.testing.assert_close(centroids[0], torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-9)


def test_same_seed_same_result(gen):
    points, _ = blobs(3, 97, 13, 6, gen, std=3.0)
    seed = numpy_seed(gen)
    first = ops.kmeans(points, 6, seed=seed)
    second = ops.kmeans(points.clone(), 6, seed=seed)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # Other seeds are allowed to differ, but must be valid runs of the same problem.
    other = ops.kmeans(points, 6, seed=seed + 1)
    assert bool(torch.isfinite(other[0]).all()) and other[1].shape == first[1].shape


def test_unbatched_input_returns_unbatched_shapes(gen):
    S, D, K = 29, 11, 4
    points = torch.randn(S, D, generator=gen)
    seed = numpy_seed(gen)
    centroids, labels, inertia = ops.kmeans(points, K, seed=seed)
    assert centroids.shape == (K, D) and labels.shape == (S,) and inertia.shape == ()
    batched = ops.kmeans(points[None], K, seed=seed)
    assert torch.equal(centroids, batched[0][0]) and torch.equal(labels, batched[1][0])
    assert torch.equal(inertia, batched[2][0])


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_k_equal_to_s_puts_every_point_in_its_own_cluster(init, gen):
    L, S, D = 2, 9, 60
    points = torch.randn(L, S, D, generator=gen)
    centroids, labels, inertia = ops.kmeans(points, S, seed=numpy_seed(gen), init=init)
    assert bool((inertia == 0).all())
    for l in range(L):
        assert sorted(labels[l].tolist()) == list(range(S))
        assert torch.equal(centroids[l, labels[l]], points[l])


def test_k_greater_than_s_raises():
    with pytest.raises(ValueError, match=r"\bk\b"):
        ops.kmeans(torch.randn(3, 5, 4), 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_identical_points(dtype, init, gen):
    """All points equal: finite centroids (all equal to the point) and zero inertia, never NaN."""
    L, S, D, K = 3, 11, 13, 4
    point = (torch.randn(L, 1, D, generator=gen) * 5 + 0.1).to(dtype)
    points = point.expand(L, S, D).contiguous()
    centroids, labels, inertia = ops.kmeans(points, K, seed=numpy_seed(gen), init=init)
    assert bool(torch.isfinite(centroids).all()) and bool(torch.isfinite(inertia).all())
    assert torch.equal(centroids, point.expand(L, K, D))
    assert bool((inertia == 0).all())
    assert bool(((labels >= 0) & (labels < K)).all())


def test_empty_clusters_are_reseeded(gen):
    """40 copies of one point plus 4 distinct points, k = 4, random init: the initial centroids
    are almost surely duplicates of the repeated point, so clusters start empty.  Re-seeding must
    leave 4 finite, distinct centroids, each owning at least one point."""
    L, D, K = 6, 9, 4
    repeated = torch.randn(L, 1, D, generator=gen)
    others = torch.randn(L, 4, D, generator=gen) * 3 + 10
    points = torch.cat([repeated.expand(L, 40, D), others], 1)
    # Permute the points so the duplicates are not all first.
    points = torch.stack([p[torch.randperm(44, generator=gen)] for p in points])
    centroids, labels, _ = ops.kmeans(points, K, seed=numpy_seed(gen), init="random")
    assert bool(torch.isfinite(centroids).all())
    for l in range(L):
        gaps = torch.cdist(centroids[l].double(), centroids[l].double())
        assert float((gaps + torch.eye(K, dtype=torch.float64) * 1e9).min()) > 1e-3
        assert sorted(set(labels[l].tolist())) == list(range(K))


def test_n_init_returns_a_consistent_best_run(gen):
    """With n_init > 1 the returned centroids, labels and inertia come from one and the same run."""
    points, _ = blobs(4, 80, 6, 8, gen, std=1.5)
    centroids, labels, inertia = ops.kmeans(points, 8, seed=numpy_seed(gen), n_init=5)
    dists, best = oracles.nearest_centroid(points, centroids)
    for l in range(4):
        total = sum(dists[l][s][int(labels[l, s])] for s in range(80))
        assert abs(float(inertia[l]) - total) <= 1e-4 * total
        assert total <= sum(best[l]) * (1 + 1e-5)


# ----------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("case, exc, name", [
    ("points-1d", ValueError, "points"),
    ("points-4d", ValueError, "points"),
    ("points-int", TypeError, "points"),
    ("points-nan", ValueError, "points"),
    ("points-list", TypeError, "points"),
    ("k-zero", ValueError, "k"),
    ("k-float", TypeError, "k"),
    ("iters-zero", ValueError, "iters"),
    ("tol-negative", ValueError, "tol"),
    ("init", ValueError, "init"),
    ("n-init-zero", ValueError, "n_init"),
    ("seed-str", TypeError, "seed"),
    ("seed-float", TypeError, "seed"),
    ("seed-too-big", ValueError, "seed"),
])
def test_bad_inputs_name_the_argument(case, exc, name, gen):
    points = torch.randn(3, 7, 4, generator=gen)
    k = 3
    kwargs = {}
    if case == "points-1d":
        points = points[0, 0]
    elif case == "points-4d":
        points = points[None]
    elif case == "points-int":
        points = points.long()
    elif case == "points-nan":
        points[1, 2, 3] = float("inf")
    elif case == "points-list":
        points = points.tolist()
    elif case == "k-zero":
        k = 0
    elif case == "k-float":
        k = 3.0
    elif case == "iters-zero":
        kwargs["iters"] = 0
    elif case == "tol-negative":
        kwargs["tol"] = -1e-4
    elif case == "init":
        kwargs["init"] = "kmeans++"
    elif case == "n-init-zero":
        kwargs["n_init"] = 0
    elif case == "seed-str":
        kwargs["seed"] = "0"
    elif case == "seed-float":
        kwargs["seed"] = 1.5
    elif case == "seed-too-big":
        kwargs["seed"] = 2 ** 63
    with pytest.raises(exc, match=rf"\b{name}\b"):  # the argument as a word, not inside the op name
        ops.kmeans(points, k, **kwargs)
