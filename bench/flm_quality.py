"""Sample quality of a trained FLM, its FMLM student and an MDLM baseline, side by side, at several step counts.

For each model and step count: generative perplexity of the samples under the judge (the small
causal LM flowmill trains on the same training split, cached), their unigram entropy (low
values flag repetition collapse) and the model's validation cross-entropy on held-out text over
its run's clock grid. The first row scores held-out real text the same way, as the reference.
Every row uses the same seeds and the same judge. Every row starts from the same noise, so the
column "same as FLM N" (N the FLM's most steps) is the share of token positions where a row's
samples equal the FLM's N-step samples: for the FLM rows how far fewer steps land from its
converged flow, for the FMLM rows how closely the distilled flow map follows the teacher's flow.

    python bench/flm_quality.py --flm runs/flm-shakespeare --fmlm runs/fmlm-student \
        --fmlm-data-free runs/fmlm-student-data-free --mdlm runs/mdlm-shakespeare --num-samples 64

The MDLM rows (a masked-diffusion run, ``--mdlm``) start from all masks and draw their unmasking
from the same seed; their val CE is the masked-token cross-entropy on the same corruption grid, and
the column "ELBO" their negative ELBO in nats per token (docs/flm.md relates the two).

The headlines checked at the end: FMLM at 1 step has a lower generative perplexity than MDLM at 8
steps, and than FLM at 8 steps, at comparable entropy (within ``--entropy-tolerance`` nats).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from flowmill.train.judge import judge_dir
from flowmill.train.sample import load_task_and_model
from flowmill.train.tasks.flm import FLMTask
from flowmill.train.tasks.fmlm import FMLMTask
from flowmill.train.tasks.mdlm import MDLMTask
from flowmill.train.text_metrics import generative_perplexity, unigram_entropy


def load(source: str, kind: type, judge_cache: str | None):
    """(task, EMA model) of a run, checked to be of task class ``kind``; the judge cache optionally moved."""
    task, model, _ = load_task_and_model(source)
    if not isinstance(task, kind):
        raise SystemExit(f"{source} is a {task.cfg.task} run, expected {kind.__name__}")
    if judge_cache is not None:
        task.cfg = dataclasses.replace(task.cfg, judge=dataclasses.replace(task.cfg.judge, cache_dir=judge_cache))
    if task.cfg.judge.cache_dir is None:
        raise SystemExit(f"{source} has no judge.cache_dir; pass --judge-cache DIR")
    return task, model


def score(judge, tokens: torch.Tensor) -> dict:
    return {"gen_ppl": generative_perplexity(judge, tokens), "entropy": unigram_entropy(tokens)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flm", required=True, help="the FLM run dir (task flm)")
    parser.add_argument("--fmlm", required=True, help="the FMLM student run dir (task fmlm, distill.stage=student)")
    parser.add_argument("--corrector", help="also score the stage-1 map (teacher + corrector) of this run")
    parser.add_argument("--fmlm-data-free", help="also score this FMLM student distilled with distill.data_free: true")
    parser.add_argument("--mdlm", help="also score this masked-diffusion run (task mdlm), the few-step baseline")
    parser.add_argument("--mdlm-steps", type=int, nargs="+", default=[1, 2, 4, 8, 32, 128], help="MDLM unmasking steps")
    parser.add_argument("--flm-steps", type=int, nargs="+", default=[1, 2, 4, 8, 32, 128], help="FLM Euler steps")
    parser.add_argument("--fmlm-steps", type=int, nargs="+", default=[1, 2, 4], help="FMLM jumps")
    parser.add_argument("--num-samples", type=int, default=64, help="samples per row (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed, the same for every row (default 0)")
    parser.add_argument("--judge-cache", help="judge cache folder (default: the runs' judge.cache_dir)")
    parser.add_argument("--entropy-tolerance", type=float, default=0.15, help="'comparable entropy' in nats (default 0.15)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    flm_task, flm = load(args.flm, FLMTask, args.judge_cache)
    fmlm_task, student = load(args.fmlm, FMLMTask, args.judge_cache)
    if fmlm_task.stage != "student":
        raise SystemExit(f"--fmlm: {args.fmlm} is a {fmlm_task.stage} run; give the student run (stage 2)")
    others = [(args.fmlm, fmlm_task)]
    data_free = mdlm = None
    if args.fmlm_data_free:
        data_free = load(args.fmlm_data_free, FMLMTask, args.judge_cache)
        if data_free[0].stage != "student" or not data_free[0].cfg.distill.data_free:
            raise SystemExit(f"--fmlm-data-free: {args.fmlm_data_free} is no student run with distill.data_free: true")
        others.append((args.fmlm_data_free, data_free[0]))
    if args.mdlm:
        mdlm = load(args.mdlm, MDLMTask, args.judge_cache)
        others.append((args.mdlm, mdlm[0]))
    for source, task in others:
        if judge_dir(flm_task.cfg.data.path, flm_task.cfg.judge) != judge_dir(task.cfg.data.path, task.cfg.judge):
            raise SystemExit(f"{source} has other data or judge settings than {args.flm}, so no common judge; align them first")
    judge = flm_task.judge()
    reference = flm_task.validation_tokens()[: args.num_samples]
    flm_ce = flm_task.validation_metrics(flm, flm_task.validation_tokens(), args.seed, flm_task.env)["val/ce"]
    student_ce = fmlm_task.validation_metrics(student, fmlm_task.validation_tokens(), args.seed, fmlm_task.env)["val/ce"]
    rows = [{"model": "held-out text", "steps": None, "calls": None, "val_ce": None, "elbo": None, "seconds": 0.0,
             **score(judge, reference)}]
    samples = [None]  # per row, its tokens (N, L)

    def add(name: str, task, model, steps: int, calls: int, val_ce: float | None, elbo: float | None = None) -> None:
        started = time.perf_counter()
        tokens = task.generate(model, args.num_samples, steps, args.seed)
        rows.append({"model": name, "steps": steps, "calls": calls, "val_ce": val_ce, "elbo": elbo,
                     "seconds": time.perf_counter() - started, **score(judge, tokens)})
        samples.append(tokens)
        print(f"  {name} {steps} steps: gen ppl {rows[-1]['gen_ppl']:.1f}, entropy {rows[-1]['entropy']:.2f}", flush=True)

    for steps in args.flm_steps:
        add("FLM", flm_task, flm, steps, steps, flm_ce)
    for steps in args.fmlm_steps:
        add("FMLM", fmlm_task, student, steps, steps, student_ce)
    if data_free:
        task, model = data_free
        val_ce = task.validation_metrics(model, task.validation_tokens(), args.seed, task.env)["val/ce"]
        for steps in args.fmlm_steps:
            add("FMLM (data-free)", task, model, steps, steps, val_ce)
    if mdlm:
        task, model = mdlm
        val = task.validation_metrics(model, task.validation_tokens(), args.seed, task.env)
        for steps in args.mdlm_steps:
            add("MDLM", task, model, steps, steps, val["val/ce"], val["val/elbo"])
    if args.corrector:
        corrector_task, corrector = load(args.corrector, FMLMTask, args.judge_cache)
        for steps in args.fmlm_steps:
            add("FMLM stage 1 (teacher + corrector)", corrector_task, corrector, steps, 2 * steps, None)

    print(f"\n{args.num_samples} samples of {flm_task.model_config.seq_len} tokens per row, seed {args.seed}; "
          f"judge {judge_dir(flm_task.cfg.data.path, flm_task.cfg.judge)}\n")
    most = max(args.flm_steps)
    converged = samples[next(i for i, row in enumerate(rows) if row["model"] == "FLM" and row["steps"] == most)]
    for row, tokens in zip(rows, samples):
        row["same_as_flm"] = None if tokens is None else (tokens == converged).float().mean().item()
    print(f"| model | steps | network calls | gen. perplexity | unigram entropy | same as FLM {most} | val CE | ELBO | sampling s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        cells = [row["model"], row["steps"] or "–", row["calls"] or "–", f"{row['gen_ppl']:.1f}", f"{row['entropy']:.3f}",
                 "–" if row["same_as_flm"] is None else f"{row['same_as_flm']:.2f}",
                 "–" if row["val_ce"] is None else f"{row['val_ce']:.3f}",
                 "–" if row["elbo"] is None else f"{row['elbo']:.3f}", f"{row['seconds']:.1f}"]
        print("| " + " | ".join(map(str, cells)) + " |")
    one = next((r for r in rows if r["model"] == "FMLM" and r["steps"] == 1), None)
    for rival in ("MDLM", "FLM"):
        eight = next((r for r in rows if r["model"] == rival and r["steps"] == 8), None)
        if one and eight:
            lower = one["gen_ppl"] < eight["gen_ppl"]
            comparable = abs(one["entropy"] - eight["entropy"]) <= args.entropy_tolerance
            verdict = "reached" if lower and comparable else "NOT reached"
            print(f"\nheadline vs {rival} {verdict}: FMLM 1 step gen ppl {one['gen_ppl']:.1f} vs {rival} 8 steps "
                  f"{eight['gen_ppl']:.1f}; entropy {one['entropy']:.3f} vs {eight['entropy']:.3f} (tolerance {args.entropy_tolerance})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
