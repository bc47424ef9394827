"""MemoryBank: thresholded ordered updates, prototypes, state_dict round trip, bad inputs."""
import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

import oracles
from oracles import torch_backend_unless_forced  # noqa: F401  (autouse: torch backend)
from rca_fast import MemoryBank, ops


def numpy_seed(gen) -> int:
    return int(torch.randint(2 ** 31 - 1, (), generator=gen))


def bank_with_random_state(L, S, D, K, gen, dtype=torch.float32, **kwargs):
    bank = MemoryBank(L, S, D, prototypes=K, dtype=dtype, **kwargs)
    bank.bank.copy_(torch.randn(L, S, D, generator=gen))
    bank.ptr.copy_(torch.randint(S, (L,), generator=gen))
    return bank


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_update_keeps_rows_strictly_above_threshold_in_order(dtype, gen):
    L, S, D, N = 3, 4, 60, 13
    memory = bank_with_random_state(L, S, D, 2, gen, dtype, gamma=0.9, score_threshold=0.7)
    emb = torch.randn(N, D, generator=gen)
    target = torch.randint(L, (N,), generator=gen)
    score = torch.rand(N, generator=gen)
    score[[1, 5]] = 0.7        # exactly at the threshold: not written
    score[[0, 2, 3]] = 0.95    # several kept rows, possibly of one class
    want_bank, want_ptr = memory.bank.clone(), memory.ptr.clone()
    kept = [i for i in range(N) if float(score[i]) > 0.7]
    oracles.ema_update_(want_bank, want_ptr, emb[kept], target[kept], gamma=0.9)
    applied = memory.update(emb, target, score)
    assert applied == len(kept)
    assert torch.equal(memory.ptr, want_ptr)
    assert torch.equal(memory.bank, want_bank)


def test_update_without_score_writes_every_row(gen):
    L, S, D, N = 4, 3, 7, 10
    memory = bank_with_random_state(L, S, D, 2, gen)
    emb = torch.randn(N, D, generator=gen)
    target = torch.randint(L, (N,), generator=gen)
    want_bank, want_ptr = memory.bank.clone(), memory.ptr.clone()
    oracles.ema_update_(want_bank, want_ptr, emb, target, gamma=0.99)
    assert memory.update(emb, target) == N
    assert torch.equal(memory.bank, want_bank) and torch.equal(memory.ptr, want_ptr)


def test_update_does_not_track_gradients(gen):
    memory = bank_with_random_state(2, 3, 5, 2, gen)
    emb = torch.randn(4, 5, generator=gen, requires_grad=True)
    memory.update(emb * 2, torch.tensor([0, 1, 1, 0]))
    assert not memory.bank.requires_grad and memory.bank.grad_fn is None


@pytest.mark.parametrize("case", ["no-rows", "all-below-threshold"])
def test_update_with_nothing_to_write_is_a_no_op(case, gen):
    memory = bank_with_random_state(3, 4, 5, 2, gen)
    before_bank, before_ptr = memory.bank.clone(), memory.ptr.clone()
    if case == "no-rows":
        applied = memory.update(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), torch.zeros(0))
        applied += memory.update(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))
    else:
        applied = memory.update(torch.randn(3, 5, generator=gen), torch.tensor([0, 1, 2]),
                                torch.tensor([0.1, 0.7, 0.5]))
    assert applied == 0
    assert torch.equal(memory.bank, before_bank) and torch.equal(memory.ptr, before_ptr)


