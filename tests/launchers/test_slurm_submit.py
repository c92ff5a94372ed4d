"""`flowmill launch slurm` on the login node: flags, sweeps, the configs of the runs, refusals.

The unit tests need no cluster. The refusals run the command in-process on the local cluster
(`make slurm-up`) and check that no submitit folder appeared, i.e. nothing was submitted.
"""

from __future__ import annotations

import argparse
import re

import pytest

from flowmill.errors import UsageError
from flowmill.launchers.slurm_submit import (
    check_slurm_options,
    flag_overrides,
    new_run_configs,
    resumed_config,
    sbatch_parameters,
    sweep_grid,
)
from flowmill.run_dir import RunDir
from flowmill.train.config import SlurmConfig, load_config, to_dict
from tests.helpers import TINY_CONFIG
from tests.launchers.cluster import launch, on_cluster, tiny


def slurm_flags(**given) -> argparse.Namespace:
    """The parsed flags of `flowmill launch slurm`, unset unless given."""
    names = ("partition", "nodes", "tasks_per_node", "time", "account", "qos", "constraint", "mem", "cpus_per_task",
             "gpus_per_node", "max_retries", "folder")
    return argparse.Namespace(**{**{name: None for name in names}, "slurm_extra": [], **given})


def test_flags_become_launcher_overrides():
    args = slurm_flags(nodes=2, time=30, folder="/x/slurm")
    args.slurm_extra = ["reservation=r1", "exclusive"]
    assert flag_overrides(args) == [
        "launcher.slurm.nodes=2", "launcher.slurm.time_min=30", "launcher.slurm.folder=/x/slurm",
        "launcher.slurm.extra.reservation=r1", "launcher.slurm.extra.exclusive=true",
    ]


def test_sweep_grid_is_the_product_first_key_slowest():
    assert sweep_grid(["a.x=1,2", "b.y=p,q"]) == [["a.x=1", "b.y=p"], ["a.x=1", "b.y=q"], ["a.x=2", "b.y=p"], ["a.x=2", "b.y=q"]]


@pytest.mark.parametrize(
    "sweeps, message",
    [
        (["optim.lr"], "--sweep 'optim.lr' must look like dotted.key=value1,value2"),
        (["optim.lr=1e-3,"], "must look like dotted.key=value1,value2"),
        (["optim.lr=1e-3", "optim.lr=1e-4"], "--sweep optim.lr is given twice"),
        (["launcher.slurm.nodes=1,2"], "--sweep launcher.slurm.nodes"),
        (["run.dir=a,b"], "--sweep run.dir"),
    ],
)
def test_sweep_grid_refused(sweeps, message):
    with pytest.raises(UsageError, match=message.replace(".", r"\.").replace("[", r"\[")):
        sweep_grid(sweeps)


def test_new_run_is_placed_by_overrides(tmp_path):
    (cfg,) = new_run_configs(str(TINY_CONFIG), [f"run.dir={tmp_path / 'run'}"], [])
    assert cfg.run.dir == str((tmp_path / "run").resolve())
    assert cfg.launcher.slurm.folder == str((tmp_path / "slurm" / "run").resolve())
    placed = load_config(TINY_CONFIG, [f"run.dir={cfg.run.dir}", f"launcher.slurm.folder={cfg.launcher.slurm.folder}"])
    assert to_dict(cfg) == to_dict(placed)  # nothing set on the config after loading


def test_sweep_runs_share_a_sweep_id_and_folder(tmp_path):
    configs = new_run_configs(str(TINY_CONFIG), [f"run.dir={tmp_path}"], ["optim.lr=1e-3,3e-4", "model.depth=1,2"])
    sweep_id = configs[0].run.sweep_id
    assert sweep_id and {cfg.run.sweep_id for cfg in configs} == {sweep_id}
    assert [cfg.run.dir for cfg in configs] == [str(tmp_path.resolve() / f"mmdit-tiny-{sweep_id}-{index}") for index in range(4)]
    assert {cfg.launcher.slurm.folder for cfg in configs} == {str(tmp_path.resolve() / "slurm" / f"mmdit-tiny-{sweep_id}")}
    assert [(cfg.optim.lr, cfg.model.depth) for cfg in configs] == [(1e-3, 1), (1e-3, 2), (3e-4, 1), (3e-4, 2)]


def test_sweep_key_also_overridden_refused(tmp_path):
    with pytest.raises(UsageError, match="--sweep optim.lr is also set by the override optim.lr=1e-4"):
        new_run_configs(str(TINY_CONFIG), [f"run.dir={tmp_path}", "optim.lr=1e-4"], ["optim.lr=1e-3,3e-4"])


def test_resumed_run_keeps_its_folder_and_takes_overrides(tmp_path):
    run_dir = tmp_path / "run"
    RunDir(run_dir).create(to_dict(load_config(TINY_CONFIG, [f"run.dir={run_dir}", "launcher.slurm.folder=/elsewhere/slurm"])))
    RunDir(run_dir).update_info(status="preempted")
    cfg = resumed_config(run_dir, ["trainer.max_steps=7"])
    assert (cfg.run.dir, cfg.launcher.slurm.folder, cfg.trainer.max_steps) == (str(run_dir.resolve()), "/elsewhere/slurm", 7)
    cfg = resumed_config(run_dir, ["launcher.slurm.folder="])
    assert cfg.launcher.slurm.folder == str(tmp_path.resolve() / "slurm" / "run")


