"""A drop-in command line does not silently train a randomly initialised VGG16/ResNet50 (issue 19,
point 4): the public code always starts from ImageNet weights, so --backbone vgg16|resnet50
without --pretrained stops with an error saying how to give a local weights file; from scratch
only with an explicit --pretrained none."""
import pytest
import torch

from rca_fast.train import Trainer, main
from rca_fast.utils.train_args import parse_args

SMALL = ["--input_size", "32", "--batch_size", "2", "--bank-slots", "4", "--prototypes", "2", "--no-progress",
         "--threads", "1", "--num_classes", "2", "--num-images", "2", "--val-images", "0", "--device", "cpu"]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "backbone,weights", [("vgg16", "vgg16-397923af.pth"), ("resnet50", "resnet50-0676ba61.pth")]
)
def test_big_backbone_without_weights_stops_naming_the_way_out(tmp_path, backbone, weights):
    with pytest.raises(ValueError, match=r"--backbone " + backbone + r" needs --pretrained") as err:
        # one step, one epoch: with the check gone this trains a random network briefly and fails here
        main(
            SMALL + ["--backbone", backbone, "--epoch", "1", "--max-steps", "1", "--out", str(tmp_path / "a")]
        )
    assert weights in str(err.value) and "--pretrained none" in str(err.value)
    assert not (tmp_path / "a" / "checkpoint.pt").exists()


def test_pretrained_none_trains_from_scratch_on_purpose(tmp_path):
    args = parse_args(SMALL + ["--backbone", "vgg16", "--pretrained", "None", "--out", str(tmp_path)])
    assert args.pretrained is None and args.from_scratch
    trainer = Trainer(args)  # builds: a randomly initialised VGG16, as asked
    assert trainer.model.backbone is not None
    assert (
        not parse_args(SMALL).from_scratch and parse_args(SMALL).backbone == "tiny"
    )  # synthetic: no weights needed
