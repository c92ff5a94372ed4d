"""flowmill.config_files: a config named by path or shipped name, its base: chain merged, cycles refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flowmill.config_files import find_config, read_config, resolve_config, shipped_dir, shipped_names
from flowmill.errors import UsageError
from flowmill.train.config import load_config, to_dict

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_every_config_of_the_repo_ships_under_its_name():
    assert shipped_names() == sorted(path.stem for path in (REPO / "configs").glob("*.yaml"))
    assert find_config("mmdit_tiny") == find_config("mmdit_tiny.yaml") == shipped_dir() / "mmdit_tiny.yaml"
    assert read_config("mmdit_tiny") == yaml.safe_load((REPO / "configs" / "mmdit_tiny.yaml").read_text())


def test_an_existing_file_wins_over_a_shipped_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "mmdit_tiny.yaml", {"task": "mine"})
    assert read_config("mmdit_tiny.yaml") == {"task": "mine"}
    assert read_config("mmdit_tiny")["task"] == "mmdit"


def test_an_unknown_config_is_refused_listing_the_shipped_ones():
    with pytest.raises(UsageError, match=r"config nope.yaml does not exist; pass a YAML file or a shipped config: .*mmdit_tiny"):
        find_config("nope.yaml")


def test_a_config_starts_from_its_base_recursively(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "middle.yaml", {"base": "mmdit_tiny", "trainer": {"max_steps": 7}, "sample": {"prompts": ["a"]}})
    child = write(tmp_path / "child.yaml", {"base": "sub/middle.yaml", "trainer": {"seed": 3}, "run": {"name": "child"}})
    shipped = read_config("mmdit_tiny")
    resolved = read_config(child)
    assert "base" not in resolved
    # Mappings merge key by key, the nearest file wins; lists are replaced whole.
    assert resolved["trainer"] == {**shipped["trainer"], "max_steps": 7, "seed": 3}
    assert resolved["sample"]["prompts"] == ["a"]
    assert resolved["run"] == {"name": "child"} and resolved["model"] == shipped["model"]
    assert resolve_config(child, ["trainer.seed=5"])["trainer"]["seed"] == 5
    typed = load_config(child, ["trainer.seed=5"])
    assert to_dict(typed) == to_dict(load_config("mmdit_tiny", [
        "trainer.max_steps=7", "trainer.seed=5", "run.name=child", "sample.prompts=[a]"]))


def test_a_cycle_of_bases_is_refused_in_one_line_naming_the_files(tmp_path: Path):
    first = write(tmp_path / "first.yaml", {"base": "second.yaml", "task": "mmdit"})
    second = write(tmp_path / "second.yaml", {"base": "first.yaml"})
    with pytest.raises(UsageError) as caught:
        read_config(first)
    message = str(caught.value)
    assert "\n" not in message
    assert message == f"base: the configs start from each other in a cycle: {first} -> {second} -> {first}"
    write(tmp_path / "self.yaml", {"base": "self.yaml"})
    with pytest.raises(UsageError, match="cycle"):
        read_config(tmp_path / "self.yaml")


@pytest.mark.parametrize("base, message", [
    ("missing.yaml", r"config missing.yaml does not exist \(looked beside .*\); pass a YAML file"),
    (["a", "b"], r"bad.yaml: base must name one config"),
])
def test_a_bad_base_is_refused_naming_it(tmp_path: Path, base, message):
    bad = write(tmp_path / "bad.yaml", {"base": base})
    with pytest.raises(UsageError, match=message):
        read_config(bad)


def test_an_override_whose_value_is_no_yaml_is_refused_naming_its_key():
    with pytest.raises(UsageError, match=r"^trainer.seed: the override's value '\[' is not YAML .*; a string goes in quotes"):
        resolve_config("mmdit_tiny", ["trainer.seed=["])
    assert resolve_config("mmdit_tiny", ['run.name="["'])["run"]["name"] == "["
