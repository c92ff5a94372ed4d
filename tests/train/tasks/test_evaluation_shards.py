"""Every rank evaluates its share: each task's evaluation of the same tiny model on 2 gloo processes
equals a single-process one (fp32, to 1e-6), with the held-out set split unevenly (3 + 2) and with
one rank's share empty."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from safetensors.torch import save_file

from flowmill.data.builtin import MovingDigitsSpec, pack_moving_digits
from flowmill.data.pack import PackOptions
from flowmill.models.flow_lm import FlowLM
from flowmill.run_dir import CONFIG_FILE, EMA_FILE, SOURCE_FILE, RunDir
from flowmill.train import judge as judge_module
from flowmill.train.config import load_config
from flowmill.train.distributed import DistEnv, free_port
from flowmill.train.sample import load_task_and_model
from flowmill.train.tasks import flm as flm_module
from flowmill.train.tasks import fmlm as fmlm_module
from flowmill.train.tasks import get_task_class
from tests.helpers import REPO, TINY_CONFIG, flowmill_ok, read_jsonl, tiny_overrides
from tests.text_helpers import FLM_TINY, FMLM_TINY, flm_model_overrides, flm_overrides, pack_tiny_text

pytestmark = pytest.mark.slow

VIDEO_TOKENIZER_TINY = REPO / "configs" / "video_tokenizer_tiny.yaml"
TOLERANCE = 1e-6  # fp32: the figures of 2 ranks against 1, absolute (relative for figures above 1)
WORLD = 2
SHARD_CHUNK = 2  # text passes of the 2-process run: several per rank
ALONE = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``model`` with seeded noise on every weight: zero-initialised heads and gates would make the
    figures trivial (a fresh flow LM's samples are all one token)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def build(case: dict, env: DistEnv):
    """The case's task and its model: the same weights in every process (seeded), in eval mode."""
    cfg = load_config(case["config"], case["overrides"])
    task = get_task_class(cfg.task)(cfg, env, RunDir(case["run_dir"]))
    torch.manual_seed(0)
    return task, perturbed(task.build_model(), seed=0).eval()


def run_case(case: dict, env: DistEnv, out: Path) -> dict:
    """Evaluate at step 1 as the training loop does; for a whole model, rank 0 then writes the samples of
    step 1 (from the evaluation) and of step 2 (made anew, alone)."""
    task, model = build(case, env)
    metrics = task.evaluate(model, 1)
    files = []
    if env.is_main:
        (out / "samples").mkdir(parents=True)
        files = [path.name for step in (1, 2) for path in task.log_samples(model, step, out / "samples")]
    result = {"metrics": metrics, "files": files}
    if hasattr(task, "_samples"):
        result["samples"] = task._samples[1].tolist()
    if hasattr(task, "_last_recon"):
        recon = task._last_recon
        result["recon_scores"] = {str(k): list(v) for k, v in recon.scores.items()}
        out.mkdir(parents=True, exist_ok=True)
        torch.save(recon.decoded, out / "decoded.pt")
    return result


