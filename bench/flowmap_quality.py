"""A few-step flow map against its teacher, on the digits: recognisable, close to real handwriting, varied, fast.

    python -m bench.flowmap_quality MAP_RUN --teacher TEACHER_RUN [--num-samples 20] [--map-steps 1,2,4]
                                     [--teacher-steps 1,2,4,25] [--json]

One table: the flow map (a ``task: mmdit_flowmap`` run, EMA weights) at each jump count of
``--map-steps`` and its teacher (the mmdit run it was distilled from) at each Euler step count
of ``--teacher-steps``, the teacher guided as the map's ``distill.*`` says (the guidance the map
carries; the map itself samples without further guidance). Per row: accuracy, FD and spread as
bench/digits_quality.py measures them (a classifier trained on half of scikit-learn's digits,
its hidden features against real reference digits), and the wall-clock time per image of the
sampling alone (text encoding included, classifier excluded), in this process with torch's
threads as set.

The target it checks (a map at 1 and 2 jumps): accuracy >= 90 %, FD <= 1.5× and spread >= 0.8×
those of the teacher at its most Euler steps, and the 1-jump map >= 15× faster per image than
that teacher.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from bench.digits_quality import CLASSES, DigitClassifier, DigitSplits, assess, open_run, real_rows, sample_features
from flowmill.errors import UsageError
from flowmill.models.samplers import build_guidance


def timed_rows(source: str, step_counts: list[int], guidance, num_samples: int, seed: int, label: str,
               classifier: DigitClassifier, splits: DigitSplits) -> list[dict]:
    """One row per step count of the run ``source``: its figures and seconds per image."""
    task, model, origin = open_run(source)
    labels = np.repeat(np.arange(CLASSES), num_samples)
    sample_features(task, model, source, 2, 1, guidance, seed)  # warm-up: first calls allocate
    rows = []
    for steps in step_counts:
        started = time.perf_counter()
        features = sample_features(task, model, source, num_samples, steps, guidance, seed)
        seconds = (time.perf_counter() - started) / len(labels)
        metrics = assess(features, labels, classifier, splits)
        rows.append({"name": f"{label}, {steps} {'jump' if label == 'map' else 'Euler step'}{'s' if steps > 1 else ''}",
                     "kind": label, "steps": steps, "s_per_image": seconds, **metrics, "run": origin["name"]})
        print(f"  {rows[-1]['name']}: {metrics['accuracy']:.1%} / {metrics['fd']:.3f} / {metrics['spread']:.2f} / "
              f"{1000 * seconds:.2f} ms per image", file=sys.stderr, flush=True)
    return rows


def target_check(rows: list[dict]) -> dict:
    """The map at 1 and 2 jumps against the teacher at its most steps (see the module docstring)."""
    teacher = max((row for row in rows if row["kind"] == "teacher"), key=lambda row: row["steps"])
    checks = {}
    for row in rows:
        if row["kind"] == "map" and row["steps"] in (1, 2):
            checks[row["name"]] = {
                "accuracy >= 90 %": row["accuracy"] >= 0.9,
                f"FD <= 1.5 x {teacher['fd']:.3f}": row["fd"] <= 1.5 * teacher["fd"],
                f"spread >= 0.8 x {teacher['spread']:.2f}": row["spread"] >= 0.8 * teacher["spread"],
            }
            if row["steps"] == 1:
                speedup = teacher["s_per_image"] / row["s_per_image"]
                checks[row["name"]][f">= 15x faster than the teacher ({speedup:.1f}x)"] = speedup >= 15
    return {"teacher_row": teacher["name"], "checks": checks}


def table(rows: list[dict]) -> str:
    lines = [f"{'generator':<34}{'accuracy':>10}{'FD':>8}{'spread':>8}{'ms/image':>10}"]
    for row in rows:
        time_cell = "–" if row.get("s_per_image") is None else f"{1000 * row['s_per_image']:.2f}"
        lines.append(f"{row['name']:<34}{row['accuracy']:>10.1%}{row['fd']:>8.3f}{row['spread']:>8.2f}{time_cell:>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="MAP_RUN", help="a task: mmdit_flowmap run dir or checkpoint folder")
    parser.add_argument("--teacher", required=True, metavar="TEACHER_RUN", help="the mmdit run the map was distilled from")
    parser.add_argument("--num-samples", type=int, default=20, help="samples per digit (default 20)")
    parser.add_argument("--map-steps", default="1,2,4", help="jump counts of the map (default 1,2,4)")
    parser.add_argument("--teacher-steps", default="1,2,4,25", help="Euler step counts of the teacher (default 1,2,4,25)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.num_samples < 2:
        parser.error(f"--num-samples: the spread needs at least 2 samples per digit, got {args.num_samples}")
    try:
        map_steps = [int(value) for value in args.map_steps.split(",") if value]
        teacher_steps = [int(value) for value in args.teacher_steps.split(",") if value]
    except ValueError as error:
        parser.error(str(error))
    if not map_steps or not teacher_steps or min(map_steps + teacher_steps) < 1:
        parser.error("--map-steps and --teacher-steps take step counts >= 1")

    splits = DigitSplits.make(args.seed)
    classifier = DigitClassifier(splits.train_x, splits.train_y, seed=args.seed)
    try:
        task, _, _ = open_run(args.source)
        if task.cfg.task != "mmdit_flowmap":
            parser.error(f"{args.source} is a {task.cfg.task} run, not a flow map (task mmdit_flowmap)")
        distill = task.cfg.distill
        teacher_guidance = build_guidance(distill.guidance, distill.cfg_scale, distill.raag_alpha)
        rows = timed_rows(args.source, map_steps, 1.0, args.num_samples, args.seed, "map", classifier, splits)
        rows += timed_rows(args.teacher, teacher_steps, teacher_guidance, args.num_samples, args.seed, "teacher",
                           classifier, splits)
    except UsageError as error:
        parser.error(str(error))
    floor = {"name": "real held-out digits (floor)", **assess(*real_rows(splits, args.num_samples, args.seed), classifier, splits)}
    how = (f"CFG {distill.cfg_scale:g}" if distill.guidance == "cfg"
           else f"RAAG w_max {distill.cfg_scale:g} α {distill.raag_alpha:g}")
    target = target_check(rows)
    result = {"samples_per_digit": args.num_samples, "teacher_guidance": how, "threads": torch.get_num_threads(),
              "rows": rows, "floor": floor, "target": target}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.num_samples} samples per digit; the teacher guided by {how} (the map distilled it); "
          f"{torch.get_num_threads()} torch threads")
    print(table([*rows, floor]))
    print(f"\ntarget (against {target['teacher_row']}):")
    for name, checks in target["checks"].items():
        print(f"  {name}: " + ", ".join(f"{check} {'met' if ok else 'MISSED'}" for check, ok in checks.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
