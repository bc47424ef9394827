"""The public code's schedule and the improved-recipe options: contrast start, prototype schedule
(randn in epoch 1, k-means with n_init 10 at every later epoch start), the bank score gate, a
slot's first write copied, k-means warm start, --recipe defaults."""
import math

import pytest
import torch

from rca_fast import ops
from rca_fast.model import RCAModel, rca_loss
from rca_fast.model.memory_bank import MemoryBank, lloyd
from rca_fast.train import Trainer
from rca_fast.utils.train_args import RECIPES, parse_args

SYN = ["--input_size", "32", "--crop_size", "32", "--batch_size", "4", "--bank-slots", "16", "--prototypes",
       "2",
       "--no-progress", "--threads", "1", "--num_classes", "3", "--num-images", "8", "--val-images", "0",
       "--device", "cpu"]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_contrast_starts_at_the_third_epoch(gen):
    """Public code: no contrast while its 0-based epoch < 2, i.e. 1-based epochs 1 and 2."""
    assert parse_args([]).contrast_start_epoch == 3
    B, L = 3, 4
    logits = torch.randn(B, L, generator=gen, dtype=torch.float64)
    from rca_fast.model import RCAOutput
    contrast = torch.tensor(2.5, dtype=torch.float64)
    out = RCAOutput(logits, torch.zeros(B, L, 1, 1), logits.clone(), torch.zeros(B, L, 1, 1),
                    contrast_loss=contrast)
    labels = (torch.rand(B, L, generator=gen) < 0.5).double()
    without = rca_loss(out, labels, 1)[0]
    for epoch_0based in range(5):  # the public code's `if current_epoch >= 2: loss += 0.01 * contrast`
        got = float(rca_loss(out, labels, epoch_0based + 1)[0])
        want = float(without) + (0.01 * 2.5 if epoch_0based >= 2 else 0.0)
        assert math.isclose(got, want, rel_tol=1e-12), epoch_0based


def test_bank_write_is_gated_by_the_final_head(gen):
    """bank_score = sigmoid(GAP of the final CAMs O) of each row's class, not the coarse head's."""
    torch.manual_seed(int(torch.randint(2 ** 31, (1,), generator=gen)))
    L = 3
    model = RCAModel(L, backbone="tiny", bank_slots=4, prototypes=2)
    images = torch.randn(2, 3, 40, 24, generator=gen)
    labels = torch.tensor([[1, 0, 1], [0, 1, 1]])
    out = model(images, labels)
    assert out.bank_score.numel() > 0
    for i in range(out.bank_score.numel()):
        b, c = int(out.region_image[i]), int(out.bank_target[i])
        want = 1 / (1 + math.exp(-float(out.cams[b, c].detach().double().mean())))
        assert math.isclose(float(out.bank_score[i]), want, rel_tol=1e-5, abs_tol=1e-7)
        assert not math.isclose(float(out.bank_score[i]),
                                float(torch.sigmoid(out.coarse_logits[b, c].detach())),
                                rel_tol=1e-4)


def test_prototype_schedule_randn_then_kmeans_n_init_10(tmp_path, monkeypatch):
    """Epoch 1 trains with the randn prototypes drawn at construction; epochs 2, 3 each start with
    a k-means of the bank with n_init 10 (public); the improved recipe's warm start keeps one seed."""
    for recipe, seeds in (("public", [1002, 1003]), ("improved", [1, 1])):
        args = parse_args(SYN + ["--epoch", "3", "--seed", "1", "--recipe", recipe,
                                 "--aggregation-start-epoch", "2", "--out", str(tmp_path / recipe)])
        trainer = Trainer(args)
        initial = trainer.model.bank.prototypes.clone()
        assert (initial.abs().sum() > 0) == (recipe == "public")  # randn (public) / zeros (improved)
        calls, seen = [], []
        refresh = trainer.model.refresh_prototypes

        def record(seed=0, **kw):
            calls.append((trainer.epoch + 1, seed, kw))
            return refresh(seed=seed, **kw)
        monkeypatch.setattr(trainer.model, "refresh_prototypes", record)
        step = trainer.train_step

        def spy(batch, epoch):
            seen.append((epoch, trainer.model.bank.prototypes.clone()))
            return step(batch, epoch)
        monkeypatch.setattr(trainer, "train_step", spy)
        trainer.fit()
        assert [c[0] for c in calls] == [2, 3] and all(c[2] == {"n_init": 10, "iters": 300} for c in calls)
        assert [c[1] for c in calls] == seeds
        assert all(torch.equal(p, initial) for e, p in seen if e == 1)
        assert all(not torch.equal(p, initial) for e, p in seen if e > 1)


