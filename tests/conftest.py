"""Shared fixtures: the packed digits with their tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.needs import summary_line

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Runs started by the tests log to stores in tmp, never to the store a developer's environment names.
os.environ.pop("MLFLOW_TRACKING_URI", None)

# What the shared finished run records in MLflow besides its config (tests/train/test_tracking_model.py reads it).
FINISHED_RUN_TRACKING = ("tracking.tags.team=tests", "tracking.description=The shared tiny run of the tests.",
                         "tracking.register_as=tiny-mmdit")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_sessionfinish(session):
    """After pytest's own summary: one line naming the tests skipped for what the machine lacks (tests/needs.py)
    and the commands that set it up. Outermost (tryfirst), so that it comes after pytest's last line."""
    result = yield
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and not hasattr(session.config, "workerinput"):  # the xdist controller reports
        reasons = [report.longrepr[2].removeprefix("Skipped: ") for report in reporter.stats.get("skipped", [])
                   if isinstance(report.longrepr, tuple)]
        if line := summary_line(reasons):
            reporter.write_line(line)
    return result


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """scikit-learn's digits packed into 8 shards, with a sentencepiece tokenizer beside them."""
    from flowmill.data.builtin import digit_captions, pack_builtin_digits
    from flowmill.data.pack import PackOptions
    from flowmill.data.text_tokenizer import train_text_tokenizer

    out = tmp_path_factory.mktemp("digits")
    pack_builtin_digits(out, options=PackOptions(shard_samples=225, progress=False))
    train_text_tokenizer(digit_captions(), out / "text_tokenizer", vocab_size=32)
    return out


@pytest.fixture(scope="session")
def finished_run(digits_dir, tmp_path_factory) -> Path:
    """A 4-step single-process tiny run with checkpoints at steps 2 and 4 (treat as read-only), tracked in
    ``<root>/mlflow.db`` with the tags, description and registered model name of ``FINISHED_RUN_TRACKING``."""
    from tests.helpers import TINY_CONFIG, flowmill, tiny_overrides

    root = tmp_path_factory.mktemp("finished")
    run_dir = root / "run"
    result = flowmill(
        "train", str(TINY_CONFIG), *tiny_overrides(digits_dir, run_dir, **{"trainer.max_steps": 4, "checkpoint.every_steps": 2}),
        *FINISHED_RUN_TRACKING,
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture
def clean_http_env(monkeypatch) -> None:
    """Unset MLflow's HTTP variables and restore them after the test, whatever a tracker's start sets."""
    from flowmill.train.tracking import HTTP_ENV_DEFAULTS

    for name in HTTP_ENV_DEFAULTS:
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def s3_digits(digits_dir):
    """moto's S3 server on 127.0.0.1 (``tests.remote_helpers.S3Server``) holding ``digits_dir`` under
    ``s3://flowmill-test/digits/``. Tests using it join ``xdist_group(STORE_GROUP)``."""
    from tests.remote_helpers import start_s3

    s3 = start_s3()
    s3.upload(digits_dir, "digits")
    yield s3
    s3.server.stop()


@pytest.fixture(scope="session")
def http_digits(digits_dir, tmp_path_factory):
    """A plain HTTP server on 127.0.0.1 (``tests.remote_helpers.HTTPShardServer``) serving a folder
    that holds ``digits_dir`` as ``/digits/``. Tests using it join ``xdist_group(STORE_GROUP)``."""
    from tests.remote_helpers import start_http

    root = tmp_path_factory.mktemp("www")
    (root / "digits").symlink_to(digits_dir)
    server = start_http(root)
    yield server
    server.stop()


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test (steady timing of small models), restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
