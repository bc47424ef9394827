"""rca_fast.pretrain: the tiny backbone pretrained for multi-label classification, saved as a local
weights file that ``rca_fast.train --pretrained`` loads (and keeps: only the new layers are
re-initialised)."""
import json
import math

import pytest
import torch

from rca_fast.model import RCAModel
from rca_fast.pretrain import main as pretrain_main
from rca_fast.train import Trainer
from rca_fast.utils.train_args import parse_args


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("pre") / "tiny.pt"
    summary = pretrain_main(["--out", str(path), "--num-images", "48", "--image-size", "32", "--epochs", "5",
                             "--batch-size", "8", "--num-classes", "3", "--no-progress", "--data-seed", "77"])
    return path, summary


def test_pretrain_learns_and_writes_a_loadable_file(weights):
    path, summary = weights
    losses = [h["loss"] for h in summary["history"]]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    meta = json.loads(open(str(path) + ".json").read())
    assert meta["args"]["data_seed"] == 77 and len(meta["history"]) == 5
    state = torch.load(path, weights_only=True)
    assert set(state) == set(RCAModel(3, backbone="tiny", bank_slots=2, prototypes=1).backbone.state_dict())
    model = RCAModel(3, backbone="tiny", pretrained=str(path), bank_slots=2, prototypes=1)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_train_keeps_the_pretrained_backbone_and_he_inits_the_new_layers(weights, tmp_path):
    path, _ = weights
    args = parse_args(["--num_classes", "3", "--input_size", "32", "--crop_size", "32", "--num-images", "8",
                       "--val-images", "0", "--bank-slots", "4", "--prototypes", "2", "--threads", "1",
                       "--no-progress", "--pretrained", str(path), "--out", str(tmp_path)])
    trainer = Trainer(args)
    state = torch.load(path, weights_only=True)
    for k, v in trainer.model.backbone.state_dict().items():
        assert torch.equal(v, state[k]), k
    w = trainer.model.coarse_head.body[0].weight.detach().double()   # He-normal: std sqrt(2 / fan_in)
    want = math.sqrt(2 / w[0].numel())
    assert abs(float(w.std()) - want) < 0.1 * want
    with pytest.raises(SystemExit):
        pretrain_main(["--epochs", "1"])  # --out is required
    with pytest.raises(ValueError, match="--epochs"):
        pretrain_main(["--out", str(tmp_path / "x.pt"), "--epochs", "0"])
    with pytest.raises(ValueError, match="--num-images"):  # no full batch: was a ZeroDivisionError
        pretrain_main(["--out", str(tmp_path / "x.pt"), "--num-images", "4", "--batch-size", "8"])
