"""One device resolver for the commands and the compute resource."""

from __future__ import annotations

import pytest
import torch

from afmrl_dagster.devices import DeviceError, resolve_device
from afmrl_dagster.resources.compute import TorchCompute


def test_cpu_and_auto(monkeypatch):
    assert resolve_device("cpu") == resolve_device(" CPU ") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"


def test_environment_default(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("AFMRL_DEVICE", raising=False)
    assert resolve_device() == "cpu"  # default 'auto', and no CUDA here
    monkeypatch.setenv("AFMRL_DEVICE", "nonsense")
    with pytest.raises(DeviceError, match="'nonsense'"):
        resolve_device()


def test_cuda_is_checked_not_assumed(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="no CUDA device"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == "cuda" and resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(DeviceError, match="2 CUDA device"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="no MPS device"):
        resolve_device("mps")
    for bad in ("gpu", "cuda:", "cuda:x", "tpu"):
        with pytest.raises(DeviceError, match="is not 'auto'"):
            resolve_device(bad)


def test_the_compute_resource_resolves_through_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert TorchCompute(device="auto").torch_device() == "cpu"
    assert TorchCompute(device="cpu").torch_dtype() == torch.float32
    with pytest.raises(DeviceError, match="no CUDA device"):
        TorchCompute(device="cuda").torch_device()
