"""flowmill.models.loading: `load_model` on a model folder without the training stack, and what it
refuses (a run's EMA weights are loaded in tests/train/test_model_io.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowmill.errors import UsageError
from flowmill.models import load_model
from flowmill.models.loading import is_model_folder, load_weights
from flowmill.models.mmdit import MMDiT, mmdit_config
from flowmill.models.sd3_convert import save_model_folder
from tests.helpers import fake_run


@pytest.fixture
def model_folder(tmp_path) -> tuple[MMDiT, Path]:
    torch.manual_seed(0)
    model = MMDiT(mmdit_config("tiny"))
    save_model_folder(tmp_path / "model", "mmdit", model.config, model.state_dict())
    return model, tmp_path / "model"


def test_a_model_folder_loads_in_eval_mode_with_its_weights(model_folder):
    model, folder = model_folder
    assert is_model_folder(folder) and not is_model_folder(folder.parent)
    loaded = load_model(folder)
    assert isinstance(loaded, MMDiT) and not loaded.training and loaded.config == model.config
    assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in model.state_dict().items())


def test_load_model_imports_no_training_stack(model_folder):
    _, folder = model_folder
    script = ("import sys; from flowmill.models import load_model; model = load_model(sys.argv[1]); "
              "print(type(model).__name__, [m for m in ('deepspeed', 'mlflow', 'submitit') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["MMDiT", "[]"]


def test_what_is_no_model_is_refused_saying_what_it_is(tmp_path, model_folder):
    with pytest.raises(UsageError, match="nowhere does not exist; pass a flowmill model folder"):
        load_weights(tmp_path / "nowhere")
    (tmp_path / "diffusers").mkdir()
    (tmp_path / "diffusers" / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="is a diffusers folder, not a flowmill model: import it first with "
                                         "`flowmill import sd3 .*diffusers --out MODEL_DIR`"):
        load_weights(tmp_path / "diffusers")
    (tmp_path / "notes").mkdir()
    with pytest.raises(UsageError, match="notes is not a flowmill model folder \\(flowmill_model.json\\), a run dir"):
        load_weights(tmp_path / "notes")
    with pytest.raises(UsageError, match="trains a 'flow_lm' model; model files are supported for: mmdit"):
        load_weights(fake_run(tmp_path / "flm", "flm", "flow_lm"))
    _, folder = model_folder
    (folder / "flowmill_model.json").write_text(json.dumps({"family": "vae", "config": {}}))
    with pytest.raises(UsageError, match="unknown model family 'vae'; choose one of: mmdit"):
        load_weights(folder)
