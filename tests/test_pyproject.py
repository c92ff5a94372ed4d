"""pyproject.toml: the wheel it builds is an installable library.

Built from a copy of the sources, the wheel holds the shipped configs and states version ranges
(not the lock's pins) and the extras. Installed with pip into a fresh venv whose packages are
those of this test environment, except that its torch is another release within the range (a
cluster's CUDA build, stood in for by its metadata), pip installs only flowmill and keeps that
torch; with a torch below the range it refuses. The installed ``flowmill config show`` then runs
from another folder and reads the config out of the installed package. Everything is offline
(``--no-index``): nothing is downloaded, so pip's decisions come from the metadata alone.
"""

from __future__ import annotations

import email
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

import flowmill

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "flowmill", "models", "data", "train", "launchers", "configs")
EXTRAS = {"s3", "gcs", "gpu", "test"}
CLUSTER_TORCH = "2.14.0+cu130"  # another release inside the range, as a cluster's CUDA build names itself
OLD_TORCH = "2.12.1+cu126"  # below the range


def offline_env() -> dict[str, str]:
    """The environment without this machine's pip settings (index, find-links, constraints)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PIP_", "PYTHON"))}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONNOUSERSITE": "1"}


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=offline_env(), timeout=300, **kwargs)


def build_wheel(out: Path) -> Path:
    """The wheel of a copy of the sources (so the checkout gets no build/ or egg-info folders)."""
    source = out / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    built = run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                 "print(build_meta.build_wheel(sys.argv[1]))", str(out / "dist")], cwd=source)
    assert built.returncode == 0, built.stderr[-3000:]
    return out / "dist" / built.stdout.strip().splitlines()[-1]


def fake_distribution(site: Path, name: str, version: str) -> None:
    """Installed-package metadata of ``name`` ``version`` (what pip reads to decide what to keep)."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")


def fresh_venv(root: Path, torch_version: str) -> tuple[Path, Path]:
    """A new venv seeing this environment's packages (a .pth to a view of them), except flowmill's
    and torch's metadata; torch's is ``torch_version``. Returns (its python, its site-packages)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, env=offline_env())
    python = root / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    host_site = Path(sysconfig.get_paths()["purelib"])
    view = root / "host-site-packages"
    view.mkdir()
    for entry in host_site.iterdir():
        hidden = entry.name.startswith(("flowmill", "__editable__", "torch-")) or entry.suffix == ".pth"
        if not hidden:
            (view / entry.name).symlink_to(entry)
    (site / "host.pth").write_text(f"{view}\n")
    fake_distribution(site, "torch", torch_version)
    return python, site


def pip_install(python: Path, wheel: Path, *options: str) -> subprocess.CompletedProcess:
    """pip (this environment's) installing ``wheel`` into the venv of ``python``, offline."""
    return run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index",
                "--no-compile", "--no-warn-conflicts", "--report", "-", "--quiet", *options, str(wheel)])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_the_wheel_ships_the_configs_and_states_ranges_and_extras(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = email.message_from_string(archive.read(f"flowmill-{flowmill.__version__}.dist-info/METADATA").decode())
    shipped = {f"flowmill/configs/{path.name}" for path in (REPO / "configs").glob("*.yaml")}
    assert "flowmill/configs/mmdit_tiny.yaml" in shipped and shipped <= names
    assert "flowmill/config_files.py" in names and "flowmill/models/mmdit.py" in names
    assert metadata["Version"] == flowmill.__version__
    assert set(metadata.get_all("Provides-Extra")) == EXTRAS
    requirements = [Requirement(line) for line in metadata.get_all("Requires-Dist")]
    runtime = {req.name: req.specifier for req in requirements if req.marker is None}
    assert {"torch", "deepspeed", "mlflow", "webdataset"} <= set(runtime)
    for name, specifier in runtime.items():
        assert specifier and all(spec.operator in (">=", "<") for spec in specifier), (name, specifier)
    assert runtime["torch"].contains("2.13.0") and runtime["torch"].contains(CLUSTER_TORCH)
    assert not runtime["torch"].contains(OLD_TORCH) and not runtime["torch"].contains("3.0.0")
    extras = {}
    for req in requirements:
        if req.marker is not None:
            extra = next(extra for extra in EXTRAS if req.marker.evaluate({"extra": extra}))
            extras.setdefault(extra, set()).add(req.name)
    assert extras == {"s3": {"s3fs", "boto3"}, "gcs": {"gcsfs"}, "gpu": {"nvidia-ml-py"},
                      "test": {"pytest", "pytest-xdist", "moto", "flowmill"}}
    # The lock (what make installs: the runtime and test dependencies) is one solution inside the ranges.
    locked = dict(line.lower().split("==") for line in (REPO / "requirements.lock").read_text().split())
    assert locked["torch"] == "2.13.0"
    made = [req for req in requirements if req.name in runtime or req.name in extras["test"] | extras["s3"]]
    for req in made:
        if req.name != "flowmill":
            assert req.specifier.contains(locked[req.name.lower()]), (req, locked.get(req.name.lower()))


@pytest.mark.slow
def test_pip_keeps_a_torch_in_the_range_and_the_installed_cli_reads_its_shipped_configs(wheel: Path, tmp_path: Path):
    python, site = fresh_venv(tmp_path / "venv", OLD_TORCH)
    refused = pip_install(python, wheel, "--dry-run")
    assert refused.returncode != 0 and "torch" in refused.stderr, refused.stderr[-3000:]

    shutil.rmtree(site / f"torch-{OLD_TORCH}.dist-info")
    fake_distribution(site, "torch", CLUSTER_TORCH)
    installed = pip_install(python, wheel)
    assert installed.returncode == 0, installed.stderr[-3000:]
    assert [item["metadata"]["name"] for item in json.loads(installed.stdout)["install"]] == ["flowmill"]
    versions = run([str(python), "-c", "from importlib.metadata import version; print(version('torch'), version('flowmill'))"])
    assert versions.stdout.split() == [CLUSTER_TORCH, flowmill.__version__]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    flowmill_bin = tmp_path / "venv" / "bin" / "flowmill"
    shown = run([str(flowmill_bin), "config", "show", "mmdit_tiny", "trainer.max_steps=3"], cwd=elsewhere)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert shown.stdout.splitlines()[0] == f"# mmdit_tiny: {site.resolve() / 'flowmill' / 'configs' / 'mmdit_tiny.yaml'}"
    config = yaml.safe_load(shown.stdout)
    assert config["task"] == "mmdit" and config["trainer"]["max_steps"] == 3
    assert run([str(flowmill_bin), "--version"], cwd=elsewhere).stdout == f"flowmill {flowmill.__version__}\n"
