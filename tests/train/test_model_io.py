"""Models in and out: `flowmill import/export sd3`, load_model, sampling a model folder, and the
refusals of what does not fit (a run fine-tuning from a model folder: tests/train/tasks/test_mmdit.py;
load_model's own refusals: tests/models/test_loading.py)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import SD3Transformer2DModel
from PIL import Image
from safetensors.torch import load_file

from flowmill.cli import main
from flowmill.models import load_model
from flowmill.models.mmdit import MMDiT
from flowmill.run_dir import Checkpoint
from flowmill.train.model_io import export_sd3, import_sd3, load_weights
from flowmill.weights import read_ema
from tests.helpers import fake_run, read_jsonl
from tests.latent_helpers import random_vae
from tests.sd3_helpers import random_sd3

torch.set_num_threads(1)


def inputs(channels: int = 1, size: int = 32, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, channels, size, size, generator=generator), torch.rand(2, generator=generator),
            torch.randn(2, 5, 32, generator=generator), torch.randn(2, 32, generator=generator))


def diffusers_velocity(model, img, t, txt, vec):
    with torch.no_grad():
        return model(hidden_states=img, encoder_hidden_states=txt, pooled_projections=vec, timestep=1000 * t).sample


def flowmill_velocity(model, img, t, txt, vec):
    with torch.no_grad():
        return model(img, t, txt, vec)


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def sd3_folder(tmp_path):
    reference = random_sd3()
    reference.save_pretrained(tmp_path / "sd3")
    return reference, tmp_path / "sd3"


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_import_export_and_sample_a_diffusers_model(sd3_folder, finished_run, tmp_path, capsys):
    reference, folder = sd3_folder
    code, out, _ = cli(capsys, "import", "sd3", folder, "--out", tmp_path / "model")
    assert code == 0 and "wrote" in out
    model = load_model(tmp_path / "model")
    assert isinstance(model, MMDiT) and not model.training
    img, t, txt, vec = inputs()
    expected = diffusers_velocity(reference, img, t, txt, vec)
    assert (flowmill_velocity(model, img, t, txt, vec) - expected).abs().max() <= 1e-5 * expected.abs().max()

    code, _, _ = cli(capsys, "export", "sd3", tmp_path / "model", tmp_path / "back")
    assert code == 0
    back, info = SD3Transformer2DModel.from_pretrained(tmp_path / "back", low_cpu_mem_usage=False, output_loading_info=True)
    assert not any(info.values()), info
    assert torch.equal(diffusers_velocity(back.eval(), img, t, txt, vec), expected)

    # A model folder samples with a run's text encoder (the tiny run's widths match); long prompts warn.
    long_prompt = "a handwritten digit three " * 4
    warnings = Recorder()
    logging.getLogger("flowmill").addHandler(warnings)
    try:
        code, _, err = cli(capsys, "sample", tmp_path / "model", "--text-from", finished_run, "--prompt", long_prompt,
                           "--prompt", "seven", "--num-samples", "2", "--steps", "2", "--out", tmp_path / "s")
    finally:
        logging.getLogger("flowmill").removeHandler(warnings)
    assert code == 0, err
    assert len(warnings.messages) == 1 and "has 89 tokens, more than text.max_length=32: it is truncated" in warnings.messages[0]
    assert Image.open(tmp_path / "s" / "grid.png").size == (2 * (2 * 34 + 2), 2 * (2 * 34 + 2))


def test_a_run_exports_its_ema_weights_or_with_live_its_trained_weights(finished_run, tmp_path):
    checkpoint = finished_run / "checkpoints" / "step-00000004"
    ema = read_ema(Checkpoint(checkpoint))
    model = load_model(finished_run)
    assert not model.training and all(torch.equal(model.state_dict()[name], ema[name]) for name in ema)
    earlier = load_model(finished_run / "checkpoints" / "step-00000002")
    assert not torch.equal(earlier.final.linear.weight, model.final.linear.weight)

    export_sd3(finished_run, tmp_path / "ema")
    exported = SD3Transformer2DModel.from_pretrained(tmp_path / "ema", low_cpu_mem_usage=False).eval()
    img, t, txt, vec = inputs()
    expected = flowmill_velocity(model, img, t, txt, vec)
    assert (diffusers_velocity(exported, img, t, txt, vec) - expected).abs().max() <= 1e-5 * expected.abs().max()

    export_sd3(finished_run, tmp_path / "live", live=True)
    _, _, live = load_weights(finished_run, live=True)
    trained = torch.load(checkpoint / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(torch.equal(live[name], trained[name]) for name in trained)
    assert not all(torch.equal(live[name], ema[name]) for name in ema)
    exported = load_file(tmp_path / "live" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(exported["proj_out.weight"], trained["final.linear.weight"])


def test_what_is_not_an_sd3_model_is_refused(sd3_folder, finished_run, tmp_path, capsys):
    _, folder = sd3_folder
    config = json.loads((folder / "config.json").read_text())
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "config.json").write_text(json.dumps({**config, "_class_name": "FluxTransformer2DModel"}))
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text("{}")
    fake_run(tmp_path / "flm", "flm", "flow_lm")
    import_sd3(folder, tmp_path / "model")
    cases = [
        (("import", "sd3", flux, "--out", tmp_path / "x"), "not an SD3 transformer: _class_name is 'FluxTransformer2DModel'"),
        (("import", "sd3", pipeline, "--out", tmp_path / "x"), "transformer does not exist; an SD3 pipeline folder holds transformer/ and vae/"),
        (("import", "sd3", tmp_path / "model", "--out", tmp_path / "x"), "config.json is missing"),
        (("import", "sd3", folder, "--out", tmp_path / "model"), "exists and is not an empty folder"),
        (("export", "sd3", folder, tmp_path / "x"), "is a diffusers folder, not a flowmill model: import it first"),
        (("export", "sd3", tmp_path / "flm", tmp_path / "x"), "trains a 'flow_lm' model; model files are supported for: mmdit"),
        (("export", "sd3", tmp_path / "nowhere", tmp_path / "x"), "does not exist; pass a flowmill model folder"),
        (("export", "sd3", tmp_path / "model", tmp_path / "x", "--live"), "--live reads a run's checkpoint"),
    ]
    for args, message in cases:
        code, _, err = cli(capsys, *args)
        assert code == 2 and message in err, (args, err)
    assert not (tmp_path / "x").exists()

    sample = ("--prompt", "a handwritten digit one", "--steps", "1", "--num-samples", "1", "--out", tmp_path / "s")
    code, _, err = cli(capsys, "sample", tmp_path / "model", *sample)
    assert code == 2 and "--text-from: " in err and "holds no text encoder" in err
    code, _, err = cli(capsys, "sample", finished_run, "--text-from", finished_run, *sample)
    assert code == 2 and "only a model folder needs it" in err
    code, _, err = cli(capsys, "sample", tmp_path / "model", "--text-from", finished_run, "--sampler", "eulr", *sample)
    assert code == 2 and "unknown sampler 'eulr'" in err and "euler" in err
    random_sd3(joint_attention_dim=48).save_pretrained(tmp_path / "wide")
    import_sd3(tmp_path / "wide", tmp_path / "wide_model")
    code, _, err = cli(capsys, "sample", tmp_path / "wide_model", "--text-from", finished_run, *sample)
    assert code == 2 and "txt width 32" in err and "txt_dim=48" in err
    random_sd3(in_channels=16, out_channels=16).save_pretrained(tmp_path / "latent")
    import_sd3(tmp_path / "latent", tmp_path / "latent_model")
    code, _, err = cli(capsys, "sample", tmp_path / "latent_model", "--text-from", finished_run, *sample)
    assert code == 2 and "16-channel latents" in err



def test_an_sd3_pipeline_folder_brings_its_vae_and_samples_decode_through_it(finished_run, tmp_path, capsys):
    pipeline = tmp_path / "sd3"
    random_sd3(in_channels=16, out_channels=16).save_pretrained(pipeline / "transformer")
    vae = random_vae(pipeline / "vae", 1.5, 0.0609, in_channels=3, out_channels=3, latent_channels=16)
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    code, out, err = cli(capsys, "import", "sd3", pipeline, "--out", tmp_path / "model")
    assert code == 0, err
    assert (tmp_path / "model" / "vae" / "config.json").read_text() == (vae / "config.json").read_text()
    assert load_model(tmp_path / "model").config.in_channels == 16

    code, _, err = cli(capsys, "sample", tmp_path / "model", "--text-from", finished_run, "--prompt", "a handwritten digit one",
                       "--steps", "2", "--num-samples", "2", "--out", tmp_path / "s")
    assert code == 0, err
    records = read_jsonl(tmp_path / "s" / "samples.jsonl")
    image = Image.open(tmp_path / "s" / records[0]["file"])
    assert len(records) == 2 and image.size == (128, 128) and image.mode == "RGB"  # 32x32x16 latents, 4x upsampled
    assert (tmp_path / "s" / "grid.png").is_file()

    (pipeline / "vae" / "config.json").unlink()
    code, _, err = cli(capsys, "import", "sd3", pipeline, "--out", tmp_path / "again")
    assert code == 2 and "vae/config.json does not exist" in err and not (tmp_path / "again").exists()
