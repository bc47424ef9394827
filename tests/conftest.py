"""Shared test set-up.

Without CUDA, Triton kernels run in the interpreter: TRITON_INTERPRET must be set before any
kernel module is imported (``triton.jit`` reads it when a kernel is defined), so it is set here.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture
def gen():
    """A fresh, randomly seeded generator per test (fresh inputs every run); the seed is printed
    so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"generator seed: {seed}")
    return torch.Generator().manual_seed(seed)
