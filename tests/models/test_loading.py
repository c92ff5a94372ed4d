"""flowmill.models.loading: `load_model` on a model folder without the training stack, `load_vae`, and what they
refuse (a run's EMA weights are loaded in tests/train/test_model_io.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowmill.errors import UsageError
from flowmill.models import load_model
from flowmill.models.loading import is_model_folder, load_vae, load_weights
from flowmill.models.mmdit import MMDiT, mmdit_config
from flowmill.models.sd3_convert import save_model_folder
from flowmill.models.vae import AUTOENCODER_SIZES, Autoencoder, LatentSpace
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
    # diffusers too: only a VAE needs it, and its import costs every process seconds of start-up.
    _, folder = model_folder
    script = ("import sys; from flowmill.models import load_model; model = load_model(sys.argv[1]); "
              "print(type(model).__name__, [m for m in ('deepspeed', 'mlflow', 'submitit', 'diffusers') if m in sys.modules])")
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


def test_load_vae_refuses_what_is_no_vae_in_one_line_naming_the_file(tmp_path, model_folder):
    def refused(path, message):
        with pytest.raises(UsageError, match=message) as error:
            load_vae(path)
        assert "\n" not in str(error.value)

    refused(tmp_path / "nowhere", "nowhere does not exist; a VAE is a diffusers AutoencoderKL folder")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "empty/config.json does not exist; a VAE is a diffusers AutoencoderKL folder")
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    refused(tmp_path / "no-weights", "no-weights/diffusion_pytorch_model.safetensors does not exist; the VAE folder")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    refused(tmp_path / "unet", "unet/config.json describes a UNet2DConditionModel, not an AutoencoderKL")
    (tmp_path / "bad-json").mkdir()
    (tmp_path / "bad-json" / "config.json").write_text("{")
    (tmp_path / "bad-json" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    refused(tmp_path / "bad-json", "bad-json/config.json: not JSON")
    # A run of another family is refused before its (here absent) weights are read.
    refused(fake_run(tmp_path / "mmdit-run", "mmdit", "mmdit"),
            "mmdit-run holds a 'mmdit' model, not an autoencoder; a VAE is a diffusers AutoencoderKL folder or a flowmill")
    _, folder = model_folder
    refused(folder, "holds a 'mmdit' model, not an autoencoder")


def test_load_vae_reads_an_autoencoder_model_folder(tmp_path):
    torch.manual_seed(0)
    model = Autoencoder(AUTOENCODER_SIZES["tiny"])
    save_model_folder(tmp_path / "vae", "autoencoder", model.config, model.state_dict())
    space = load_vae(tmp_path / "vae")
    assert space.latent_channels == 4 and space.scaling_factor is None and space.source == str(tmp_path / "vae")
    assert space.sha256 == LatentSpace(model.vae, None, None, "live").sha256
