"""flowmill.launchers.local in this process, with the workers replaced: what is refused before any
process starts, the worker command lines of `launch local` and `resume`, and a run marked failed
(real workers run in tests/train/test_failures.py and test_resume.py)."""

from __future__ import annotations

import argparse
import json
import os
import signal

import pytest
from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.rendezvous import RendezvousParameters, rendezvous_handler_registry

from flowmill.errors import UsageError
from flowmill.launchers import local
from flowmill.launchers.local import check_before_launch, mark_failed
from flowmill.run_dir import COMPLETE_MARKER, Checkpoint, RunDir, step_tag
from flowmill.train.config import load_config, to_dict
from flowmill.train.distributed import free_port
from flowmill.train.signals import PARENT_PID_ENV
from tests.helpers import TINY_CONFIG, non_loopback_address, reachable, tiny_overrides


@pytest.fixture
def workers(monkeypatch) -> list[tuple[list[str], int, RunDir]]:
    """The calls of run_workers, which starts nothing."""
    calls = []
    monkeypatch.setattr(local, "run_workers", lambda cli_args, nproc, run_dir: calls.append((cli_args, nproc, run_dir)) or 0)
    return calls


def stopped_run(digits_dir, path, world_size: int = 2):
    """A run of the tiny config stopped at step 4, saved by ``world_size`` processes."""
    cfg = load_config(TINY_CONFIG, tiny_overrides(digits_dir, path))
    run = RunDir(path)
    run.create(to_dict(cfg))
    run.update_info(status="preempted", world_size=world_size)
    checkpoint = Checkpoint(run.checkpoints / step_tag(4))
    checkpoint.path.mkdir()
    (checkpoint.path / COMPLETE_MARKER).write_text(json.dumps({"step": 4, "world_size": world_size, "family": "mmdit"}))
    run.mark_latest(checkpoint)
    return cfg, run


def test_launch_pins_the_run_dir_every_worker_writes_to(digits_dir, tmp_path, monkeypatch, workers):
    monkeypatch.chdir(tmp_path)
    overrides = [f"data.path={digits_dir}", f"text.tokenizer={digits_dir / 'text_tokenizer.model'}"]  # no run.dir
    args = argparse.Namespace(config=str(TINY_CONFIG), overrides=overrides, nproc=2)
    assert local.launch_command(args) == 0
    [(cli_args, nproc, run_dir)] = workers
    assert nproc == 2 and run_dir.path.parent.name == "runs" and run_dir.path.name.startswith("mmdit-tiny-")
    assert cli_args == ["train", str(TINY_CONFIG), *overrides, f"run.dir={run_dir}"]
    assert not (tmp_path / "runs").exists()  # the workers create it


def test_resume_runs_on_the_runs_own_world_size_unless_told(digits_dir, tmp_path, workers):
    _, run = stopped_run(digits_dir, tmp_path / "run", world_size=2)
    args = argparse.Namespace(run_dir=str(run), overrides=["trainer.max_steps=8"], nproc=None)
    assert local.resume_command(args) == 0
    assert local.resume_command(argparse.Namespace(**{**vars(args), "nproc": 1})) == 0
    assert [(cli_args, nproc) for cli_args, nproc, _ in workers] == [
        (["train", "--resume", str(run), "trainer.max_steps=8"], 2),
        (["train", "--resume", str(run), "trainer.max_steps=8"], 1),
    ]


@pytest.mark.parametrize(
    "overrides, nproc, message",
    [
        ([], 0, "--nproc: must be at least 1, got 0"),
        (["parallel.pipeline_stages=2"], 3, "parallel.pipeline_stages"),
        (["data.path={tmp}/empty"], 1, "data.path: "),
    ],
)
def test_a_new_run_is_refused_before_any_worker_starts(digits_dir, tmp_path, overrides, nproc, message):
    overrides = [override.format(tmp=tmp_path) for override in overrides]
    cfg = load_config(TINY_CONFIG, tiny_overrides(digits_dir, tmp_path / "run") + overrides)
    with pytest.raises(UsageError, match=message):
        check_before_launch(cfg, RunDir(tmp_path / "run"), nproc, resume=False)
    assert not (tmp_path / "run").exists()


