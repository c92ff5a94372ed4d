"""flowmill.train.distributed: where a process sits in the job (read from whichever launcher started
it), where the job's store listens, the device choice, the backend, and the collectives that are
no-ops when alone."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import socket

import pytest
import torch
from torch.distributed import TCPStore

from flowmill.errors import UsageError
from flowmill.train.distributed import (
    AGENT_STORE_ENV,
    MASTER_PORT_BASE,
    MASTER_PORT_SPAN,
    Place,
    all_reduce_mean,
    backend_for,
    barrier,
    choose_device,
    free_port,
    job_store,
    loopback_store,
    place_of,
    placement,
    rendezvous_port,
)
from tests.helpers import non_loopback_address, reachable

SRUN_TASK = {  # the second task of `srun -N 2 -n 4` (job 42, step 3), on the second node
    "SLURM_JOB_ID": "42", "SLURM_STEP_ID": "3", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
    "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "gpu-[07-08]",
    "SLURM_JOB_NODELIST": "gpu-[05-09]", "SLURM_NTASKS": "4",
}


def test_torchrun_variables_come_first():
    environ = {**SRUN_TASK, "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    assert place_of(environ) == Place(1, 1, 2, 2, "h", 1234, "torchrun")


def test_a_plain_srun_step_leads_from_its_first_node_on_a_port_of_its_job_and_step():
    place = place_of(SRUN_TASK)
    assert place == Place(3, 1, 4, 2, "gpu-07", MASTER_PORT_BASE + 45, "srun")
    assert place.process_group_env() == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                                         "MASTER_ADDR": "gpu-07", "MASTER_PORT": str(MASTER_PORT_BASE + 45)}


def test_a_batch_script_without_srun_is_one_process():
    batch = {key: value for key, value in SRUN_TASK.items() if not key.startswith("SLURM_STEP")}
    assert place_of(batch).world_size == 1


def test_srun_tasks_that_do_not_fill_the_nodes_evenly_are_refused():
    with pytest.raises(UsageError, match="SLURM_STEP_NUM_TASKS: 3 tasks do not spread evenly over SLURM_STEP_NUM_NODES=2"):
        place_of({**SRUN_TASK, "SLURM_STEP_NUM_TASKS": "3"})


def test_open_mpi_ranks_with_the_leader_given():
    environ = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4",
               "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "node-a"}
    assert place_of(environ) == Place(2, 0, 4, 2, "node-a", 29500, "mpirun")
    with pytest.raises(UsageError, match="MASTER_ADDR: Open MPI does not say which host leads"):
        place_of({key: value for key, value in environ.items() if key != "MASTER_ADDR"})


def test_alone_without_any_launcher():
    assert place_of({}).launcher == "alone" and place_of({}).world_size == 1


def test_rendezvous_port_is_the_same_on_every_attempt_of_a_job():
    assert rendezvous_port("17") == rendezvous_port("17", "0") == MASTER_PORT_BASE + 17
    assert MASTER_PORT_BASE <= rendezvous_port("123456789", "5") < MASTER_PORT_BASE + MASTER_PORT_SPAN


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


def test_collectives_alone_are_no_ops():
    value = torch.tensor([1.5, 2.5])
    assert all_reduce_mean(value) is value
    barrier()


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_loopback_store_is_not_reachable_from_other_addresses():
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no address but loopback")
    store = loopback_store()
    assert reachable("127.0.0.1", store.port) and not reachable(address, store.port)
    client = TCPStore("127.0.0.1", store.port, is_master=False, wait_for_workers=False)
    client.set("key", "value")
    assert store.get("key") == b"value"


def test_state_beside_the_weights_goes_where_asked(monkeypatch):
    cpu = torch.device("cpu")
    assert placement("auto", cpu, "ema.device") == cpu and placement("cpu", cpu, "ema.device") == cpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="ema.device: cuda, but no CUDA device is visible; use ema.device=cpu or auto"):
        placement("cuda", cpu, "ema.device")


STORE_TIMEOUT = datetime.timedelta(seconds=30)


def test_rank_0_of_a_job_listens_on_the_leaders_address_only_and_the_other_ranks_meet_it_there():
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no address but loopback")
    # Two nodes led by the first one's address; one node that keeps to loopback (MASTER_ADDR=127.0.0.1).
    for leader, elsewhere, per_node in ((address, "127.0.0.1", 1), ("127.0.0.1", address, 2)):
        port = free_port()
        place = Place(0, 0, 2, per_node, leader, port, "srun")
        store = job_store(place, {}, STORE_TIMEOUT)
        assert reachable(leader, port) and not reachable(elsewhere, port), leader
        client = job_store(dataclasses.replace(place, rank=1, local_rank=0), {}, STORE_TIMEOUT)
        client.set("key", leader)
        assert store.get("key") == leader.encode()
        del client, store


def test_a_leader_named_loopback_on_a_job_of_several_nodes_listens_everywhere_and_says_so(monkeypatch, caplog):
    """Its own /etc/hosts may map a node's name to 127.0.1.1, where the other nodes cannot reach it."""
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no address but loopback")
    monkeypatch.setattr(logging.getLogger("flowmill"), "propagate", True)
    port = free_port()
    store = job_store(Place(0, 0, 4, 2, "localhost", port, "mpirun"), {}, STORE_TIMEOUT)
    assert reachable(address, port)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert {warning for warning in warnings if "resolves to" in warning} == {
        "the job's leader localhost resolves to 127.0.0.1 on its own node, which the other nodes cannot reach there; "
        "its rendezvous store listens on every interface instead (make localhost resolve to the address the other "
        "nodes reach, or give that address as MASTER_ADDR where the launcher reads it)"}
    del store


def test_the_processes_of_an_elastic_agent_meet_in_the_store_it_hosts_and_a_lone_process_on_loopback():
    assert job_store(Place(1, 1, 2, 2, "127.0.0.1", free_port(), "torchrun"), {AGENT_STORE_ENV: "True"},
                     STORE_TIMEOUT) is None
    address = non_loopback_address()
    store = job_store(Place(0, 0, 1, 1, "127.0.0.1", 0, "alone"), {}, STORE_TIMEOUT)
    assert reachable("127.0.0.1", store.port) and (address is None or not reachable(address, store.port))
