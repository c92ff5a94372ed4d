"""flowmill.train.distributed without a process group: the device choice, the backend, the world
size from the environment, and the collectives that are no-ops when alone."""

from __future__ import annotations

import socket

import pytest
import torch

from flowmill.train.distributed import all_reduce_mean, backend_for, barrier, choose_device, env_world_size, free_port


def test_cpu_and_auto_without_a_gpu(monkeypatch):
    assert choose_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device("auto") == torch.device("cpu")


def test_cuda_without_a_gpu_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto"):
        choose_device("cuda")


def test_backend_per_device():
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 1)) == "nccl"


def test_world_size_from_the_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert env_world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert env_world_size() == 4


def test_collectives_alone_are_no_ops():
    value = torch.tensor([1.5, 2.5])
    assert all_reduce_mean(value) is value
    barrier()


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