def test_refresh_prototypes_clusters_each_class(gen):
    """Each class's prototypes are a k-means solution of its slots: within 1% of scikit-learn's
    best-of-10 inertia on blob-structured slots (with n_init=10 passed through to kmeans)."""
    L, S, D, K = 3, 60, 13, 5
    slots = [make_blobs(n_samples=S, n_features=D, centers=K,
                        random_state=numpy_seed(gen))[0] for _ in range(L)]
    memory = MemoryBank(L, S, D, prototypes=K)
    memory.bank.copy_(torch.from_numpy(np.stack(slots)))
    seed = numpy_seed(gen)
    prototypes = memory.refresh_prototypes(seed=seed, n_init=10)
    assert prototypes is memory.prototypes and prototypes.shape == (L, K, D)
    assert torch.equal(prototypes, ops.kmeans(memory.bank, K, seed=seed, n_init=10)[0])
    _, nearest = oracles.nearest_centroid(memory.bank, prototypes)
    for l in range(L):
        best = KMeans(n_clusters=K, n_init=10, random_state=numpy_seed(gen)).fit(slots[l]).inertia_
        assert sum(nearest[l]) <= 1.01 * best


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_refresh_prototypes_is_deterministic_by_seed(dtype, gen):
    L, S, D, K = 3, 17, 9, 4
    first = bank_with_random_state(L, S, D, K, gen, dtype)
    second = MemoryBank(L, S, D, prototypes=K, dtype=dtype)
    second.load_state_dict(first.state_dict())
    seed = numpy_seed(gen)
    first.refresh_prototypes(seed=seed)
    second.refresh_prototypes(seed=seed)
    assert first.prototypes.dtype == dtype
    assert torch.equal(first.prototypes, second.prototypes)
    assert bool(torch.isfinite(first.prototypes.float()).all())
    assert torch.equal(first.prototypes, first.refresh_prototypes(seed=seed).clone())


def test_state_dict_round_trip(gen):
    L, S, D, K = 3, 5, 7, 2
    memory = bank_with_random_state(L, S, D, K, gen)
    memory.update(torch.randn(6, D, generator=gen), torch.randint(L, (6,), generator=gen))
    memory.refresh_prototypes(seed=numpy_seed(gen))
    state = memory.state_dict()
    assert set(state) == {"bank", "ptr", "prototypes"}
    fresh = MemoryBank(L, S, D, prototypes=K)
    fresh.load_state_dict(state)
    for name in ("bank", "ptr", "prototypes"):
        assert torch.equal(getattr(fresh, name), getattr(memory, name)), name
    # Both continue identically (the pointers came along).
    emb, target = torch.randn(9, D, generator=gen), torch.randint(L, (9,), generator=gen)
    memory.update(emb, target)
    fresh.update(emb, target)
    assert torch.equal(fresh.bank, memory.bank) and torch.equal(fresh.ptr, memory.ptr)


def test_buffers_have_contract_shapes():
    memory = MemoryBank(5, 11, 6, prototypes=3, init="zeros")
    assert memory.bank.shape == (5, 11, 6) and memory.ptr.shape == (5,) and memory.ptr.dtype == torch.int64
    assert memory.prototypes.shape == (5, 3, 6)
    assert (memory.num_classes, memory.slots, memory.dim) == (5, 11, 6)
    assert bool((memory.bank == 0).all())


