"""``flowmill config show|list`` and ``flowmill --version``: read configs without starting anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

import flowmill
from flowmill import cli
from flowmill.config_files import read_config, shipped_dir


def test_show_prints_the_resolved_config_with_the_file_it_came_from(tmp_path: Path, capsys):
    child = tmp_path / "child.yaml"
    child.write_text("base: mmdit_tiny\ntrainer:\n  seed: 3\n")
    assert cli.main(["config", "show", str(child), "trainer.max_steps=4"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"# {child}: {child.resolve()}"
    shown = yaml.safe_load(out)
    expected = read_config("mmdit_tiny")
    expected["trainer"].update(seed=3, max_steps=4)
    assert shown == expected


def test_show_full_adds_every_default_and_checks_the_config(capsys):
    assert cli.main(["config", "show", "mmdit_tiny", "--full"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["trainer"]["max_steps"] == 20 and shown["trainer"]["grad_accum_steps"] == 1
    assert shown["model"]["depth"] > 0  # from the tiny size preset
    assert cli.main(["config", "show", "mmdit_tiny", "--full", "model.dpeth=2"]) == 2
    assert "model.dpeth" in capsys.readouterr().err


def test_show_and_list_import_no_torch_and_version_prints_the_package_version():
    code = """
import contextlib, io, json, sys
import flowmill.cli
outputs = []
for argv in (["config", "show", "mmdit_tiny"], ["config", "list"], ["--version"]):
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
        flowmill.cli.main(argv)
    outputs.append(out.getvalue())
print(json.dumps([outputs, "torch" in sys.modules]))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    (show, listing, version), imported_torch = json.loads(result.stdout)
    assert not imported_torch
    assert yaml.safe_load(show) == read_config("mmdit_tiny")
    assert ["mmdit_tiny", str(shipped_dir() / "mmdit_tiny.yaml")] in [line.split() for line in listing.splitlines()]
    assert version == f"flowmill {flowmill.__version__}\n"


def test_a_command_that_takes_a_config_accepts_a_shipped_name(capsys):
    # The name resolves before anything starts: an unknown key in the shipped config's section is refused.
    assert cli.main(["launch", "local", "--nproc", "1", "mmdit_tiny", "trainer.nope=1"]) == 2
    assert "trainer.nope" in capsys.readouterr().err
    assert cli.main(["train", "no_such_config"]) == 2
    assert "config no_such_config does not exist" in capsys.readouterr().err
