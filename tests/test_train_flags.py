"""Trainer flags --amp, --bank-dtype, --compile (a few CPU steps each) and the checkpoint flags' checks."""
import pytest
import torch

from rca_fast.train import Trainer
from rca_fast.utils.checkpoint import load_checkpoint
from rca_fast.utils.train_args import parse_args

SYN = ["--input_size", "32", "--crop_size", "32", "--batch_size", "4", "--bank-slots", "16", "--prototypes",
       "2",
       "--no-progress", "--threads", "1", "--num_classes", "3", "--num-images", "8", "--val-images", "0",
       "--device", "cpu", "--score-threshold", "0", "--contrast-start-epoch", "1"]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _first_batch(trainer):
    return next(iter(trainer.batches(1)))


@pytest.mark.parametrize("bank_dtype", ["float32", "bfloat16"], ids=["bank-f32", "bank-bf16"])
def test_amp_runs_bf16_forward_and_keeps_the_bank_dtype(tmp_path, bank_dtype):
    trainer = Trainer(parse_args(SYN + ["--amp", "--bank-dtype", bank_dtype, "--epoch", "2", "--out",
                                        str(tmp_path)]))
    want = getattr(torch, bank_dtype)
    out, loss, parts = trainer.compute_loss(_first_batch(trainer), 1)
    assert out.cams.dtype == torch.bfloat16, "the forward ran under bf16 autocast"
    assert loss.dtype == torch.float32 and all(torch.isfinite(torch.tensor(v)) for v in parts.values())
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.fit()
    assert metrics["steps"] == 4
    bank = trainer.model.bank
    assert bank.bank.dtype == want and bank.prototypes.dtype == want
    assert int(bank.ptr.sum()) > 0 and not torch.equal(bank.bank, before["bank.bank"])
    assert trainer.model.coarse_head.classifier.weight.dtype == torch.float32  # weights stay fp32
    assert not torch.equal(trainer.model.coarse_head.classifier.weight,
                           before["coarse_head.classifier.weight"])
    state = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert state["model"]["bank.bank"].dtype == want and state["model_config"]["bank_dtype"] == bank_dtype


@pytest.mark.parametrize("spelling,name",
                         [("bf16", "bfloat16"), ("fp32", "float32"), ("bfloat16", "bfloat16")])
def test_bank_dtype_short_spellings(spelling, name):
    assert parse_args(SYN + ["--bank-dtype", spelling]).bank_dtype == name


def test_without_amp_the_forward_is_fp32(tmp_path):
    trainer = Trainer(parse_args(SYN + ["--out", str(tmp_path)]))
    out, _, _ = trainer.compute_loss(_first_batch(trainer), 1)
    assert out.cams.dtype == torch.float32


@pytest.mark.slow  # inductor compiles C++ kernels with gcc: ~40 s on 2 busy cores
def test_compile_runs_two_steps_and_matches_eager(tmp_path):
    compiled = Trainer(parse_args(SYN + ["--compile", "--max-steps", "2", "--out", str(tmp_path / "c")]))
    eager = Trainer(parse_args(SYN + ["--max-steps", "2", "--out", str(tmp_path / "e")]))
    assert isinstance(compiled.forward_model, torch._dynamo.eval_frame.OptimizedModule)
    batch = _first_batch(eager)
    torch.manual_seed(5)
    _, loss_c, parts_c = compiled.compute_loss(batch, 1)
    torch.manual_seed(5)
    _, loss_e, parts_e = eager.compute_loss(batch, 1)
    for key in parts_e:
        assert abs(parts_c[key] - parts_e[key]) <= 1e-4 * max(1.0, abs(parts_e[key])), key
    metrics = compiled.fit()
    assert metrics["steps"] == 2
    state = load_checkpoint(str(tmp_path / "c" / "checkpoint.pt"))
    assert "bank.bank" in state["model"], "the raw model's keys (no _orig_mod. prefix) are saved"


@pytest.mark.parametrize("flag,value",
                         [("--keep", "0"), ("--save-every", "-1"), ("--check-bank-every", "-2")])
def test_bad_checkpoint_flags_name_the_flag(tmp_path, flag, value):
    with pytest.raises(ValueError, match=flag):
        parse_args(SYN + [flag, value, "--out", str(tmp_path)])