def test_first_write_copies_then_ema(gen):
    """first_write="copy": a row landing on a never-written slot replaces it; later writes of that
    slot are EMA updates; against a sequential loop in float64."""
    L, S, D, gamma = 3, 5, 4, 0.9
    bank = MemoryBank(L, S, D, prototypes=2, gamma=gamma, first_write="copy", dtype=torch.float64)
    want = bank.bank.clone()
    ptr, writes = [0] * L, [0] * L
    for n in (4, 7, 9, 2):
        emb = torch.randn(n, D, generator=gen, dtype=torch.float64)
        target = torch.randint(L, (n,), generator=gen)
        bank.update(emb, target)
        for i in range(n):
            c = int(target[i])
            s = ptr[c]
            want[c, s] = emb[i] if writes[c] < S else gamma * want[c, s] + (1 - gamma) * emb[i]
            ptr[c], writes[c] = (s + 1) % S, writes[c] + 1
        torch.testing.assert_close(bank.bank, want, rtol=1e-12, atol=1e-12)
        assert bank.ptr.tolist() == ptr and bank.writes.tolist() == writes
    # more rows of one class in one call than slots: still the sequential result
    emb = torch.randn(2 * S + 1, D, generator=gen, dtype=torch.float64)
    fresh = MemoryBank(L, S, D, prototypes=2, gamma=gamma, first_write="copy", dtype=torch.float64)
    start = fresh.bank.clone()
    fresh.update(emb, torch.zeros(2 * S + 1, dtype=torch.long))
    for s in range(S):
        row = emb[s]
        for k in range(s + S, 2 * S + 1, S):
            row = gamma * row + (1 - gamma) * emb[k]
        torch.testing.assert_close(fresh.bank[0, s], row)
    torch.testing.assert_close(fresh.bank[1:], start[1:])


def test_lloyd_warm_start(gen):
    """lloyd: every returned centroid is the mean of the points nearest to it (a fixed point of
    Lloyd's iteration), and the inertia is not above that of its start."""
    L, S, D, K = 2, 31, 5, 3
    points = torch.randn(L, S, D, generator=gen, dtype=torch.float64)
    start = points[:, :K].clone()
    c = lloyd(points, start, iters=200, tol=0.0)
    for l in range(L):
        nearest = [min(range(K),
                       key=lambda k: float(((points[l, s] - c[l, k]) ** 2).sum())) for s in range(S)]
        for k in range(K):
            members = [points[l, s] for s in range(S) if nearest[s] == k]
            if members:
                torch.testing.assert_close(c[l, k], sum(members) / len(members))
    def inertia(cc):
        return float(torch.cdist(points, cc).min(-1).values.pow(2).sum())
    assert inertia(c) <= inertia(start) + 1e-9
    bank = MemoryBank(L, S, D, prototypes=K, kmeans_warm_start=True, dtype=torch.float64)
    bank.bank.copy_(points)
    first = bank.refresh_prototypes(seed=3).clone()
    torch.testing.assert_close(first, ops.kmeans(points, K, seed=3)[0])
    torch.testing.assert_close(bank.refresh_prototypes(seed=99), lloyd(points, first))


def test_recipe_defaults_and_explicit_flags_win():
    public = parse_args([])
    for key, value in RECIPES["public"].items():
        assert getattr(public, key) == value
    assert public.aggregation_start_epoch == 2 and public.first_write == "ema"
    improved = parse_args(["--recipe", "improved", "--first-write", "ema", "--attention-scale", "learned"])
    assert improved.first_write == "ema" and improved.attention_scale == "learned"
    assert improved.prototype_init == RECIPES["improved"]["prototype_init"]
    assert improved.kmeans_warm_start is True
    assert improved.aggregation_zero_start is True and public.aggregation_zero_start is False
    assert parse_args(["--recipe", "improved", "--no-kmeans-warm-start"]).kmeans_warm_start is False
    assert parse_args(["--recipe", "improved", "--no-aggregation-zero-start"]).aggregation_zero_start is False
    assert parse_args(["--kmeans-warm-start"]).kmeans_warm_start is True
    with pytest.raises(ValueError, match="--aggregation-start-epoch"):
        parse_args(["--aggregation-start-epoch", "0"])


def test_aggregation_zero_start_zeroes_the_output_conv_once(tmp_path, monkeypatch):
    """--aggregation-zero-start: the aggregation's output conv is zero when the start epoch's first
    step runs (and only then: later epochs keep what it learned)."""
    args = parse_args(SYN + ["--epoch", "3", "--aggregation-start-epoch", "2", "--aggregation-zero-start",
                             "--out", str(tmp_path)])
    trainer = Trainer(args)
    first_step = {}
    step = trainer.train_step

    def spy(batch, epoch):
        first_step.setdefault(epoch, trainer.model.aggregation.out.weight.detach().clone())
        return step(batch, epoch)
    monkeypatch.setattr(trainer, "train_step", spy)
    trainer.fit()
    assert bool(first_step[1].abs().sum() > 0) and bool((first_step[2] == 0).all())
    assert bool(first_step[3].abs().sum() > 0)