def test_a_run_dir_holding_a_run_is_refused_for_a_new_run(digits_dir, tmp_path):
    cfg, run = stopped_run(digits_dir, tmp_path / "run")
    with pytest.raises(UsageError, match=f"run.dir: {run} already holds a run; continue it with `flowmill resume {run}`"):
        check_before_launch(cfg, run, 1, resume=False)
    check_before_launch(cfg, run, 1, resume=True)


def test_a_resume_is_refused_with_another_model_or_without_a_checkpoint(digits_dir, tmp_path):
    cfg, run = stopped_run(digits_dir, tmp_path / "run")
    other = load_config(None, ["model.depth=3"], base=run.saved_config())
    with pytest.raises(UsageError, match="^model.depth: the checkpoints in"):
        check_before_launch(other, run, 1, resume=True)
    run.latest_file.unlink()
    with pytest.raises(UsageError, match="has no checkpoint yet"):
        check_before_launch(cfg, run, 1, resume=True)


def test_a_run_that_failed_before_its_first_checkpoint_is_taken_by_launch_and_resume(digits_dir, tmp_path, workers):
    cfg = load_config(TINY_CONFIG, tiny_overrides(digits_dir, tmp_path / "run"))
    run = RunDir(tmp_path / "run")
    run.create(to_dict(cfg))  # config, checkpoints/, logs/ and no run.json: it failed while starting
    check_before_launch(cfg, run, 1, resume=False)
    assert local.resume_command(argparse.Namespace(run_dir=str(run), overrides=[], nproc=None)) == 0
    run.update_info(status="failed", world_size=2)
    check_before_launch(cfg, run, 2, resume=True)
    assert local.resume_command(argparse.Namespace(run_dir=str(run), overrides=[], nproc=None)) == 0
    assert [(cli_args, nproc) for cli_args, nproc, _ in workers] == [(["train", "--resume", str(run)], 1),
                                                                     (["train", "--resume", str(run)], 2)]


def test_the_rendezvous_and_the_workers_store_listen_on_loopback_only():
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no address but loopback")
    rendezvous_handler_registry.register(local.LOOPBACK_RENDEZVOUS, local.loopback_rendezvous)
    params = RendezvousParameters(local.LOOPBACK_RENDEZVOUS, f"127.0.0.1:{free_port()}", "test", min_nodes=1, max_nodes=1)
    handler = rendezvous_handler_registry.create_handler(params)  # as torch elastic makes it
    info = handler.next_rendezvous()  # rank 0 of one node: it makes the store the workers share
    workers = info.bootstrap_store_info
    rendezvous_port = int(params.endpoint.rsplit(":", 1)[1])
    assert workers.master_addr == "127.0.0.1" and workers.master_port != rendezvous_port
    for port in (rendezvous_port, workers.master_port):
        assert reachable("127.0.0.1", port) and not reachable(address, port), port
    handler.shutdown()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_launcher_says_so_in_one_line_and_records_the_run_killed(tmp_path, monkeypatch, capsys, signum):
    def stopped_agent(config, entrypoint):
        assert os.environ[PARENT_PID_ENV] == str(os.getpid())  # the workers watch this process
        raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signum)

    monkeypatch.setattr(local, "elastic_launch", lambda config, entrypoint: lambda *args: stopped_agent(config, entrypoint))
    # run_workers sets both for its workers; recorded here, so they are taken out of this process again.
    monkeypatch.setenv(PARENT_PID_ENV, "")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.update_info(status="running")  # a worker killed before it could record its end
    assert local.run_workers(["train"], 2, run) == 128 + signum
    assert capsys.readouterr().err == (f"flowmill: stopped by {signal.Signals(signum).name}; the workers were stopped; "
                                       f"run dir: {run}\n")
    assert run.info()["status"] == "killed"


def test_mark_failed_changes_only_a_running_run(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    mark_failed(run)
    assert not run.info_file.exists()  # a run that never started records nothing
    run.update_info(status="running")
    mark_failed(run)
    assert run.info()["status"] == "failed"
    run.update_info(status="killed")  # stopped by the agent after another rank failed
    mark_failed(run)
    assert run.info()["status"] == "failed"
    run.update_info(status="finished")
    mark_failed(run)
    assert run.info()["status"] == "finished"