def test_resume_of_a_folder_that_is_not_a_run_refused_without_the_cluster(tmp_path):
    with pytest.raises(UsageError, match="is not a flowmill run dir"):
        resumed_config(tmp_path, [])


@pytest.mark.parametrize(
    "values, message",
    [
        ({"nodes": 0}, "launcher.slurm.nodes: must be at least 1, got 0"),
        ({"max_retries": -1}, "launcher.slurm.max_retries: must be at least 0, got -1"),
        ({"cpus_per_task": 0}, "launcher.slurm.cpus_per_task: must be at least 1, got 0"),
        ({"time_min": 2, "signal_delay_s": 120}, "launcher.slurm.signal_delay_s: the checkpoint signal 120 s"),
        ({"extra": {"job_name": "x"}}, "launcher.slurm.extra.job_name: set by flowmill"),
        ({"python": " "}, "launcher.slurm.python: an empty command"),
        ({"srun_args": ["--cpu-bind none"]}, "launcher.slurm.srun_args: '--cpu-bind none' is several arguments in one entry; "
                                             "give each its own entry (--cpu-bind, none) or join option and value with '=' "
                                             "(--cpu-bind=none)"),
        ({"srun_args": ["--ntasks=3"]}, "launcher.slurm.srun_args: '--ntasks=3' is set by flowmill"),
        ({"srun_args": ["-N", "2"]}, "launcher.slurm.srun_args: '-N' is set by flowmill"),
        ({"srun_args": ["--output", "x.log"]}, "reserved: --output/-o, --error/-e, --unbuffered/-u"),
    ],
)
def test_slurm_options_refused(values, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        check_slurm_options(SlurmConfig(**values))


def test_srun_arguments_with_spaces_in_values_accepted():
    check_slurm_options(SlurmConfig(srun_args=["--export=ALL,NOTE=a b", "--comment", "two words", "--cpu-bind=none"]))


def test_sbatch_parameters_leave_unset_options_to_the_cluster():
    slurm = SlurmConfig(nodes=2, tasks_per_node=4, time_min=30, mem="64G", extra={"reservation": "r1"})
    assert sbatch_parameters(slurm, "run") == {
        "job_name": "run", "time": 30, "nodes": 2, "ntasks_per_node": 4, "signal_delay_s": 120, "mem": "64G",
        "additional_parameters": {"requeue": True, "reservation": "r1"},
    }
    prepared = SlurmConfig(setup=["module load cuda/12.4", "source /opt/env/bin/activate"], srun_args=["--cpu-bind=none"])
    parameters = sbatch_parameters(prepared, "run")
    assert parameters["setup"] == ["module load cuda/12.4", "source /opt/env/bin/activate"]
    assert parameters["srun_args"] == ["--cpu-bind=none"]


@on_cluster
@pytest.mark.parametrize(
    "flags, overrides, message",
    [
        (["--partition", "nope"], [], "launcher.slurm.partition: 'nope' is not a partition of this cluster; choose one of: debug"),
        (["--nodes", "3"], [], "launcher.slurm.nodes: 3 nodes asked for, partition debug has 2"),
        (["--tasks-per-node", "3"], ["parallel.pipeline_stages=2"], "parallel.pipeline_stages: 2 stages do not divide the world size 3"),
        (["--time", "1"], ["launcher.slurm.signal_delay_s=60"], "launcher.slurm.signal_delay_s"),
        (["--slurm-extra", "nodes=4"], [], "launcher.slurm.extra.nodes: set by flowmill"),
        (["--sweep", "launcher.slurm.nodes=1,2"], [], "--sweep launcher.slurm.nodes"),
        (["--sweep", "optim.lr=1e-3,3e-4"], ["optim.lr=1e-4"], "--sweep optim.lr is also set by the override optim.lr=1e-4"),
    ],
)
def test_refused_before_submission(flags, overrides, message, digits_dir, tmp_path, capfd):
    code, _ = launch(*flags, "--folder", str(tmp_path / "slurm"), *tiny(tmp_path / "run", digits_dir), *overrides)
    err = capfd.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "slurm").exists() and not (tmp_path / "run").exists()


@on_cluster
def test_no_sbatch_refused(digits_dir, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("PATH", str(tmp_path))
    code, _ = launch(*tiny(tmp_path / "run", digits_dir), "--folder", str(tmp_path / "slurm"))
    err = capfd.readouterr().err
    assert code == 2 and "sbatch is not on PATH" in err, err
    assert not (tmp_path / "slurm").exists()


@on_cluster
def test_resume_of_a_folder_that_is_not_a_run_refused(tmp_path, capfd):
    (tmp_path / "notarun").mkdir()
    code, _ = launch("--resume", str(tmp_path / "notarun"), "--folder", str(tmp_path / "slurm"))
    err = capfd.readouterr().err
    assert code == 2 and "is not a flowmill run dir" in err, err
    assert not (tmp_path / "slurm").exists()


@on_cluster
def test_folder_inside_a_new_run_dir_refused(digits_dir, tmp_path, capfd):
    code, _ = launch("--folder", str(tmp_path / "run" / "slurm"), *tiny(tmp_path / "run", digits_dir))
    err = capfd.readouterr().err
    assert code == 2 and "inside the run dir" in err and "launcher.slurm.folder" in err, err
    assert not (tmp_path / "run").exists()
