"""Value checks without host synchronisation on a GPU (rca_fast/ops/_validate.py, issue 11).

CPU tensors (or RCA_FAST_CHECK_VALUES=1) are checked on the host with a ValueError; CUDA tensors get
the same conditions as device-side asserts.  Without a GPU, the device path is exercised by routing
CPU tensors through it and recording what would be asserted on the device."""
import pytest
import torch

from rca_fast.ops import _validate


@pytest.fixture
def device_path(monkeypatch):
    """Send every tensor down the device-assert path; returns the list of (ok, message) asserted."""
    asserted = []
    monkeypatch.delenv(_validate.CHECK_VALUES_ENV, raising=False)
    monkeypatch.setattr(_validate, "host_value_checks", lambda t: False)
    monkeypatch.setattr(_validate, "_device_assert", lambda ok, msg: asserted.append((bool(ok), msg)))
    return asserted


def test_where_values_are_checked(monkeypatch):
    monkeypatch.delenv(_validate.CHECK_VALUES_ENV, raising=False)
    assert _validate.host_value_checks(torch.zeros(2))
    meta = torch.zeros(2, device="meta")
    assert not _validate.host_value_checks(meta)
    monkeypatch.setenv(_validate.CHECK_VALUES_ENV, "1")
    assert _validate.host_value_checks(meta)


def test_meta_tensors_are_not_read(monkeypatch):
    """Tracing (meta / fake tensors): no value is read (int() of a meta tensor would raise)."""
    monkeypatch.delenv(_validate.CHECK_VALUES_ENV, raising=False)
    t = torch.empty(5, dtype=torch.int64, device="meta")
    _validate.check_index("op", "target", t, 3)
    _validate.check_finite("op", "emb", torch.empty(4, device="meta"))
    _validate.check_range("op", "mix_weight", torch.empty(4, device="meta"), 0.0, 1.0)


def test_device_path_asserts_the_same_conditions(device_path):
    _validate.check_index("op", "target", torch.tensor([0, 2, 1]), 3)
    _validate.check_index("op", "target", torch.tensor([0, 3]), 3)
    _validate.check_index("op", "ptr", torch.tensor([-1, 0]), 3)
    _validate.check_finite("op", "emb", torch.tensor([1.0, 2.0]))
    _validate.check_finite("op", "emb", torch.tensor([1.0, float("nan")]))
    _validate.check_range("op", "mix_weight", torch.tensor([0.0, 1.0, 0.5]), 0.0, 1.0)
    _validate.check_range("op", "mix_weight", torch.tensor([0.5, 1.5]), 0.0, 1.0)
    _validate.check_range("op", "mix_weight", torch.tensor([float("nan")]), 0.0, 1.0)
    labels = torch.tensor([0, 1, 2])
    _validate.check_true("op", "labels", (labels == 0) | (labels == 1), "must be bool or 0/1")
    got = [ok for ok, _ in device_path]
    assert got == [True, False, False, True, False, True, False, False, False]
    assert "target entries must be in [0, 3)" in device_path[1][1]
    assert "emb contains NaN" in device_path[4][1]
    assert "mix_weight must lie in [0.0, 1.0]" in device_path[6][1]


def test_host_path_raises_naming_the_argument(monkeypatch):
    monkeypatch.delenv(_validate.CHECK_VALUES_ENV, raising=False)
    with pytest.raises(ValueError, match=r"target entries must be in \[0, 3\), got values in \[0, 3\]"):
        _validate.check_index("op", "target", torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="mix_weight must lie in"):
        _validate.check_range("op", "mix_weight", torch.tensor([0.2, float("nan")]), 0.0, 1.0)
    with pytest.raises(ValueError, match="labels must be bool or 0/1"):
        _validate.check_true("op", "labels", torch.tensor([True, False]), "must be bool or 0/1")