# ----------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("case, exc, name", [
    ("emb-1d", ValueError, "emb"),
    ("emb-dim", ValueError, "emb"),
    ("emb-list", TypeError, "emb"),
    ("emb-int", TypeError, "emb"),
    ("target-length", ValueError, "target"),
    ("target-2d", ValueError, "target"),
    ("target-float", TypeError, "target"),
    ("target-list", TypeError, "target"),
    ("target-range", ValueError, "target"),
    ("score-length", ValueError, "score"),
    ("score-list", TypeError, "score"),
])
def test_update_bad_inputs_name_the_argument(case, exc, name, gen):
    L, S, D, N = 3, 4, 5, 6
    memory = bank_with_random_state(L, S, D, 2, gen)
    emb = torch.randn(N, D, generator=gen)
    target = torch.randint(L, (N,), generator=gen)
    score = torch.ones(N)
    if case == "emb-1d":
        emb = emb[0]
    elif case == "emb-dim":
        emb = emb[:, :4]
    elif case == "emb-list":
        emb = emb.tolist()
    elif case == "emb-int":
        emb = emb.long()
    elif case == "target-length":
        target = target[:5]
    elif case == "target-2d":
        target = target[:, None]
    elif case == "target-float":
        target = target.float()
    elif case == "target-list":
        target = target.tolist()
    elif case == "target-range":
        target[3] = L
    elif case == "score-length":
        score = score[:4]
    elif case == "score-list":
        score = score.tolist()
    before = memory.bank.clone()
    with pytest.raises(exc, match=rf"\b{name}\b"):
        memory.update(emb, target, score)
    assert torch.equal(memory.bank, before)


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_classes=0), "num_classes"), (dict(slots=2.5), "slots"), (dict(dim=-1), "dim"),
    (dict(prototypes=9, slots=8), "prototypes"), (dict(gamma=1.5), "gamma"), (dict(init="ones"), "init"),
    (dict(score_threshold=float("nan")), "score_threshold"),
], ids=["num_classes", "slots", "dim", "prototypes", "gamma", "init", "score_threshold-nan"])
def test_constructor_bad_arguments(kwargs, name):
    args = dict(num_classes=3, slots=8, dim=4, prototypes=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        MemoryBank(args.pop("num_classes"), args.pop("slots"), args.pop("dim"), **args)


@pytest.mark.parametrize("kwargs, name", [
    (dict(gamma="0.99"), "gamma"), (dict(gamma=None), "gamma"),
    (dict(score_threshold="0.7"), "score_threshold"),
], ids=["gamma-str", "gamma-none", "score_threshold-str"])
def test_constructor_non_numbers(kwargs, name):
    with pytest.raises(TypeError, match=rf"\b{name}\b"):
        MemoryBank(3, 8, 4, prototypes=2, **kwargs)


def test_constructor_bad_dtype():
    with pytest.raises(TypeError, match="dtype"):
        MemoryBank(3, 8, 4, prototypes=2, dtype=torch.int32)


# ------------------------------------------------------------------------ torch.distributed (gloo)
def _distributed_worker(rank, world, port, payload, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        memory = MemoryBank(3, 4, 6, prototypes=2)
        memory.load_state_dict(payload["state"])
        emb, target, score = payload["rows"][rank]
        applied = memory.update(emb, target, score)
        memory.refresh_prototypes(seed=payload["seed"] + rank)  # rank 0's seed must win
        torch.save({"state": memory.state_dict(), "applied": applied}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters importing torch: ~8 s on 2 idle cores
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_distributed_ranks_apply_the_same_rows_in_rank_order(gen, tmp_path):
    """Two ranks that both keep rows, in different numbers (3 and 2, of one shared class among
    others): both banks end equal to the sequential loop over rank 0's kept rows then rank 1's
    (the other order puts the shared class's rows on other slots), and share rank 0's prototypes."""
    import socket

    import torch.multiprocessing as mp
    memory = bank_with_random_state(3, 4, 6, 2, gen)
    rows = []
    for n in (5, 3):
        score = torch.rand(n, generator=gen)
        rows.append((torch.randn(n, 6, generator=gen), torch.randint(3, (n,), generator=gen), score))
    for (_, target, score), kept in zip(rows, (3, 2)):
        score[:kept], score[kept:] = 0.9, 0.1
    rows[1][1][:2] = rows[0][1][0]  # rank 1's kept rows share a class with rank 0's first row
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    seed = numpy_seed(gen)
    payload = {"state": memory.state_dict(), "rows": rows, "seed": seed}
    mp.start_processes(_distributed_worker, args=(2, port, payload, str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    want_bank, want_ptr = memory.bank.clone(), memory.ptr.clone()
    kept = [(e[s > 0.7], t[s > 0.7]) for e, t, s in rows]
    assert [len(t) for _, t in kept] == [3, 2]
    for emb, target in kept:  # rank 0's rows, then rank 1's
        oracles.ema_update_(want_bank, want_ptr, emb, target, gamma=0.99)
    want_prototypes = ops.kmeans(want_bank, 2, seed=seed)[0]
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["applied"] == sum(len(t) for _, t in kept)
        assert torch.equal(result["state"]["bank"], want_bank)
        assert torch.equal(result["state"]["ptr"], want_ptr)
        assert torch.equal(result["state"]["prototypes"], want_prototypes)
