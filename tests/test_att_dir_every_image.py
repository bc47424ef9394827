"""--att_dir writes a map for every training image and tagged class (issue 19, point 3), as the
public code's last epoch does (its loader shows every image every epoch), on a dataset whose
size is not a multiple of the batch size; under DDP the maps merge by tensor all-reduces (MAX),
not by gathering pickled objects.  Oracles: the dataset's own tags, an element-wise max of
literal per-rank maps."""
import os
import socket

import numpy as np
import pytest
import torch

from rca_fast.data import SyntheticShapes
from rca_fast.train import main
from rca_fast.utils.att_maps import AttentionMaps

ODD = [
    "--input_size", "32", "--crop_size", "32", "--batch_size", "4", "--bank-slots", "16", "--prototypes",
    "2", "--no-progress", "--threads", "1", "--num_classes", "3", "--num-images", "11", "--val-images", "0",
    "--epoch", "2", "--device", "cpu",
]  # 11 images, batch 4: a partial batch of 3


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("pipeline", ["public", "augmented"])
def test_every_tagged_class_of_every_image_has_a_map(tmp_path, pipeline):
    """public: every image is seen in the last epoch; augmented (shuffled, partial batch dropped):
    the images it did not see are filled after training.  Either way one PNG per (image, tagged
    class) and no other."""
    att = tmp_path / "att"
    main(ODD + ["--input-pipeline", pipeline, "--out", str(tmp_path / "run"), "--att_dir", str(att)])
    data = SyntheticShapes(11, 3, 32, seed=0, split="train")
    want = {f"{data.names[i]}_{c}.png" for i in range(11) for c in np.flatnonzero(data.labels[i] > 0)}
    assert set(os.listdir(att)) == want


def _merge_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        def no_pickles(*args, **kwargs):
            raise AssertionError("merge_ranks gathered pickled objects")
        dist.all_gather_object = no_pickles
        maps = AttentionMaps(out_dir, [f"im{i}" for i in range(5)], 3, 32, 3)
        gen = torch.Generator().manual_seed(1234)  # the same draws on both ranks: both know the oracle
        shapes = {0: (4, 3), 1: (2, 5), 2: (3, 3), 3: (1, 4), 4: (5, 2)}
        per_rank = {r: {} for r in range(world)}
        for r in range(world):
            for i in range(5):
                for c in range(3):
                    if bool(torch.rand((), generator=gen) < 0.5):
                        per_rank[r][(i, c)] = torch.randint(
                            0, 256, shapes[i], generator=gen, dtype=torch.uint8
                        )
        for (i, c), m in per_rank[rank].items():
            maps.maps[(i, c)] = m.clone()
            maps.sizes[i] = (7 * i + 3, 5 * i + 2)
            maps.exists[i, c] = True
        maps.merge_ranks(chunk_bytes=7)  # several pieces, one boundary inside a map
        want = {}
        for r in range(world):
            for key, m in per_rank[r].items():
                want[key] = m if key not in want else torch.maximum(want[key], m)
        assert sorted(maps.maps) == sorted(want)
        for key, m in want.items():
            assert torch.equal(maps.maps[key], m), key
            assert maps.sizes[key[0]] == (7 * key[0] + 3, 5 * key[0] + 2)
        assert maps.exists.tolist() == [[(i, c) in want for c in range(3)] for i in range(5)]
        with open(os.path.join(out_dir, f"ok{rank}"), "w") as f:
            f.write("ok")
    finally:
        dist.destroy_process_group()


def test_ranks_merge_maps_by_tensor_all_reduce(tmp_path):
    """Two gloo ranks holding different (image, class) maps of different grid sizes: after
    merge_ranks both hold the element-wise max of every map, the sizes and the exists flags --
    with all_gather_object (the pickled gather it replaced) unavailable."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(
        _merge_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    assert sorted(os.listdir(tmp_path)) == ["ok0", "ok1"]