def worker(rank: int, world: int, port: int, cases: dict, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # what DeepSpeed reads
    dist.init_process_group("gloo")
    flm_module.EVAL_CHUNK = fmlm_module.EVAL_CHUNK = flm_module.SAMPLE_CHUNK = SHARD_CHUNK
    trained = []
    train_judge = judge_module.train_judge

    def counting(*args, **kwargs):
        trained.append(rank)
        return train_judge(*args, **kwargs)

    judge_module.train_judge = counting
    env = DistEnv(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"))
    results = {name: run_case(case, env, Path(out) / f"{name}-rank{rank}") for name, case in cases.items()}
    results["judge_trainings"] = len(trained)
    Path(out, f"rank-{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def fake_flow_lm(folder: Path, model_section: dict, config, seed: int) -> None:
    """A copied teacher/corrector folder as a distillation run keeps it: config.yaml, ema.safetensors, source.json."""
    folder.mkdir(parents=True)
    (folder / CONFIG_FILE).write_text(yaml.safe_dump({"task": "flm", "model": model_section}))
    torch.manual_seed(seed)
    save_file({k: v.contiguous() for k, v in perturbed(FlowLM(config), seed).state_dict().items()}, folder / EMA_FILE)
    (folder / SOURCE_FILE).write_text(json.dumps({"origin": "test"}))


def fmlm_run_dir(root: Path, text, stage: str) -> tuple[Path, list[str]]:
    """A distillation run dir of ``stage`` holding a random teacher (and corrector) copy, and its overrides."""
    run_dir = root / f"fmlm-{stage}"
    flm_cfg = load_config(FLM_TINY, flm_overrides(text, run_dir, **flm_model_overrides(text)))
    teacher = dataclasses.replace(flm_cfg.model.architecture(), learned_loss_weight=False)
    model_section = dataclasses.asdict(teacher)
    distill = {"stage": stage, "teacher": "teacher-run", "corrector": "corrector-run" if stage == "student" else None}
    fake_flow_lm(run_dir / "teacher", model_section, teacher, seed=1)
    if stage == "student":
        fake_flow_lm(run_dir / "corrector", model_section,
                     dataclasses.replace(teacher, flow_map=True, learned_loss_weight=True), seed=2)
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump({"distill": distill}))
    shutil.copyfile(text.tokenizer, run_dir / "text_tokenizer.model")
    return run_dir, [f"distill.{key}={'null' if value is None else value}" for key, value in distill.items()]


def make_cases(root: Path, digits: Path, clips: Path, text) -> dict:
    """Per task: 5 held-out items over 2 ranks (3 + 2), and 1 (rank 1 has none); for text, 5 samples
    (rank 1 runs one pass fewer)."""
    judges = root / "judges"
    cases = {}
    for name, count in (("split", 5), ("empty", 1)):
        cases[f"mmdit-{name}"] = {"config": TINY_CONFIG, "overrides": [
            *tiny_overrides(digits, root / "mmdit"), f"eval.num_samples={count}"]}
        cases[f"video-{name}"] = {"config": VIDEO_TOKENIZER_TINY, "overrides": [
            f"data.path={clips}", f"eval.num_samples={count + 1}", f"recon.num_clips={count}",
            f"sample.num_per_prompt={min(count, 2)}"]}
        text_eval = [f"judge.cache_dir={judges}", f"eval.num_samples={count}", "sample.num_per_prompt=5"]
        cases[f"flm-{name}"] = {"config": FLM_TINY, "overrides": [
            *flm_overrides(text, root / "flm", **flm_model_overrides(text)), *text_eval]}
        for stage in ("corrector", "student"):
            run_dir, distill = fmlm_run_dir(root / name, text, stage)
            cases[f"fmlm-{stage}-{name}"] = {"config": FMLM_TINY, "run_dir": run_dir, "overrides": [
                *flm_overrides(text, run_dir), *distill, *text_eval]}
        for case_name, case in cases.items():
            if case_name.endswith(name):
                case.setdefault("run_dir", root / "run")
    return cases


@pytest.fixture(scope="module")
def shards(digits_dir, text, tmp_path_factory):
    """Every case evaluated on 2 gloo processes (once) and in this process; the judge cache starts empty."""
    root = tmp_path_factory.mktemp("shards")
    clips = root / "clips"
    pack_moving_digits(clips, num_clips=16, spec=MovingDigitsSpec(frames=4, size=16),
                       options=PackOptions(shard_samples=8, progress=False))
    cases = make_cases(root, digits_dir, clips, text)
    out = root / "out"
    mp.spawn(worker, args=(WORLD, free_port(), cases, str(out)), nprocs=WORLD, join=True)
    ranks = [json.loads((out / f"rank-{rank}.json").read_text()) for rank in range(WORLD)]
    single = {name: run_case(case, ALONE, out / f"{name}-single") for name, case in cases.items()}
    return {"ranks": ranks, "single": single, "out": out, "cases": cases}


def differences(ours: dict, theirs: dict) -> tuple[float, float, str]:
    """Max absolute and max relative difference over the metrics, and the metric of the latter."""
    relative = {key: abs(ours[key] - theirs[key]) / max(abs(theirs[key]), 1e-12) for key in theirs}
    worst = max(relative, key=relative.get)
    return max(abs(ours[key] - theirs[key]) for key in theirs), relative[worst], worst


def check_case(shards: dict, name: str) -> dict:
    """Assert that every rank reports the single-process figures; print how close they are."""
    single = shards["single"][name]["metrics"]
    assert all(math.isfinite(value) for value in single.values()), single
    for rank, results in enumerate(shards["ranks"]):
        ours = results[name]["metrics"]
        assert ours == pytest.approx(single, rel=TOLERANCE, abs=TOLERANCE), (name, rank)
        absolute, relative, worst = differences(ours, single)
        print(f"{name} rank {rank}: {len(single)} metrics, max abs diff {absolute:.2e}, max rel diff {relative:.2e} ({worst})")
    return single


@pytest.mark.parametrize("name", ["mmdit-split", "mmdit-empty"])
def test_mmdit_validation_loss_agrees(shards, name):
    metrics = check_case(shards, name)
    assert {"val/loss", "val/loss_t0.1", "val/loss_t0.5", "val/loss_t0.9"} <= set(metrics)


def test_mmdit_rank_0_writes_the_sample_grids(shards):
    assert shards["ranks"][0]["mmdit-split"]["files"] == ["grid-00000001.png", "grid-00000002.png"]
    assert shards["ranks"][1]["mmdit-split"]["files"] == []


@pytest.mark.parametrize("name", ["video-split", "video-empty"])
def test_video_tokenizer_losses_and_reconstruction_quality_agree(shards, name):
    metrics = check_case(shards, name)
    assert {"val/loss", "val/loss_k1", "recon/psnr_k4", "recon/ssim_k2"} <= set(metrics)
    out = shards["out"]
    single = torch.load(out / f"{name}-single" / "decoded.pt")
    for rank, results in enumerate(shards["ranks"]):
        # The GIF's clips, gathered from the ranks that decoded them, and the plots' scores.
        decoded = torch.load(out / f"{name}-rank{rank}" / "decoded.pt")
        assert all(torch.allclose(decoded[k], single[k], atol=1e-5) for k in single)
        scores, single_scores = results[name]["recon_scores"], shards["single"][name]["recon_scores"]
        assert set(scores) == set(single_scores)
        assert all(scores[k] == pytest.approx(single_scores[k], abs=TOLERANCE) for k in scores)


def test_video_tokenizer_rank_0_writes_gifs_and_plots(shards):
    assert shards["ranks"][0]["video-split"]["files"] == [
        f"{kind}-0000000{step}.{ext}" for step in (1, 2) for kind, ext in (("recon", "gif"), ("psnr", "png"), ("ssim", "png"))]


@pytest.mark.parametrize("name", ["flm-split", "flm-empty"])
def test_flm_cross_entropy_and_sample_scores_agree(shards, name):
    metrics = check_case(shards, name)
    assert {"val/ce", "val/ce_tau0.5", "sample/entropy", "sample/gen_ppl"} <= set(metrics)
    single = shards["single"][name]["samples"]
    assert len(single) == 5 and all(results[name]["samples"] == single for results in shards["ranks"])


def test_flm_rank_0_writes_the_samples_it_gathered(shards):
    """Step 1's text is the gathered evaluation samples, step 2's rank 0 made alone: the same."""
    out = shards["out"] / "flm-split-rank0" / "samples"
    first, second = (out / "text-00000001.txt").read_text(), (out / "text-00000002.txt").read_text()
    assert first.count("=== sample") == 5 and first.split("\n", 1)[1] == second.split("\n", 1)[1]
    assert first == (shards["out"] / "flm-split-single" / "samples" / "text-00000001.txt").read_text()


@pytest.mark.parametrize("name", ["fmlm-corrector-split", "fmlm-student-split", "fmlm-corrector-empty", "fmlm-student-empty"])
def test_fmlm_distill_error_and_student_ce_agree(shards, name):
    metrics = check_case(shards, name)
    assert {"val/distill_error", "sample/entropy", "sample/gen_ppl"} <= set(metrics)
    assert ("val/ce" in metrics) == ("student" in name)


def test_the_judge_is_trained_once_by_rank_0(shards):
    assert [results["judge_trainings"] for results in shards["ranks"]] == [1, 0]


def test_samples_do_not_depend_on_count_or_chunking(shards, monkeypatch):
    """A seed gives sample i from its own noise: the same first samples for a larger request, in any chunks."""
    task, model = build(shards["cases"]["flm-split"], ALONE)
    seven = task.generate(model, 7, 2, seed=3)
    assert len(set(map(tuple, seven.tolist()))) == 7
    monkeypatch.setattr(flm_module, "SAMPLE_CHUNK", 3)
    assert torch.equal(task.generate(model, 7, 2, seed=3), seven)
    assert torch.equal(task.generate(model, 4, 2, seed=3), seven[:4])
    assert not torch.equal(task.generate(model, 7, 2, seed=4), seven)


def test_a_zero3_run_evaluates_as_one_process_does(tmp_path):
    """Through the CLI: ZeRO-3 on 2 processes, 1 held-out sequence and 3 samples (2 + 1); the logged
    figures equal this process's evaluation of the saved EMA weights."""
    text = pack_tiny_text(tmp_path / "text")
    run = tmp_path / "run"
    overrides = {**flm_model_overrides(text), "judge.cache_dir": tmp_path / "judges", "parallel.zero_stage": 3,
                 "trainer.max_steps": 1, "eval.num_samples": 1, "sample.num_per_prompt": 3}
    flowmill_ok("launch", "local", "--nproc", "2", str(FLM_TINY), *flm_overrides(text, run, **overrides), cwd=tmp_path)
    logged = read_jsonl(run / "logs" / "metrics.jsonl")[-1]
    task, model, _ = load_task_and_model(run)
    metrics = task.evaluate(model, 1)
    assert {key: logged[key] for key in metrics} == pytest.approx(metrics, rel=TOLERANCE, abs=TOLERANCE)
    absolute, relative, worst = differences({key: logged[key] for key in metrics}, metrics)
    print(f"flm ZeRO-3 run vs one process: max abs diff {absolute:.2e}, max rel diff {relative:.2e} ({worst})")
    assert (run / "samples" / "text-00000001.txt").read_text().count("=== sample") == 3
