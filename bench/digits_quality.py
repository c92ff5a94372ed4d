"""How good are generated digits? Recognisable, close to real handwriting, and as varied as it.

    python bench/digits_quality.py RUN_DIR [RUN_DIR ...] [--num-samples 20] [--steps 25] [--cfg 3.0]
                                   [--guidance cfg|raag] [--raag-alpha 12] [--json]
    python bench/digits_quality.py RUN_DIR --sweep [--sweep-steps 4,8,25] [--sweep-cfg 1,2,3]
                                   [--sweep-raag 18:12,3:12] [--json]

Each run (a pixel run and a latent run alike: the task's ``generate`` returns images in
[-1, 1]) draws ``--num-samples`` images for each of the ten prompts "a handwritten digit zero"
… "nine" with its EMA weights. One table, one row per run, reports:

- **accuracy**: the share of samples a digit classifier labels as the digit asked for;
- **FD**: the Fréchet distance between Gaussians fitted to the classifier's hidden-layer
  features of the samples and of a reference split of real digits (lower is closer);
- **spread**: per prompt, the mean pairwise distance between samples divided by the same
  figure for real digits of that class, averaged over the ten classes (1.0: as varied as
  real handwriting; a model that draws one image per prompt scores 0, however recognisable);
- the run's training time: the summed time of its optimizer steps (``train/samples_per_s``
  in ``logs/metrics.jsonl``) and the wall-clock span of ``logs/train.log`` (steps plus
  evaluation, sampling and checkpoints), so runs trained for the same wall-clock time can
  be compared.

``--sweep`` compares guidance settings on one run instead: constant CFG at each scale of
``--sweep-cfg`` and RAAG at each ``W_MAX:ALPHA`` of ``--sweep-raag`` (its scale falls from w_max
towards 1 as ||v_cond - v_uncond|| / ||v_uncond|| grows, flowmill.models.samplers), each at
every Euler step count of ``--sweep-steps``: one row per setting, accuracy / FD / spread per
step count, the mean RAAG scale at each step, and whether the issue's target holds at the
most steps (a setting with accuracy >= 97 % and an FD at most 1.2× that of CFG 1.0).

Two rows calibrate the scale: real held-out digits, as many per class as the samples (the
floor FD reaches with this many images: a perfect generator is not expected to beat it),
and one real digit per class repeated (100 % accuracy, spread 0, a large FD: the collapse
that accuracy alone cannot see).

The classifier is scikit-learn's MLPClassifier with one hidden layer, trained on half of
scikit-learn's digits; its hidden-layer activations are the features. ImageNet features (as
FID uses) mean little for 8×8 grey digits; a network trained on the digits themselves
encodes the strokes that tell digits apart, the reasoning behind FDs of classifier features
on MNIST. Every image (real or sampled, at any side divisible by 8) is brought to 8×8 by
block averaging, the resolution the digits really have (the packed 32×32 digits are
upsampled 8×8 images), so real digits and samples go through one path. The generators
trained on all digits, the reference and held-out splits included: "held out" means unseen
by the classifier, and a generator that memorised its data could come below the floor.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import torch
from scipy.spatial.distance import pdist
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

from flowmill.arguments import RAAG_ALPHA
from flowmill.data.builtin import DIGIT_WORDS, digit_caption, digit_images
from flowmill.errors import UsageError
from flowmill.models.samplers import Guidance, RatioAwareGuidance, build_guidance
from flowmill.run_dir import Checkpoint, RunDir
from flowmill.train.sample import load_task_and_model

CLASSES = 10
BLOCKS = 8  # every image is compared at 8×8, the digits' own resolution
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
SEGMENT_START = " INFO run dir: "  # train/job.py logs it when a run starts or resumes


def to_features(images: np.ndarray) -> np.ndarray:
    """(N, S, S) grey levels 0..255, S divisible by 8 → (N, 64): 8×8 block means scaled to [0, 1]."""
    count, side = images.shape[0], images.shape[-1]
    if side % BLOCKS or images.shape[-2] != side:
        raise ValueError(f"images are {images.shape[1:]}; the bench needs square images whose side is a multiple of {BLOCKS}")
    cell = side // BLOCKS
    return images.reshape(count, BLOCKS, cell, BLOCKS, cell).mean(axis=(2, 4)).reshape(count, BLOCKS * BLOCKS) / 255.0


@dataclass
class DigitSplits:
    """scikit-learn's digits as 64 features each, split by class in proportion (stratified)."""

    train_x: np.ndarray  # (N, 64) the classifier learns from these
    train_y: np.ndarray  # (N,) labels 0..9
    reference_x: np.ndarray  # real digits every generator is compared with (FD and spread)
    reference_y: np.ndarray
    held_out_x: np.ndarray  # real digits standing in for a perfect generator (the floor row)
    held_out_y: np.ndarray

    @classmethod
    def make(cls, seed: int = 0) -> DigitSplits:
        """Half for training, a quarter each for reference and held out."""
        images, labels = digit_images(32)
        features = to_features(images)
        train_x, rest_x, train_y, rest_y = train_test_split(features, labels, test_size=0.5, stratify=labels, random_state=seed)
        reference_x, held_out_x, reference_y, held_out_y = train_test_split(rest_x, rest_y, test_size=0.5, stratify=rest_y,
                                                                            random_state=seed)
        return cls(train_x, train_y, reference_x, reference_y, held_out_x, held_out_y)


class DigitClassifier:
    """An MLP trained on real digits: ``predict`` labels, ``features`` its hidden-layer activations."""

    def __init__(self, train_x: np.ndarray, train_y: np.ndarray, hidden: int = 64, seed: int = 0):
        self.mlp = MLPClassifier(hidden_layer_sizes=(hidden,), alpha=1e-3, max_iter=2000, random_state=seed)
        self.mlp.fit(train_x, train_y)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """(N,) labels of (N, 64) features."""
        return self.mlp.predict(features)

    def score(self, features: np.ndarray, labels: np.ndarray) -> float:
        return float(self.mlp.score(features, labels))

    def features(self, features: np.ndarray) -> np.ndarray:
        """(N, hidden) ReLU activations of the hidden layer, the input of the output layer."""
        return np.maximum(features @ self.mlp.coefs_[0] + self.mlp.intercepts_[0], 0.0)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to (N, D) and (M, D) feature sets:
    |μa − μb|² + tr Σa + tr Σb − 2 tr (Σa^½ Σb Σa^½)^½.

    By eigen-decompositions of symmetric matrices (``tr (Σa Σb)^½`` equals the last trace), so
    singular covariances, e.g. of dead ReLU units or a collapsed generator, need no special care.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    middle = root_a @ cov_b @ root_a
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    return float(np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross)


def mean_pairwise_distance(x: np.ndarray) -> float:
    """Mean Euclidean distance over the pairs of distinct rows of (N, D), N ≥ 2 (0 for identical rows)."""
    x = np.asarray(x, dtype=np.float64)
    count = x.shape[0]
    if count < 2:
        raise ValueError(f"the spread needs at least 2 images per class, got {count}")
    return float(pdist(x).mean())


def spread_ratios(x: np.ndarray, labels: np.ndarray, real_x: np.ndarray, real_labels: np.ndarray) -> np.ndarray:
    """(10,) per class: mean pairwise distance of ``x`` of that class over that of ``real_x`` of that class."""
    return np.array([mean_pairwise_distance(x[labels == label]) / mean_pairwise_distance(real_x[real_labels == label])
                     for label in range(CLASSES)])


def assess(x: np.ndarray, labels: np.ndarray, classifier: DigitClassifier, splits: DigitSplits) -> dict:
    """Accuracy, FD and spread of (N, 64) images whose prompts asked for ``labels`` (N,)."""
    correct = classifier.predict(x) == labels
    spread = spread_ratios(x, labels, splits.reference_x, splits.reference_y)
    return {
        "count": int(len(labels)),
        "accuracy": float(correct.mean()),
        "fd": frechet_distance(classifier.features(x), classifier.features(splits.reference_x)),
        "spread": float(spread.mean()),
        "per_digit": {DIGIT_WORDS[label]: {"accuracy": float(correct[labels == label].mean()), "spread": float(spread[label])}
                      for label in range(CLASSES)},
    }


def real_rows(splits: DigitSplits, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``per_class`` held-out real digits of each class (fewer where the split has fewer), and their labels."""
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(splits.held_out_y == label))[:per_class] for label in range(CLASSES)]
    index = np.concatenate(chosen)
    return splits.held_out_x[index], splits.held_out_y[index]


def collapsed_rows(splits: DigitSplits, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The first held-out digit of each class, repeated ``per_class`` times: a generator that draws one image per prompt."""
    firsts = [np.flatnonzero(splits.held_out_y == label)[0] for label in range(CLASSES)]
    index = np.repeat(firsts, per_class)
    return splits.held_out_x[index], splits.held_out_y[index]


def training_time(run_dir: RunDir, checkpoint: Checkpoint) -> dict:
    """How long the run trained to reach ``checkpoint``: ``steps_s``, the summed time of its
    optimizer steps up to the checkpoint's step (the last record of each step, as a resumed run
    repeats steps after its checkpoint), and ``wall_s``, the summed span of ``train.log`` from each
    start or resume to its last line (None where the file is missing)."""
    out: dict = {"step": checkpoint.step, "steps_s": None, "wall_s": None}
    global_batch = checkpoint.meta.get("global_batch")
    if run_dir.metrics_file.is_file() and global_batch:
        step_rate = {}
        for line in run_dir.metrics_file.read_text().splitlines():
            record = json.loads(line)
            if "train/samples_per_s" in record and record["step"] <= checkpoint.step:
                step_rate[record["step"]] = record["train/samples_per_s"]
        out["steps_s"] = float(sum(global_batch / rate for rate in step_rate.values()))
    if run_dir.train_log.is_file():
        out["wall_s"] = log_span_s(run_dir.train_log.read_text().splitlines())
    return out


def log_span_s(lines: list[str]) -> float:
    """Seconds from each ``run dir:`` line (a start or resume) to the last timestamped line before the next one, summed."""
    total, first, last = 0.0, None, None
    for line in lines:
        match = LOG_TIME.match(line)
        if match is None:
            continue
        stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if SEGMENT_START in line or first is None:
            total += (last - first) if first is not None else 0.0
            first = stamp
        last = stamp
    return total + ((last - first) if first is not None else 0.0)


class ScaleLog:
    """A guidance that records, at each velocity evaluation, the mean scale over the batch (and RAAG's mean ratio)."""

    def __init__(self, guidance: Guidance):
        self.guidance = guidance
        self.mean_scales: list[float] = []
        self.mean_ratios: list[float] = []

    @property
    def identity(self) -> bool:
        return self.guidance.identity

    def scales(self, v_cond: torch.Tensor, v_uncond: torch.Tensor) -> torch.Tensor:
        return self.guidance.scales(v_cond, v_uncond)

    def __call__(self, v_cond: torch.Tensor, v_uncond: torch.Tensor) -> torch.Tensor:
        self.mean_scales.append(float(self.guidance.scales(v_cond, v_uncond).mean()))
        if isinstance(self.guidance, RatioAwareGuidance):
            self.mean_ratios.append(float(self.guidance.ratio(v_cond, v_uncond).mean()))
        return self.guidance(v_cond, v_uncond)


def open_run(source: str):
    """The run's task, its EMA model and where they came from (``name``: the run dir's folder
    name, ``checkpoint``, its training time)."""
    task, model, checkpoint = load_task_and_model(source)
    run_dir, _ = RunDir.open(source)
    origin = {"name": run_dir.path.name, "source": source, "checkpoint": str(checkpoint.path)}
    return task, model, {**origin, **training_time(run_dir, checkpoint)}


def sample_features(task, model, source: str, num_samples: int, steps: int, guidance: Guidance | float, seed: int) -> np.ndarray:
    """(10·num_samples, 64) features of samples of the ten digit prompts, prompt-major (Euler steps)."""
    prompts = [digit_caption(label) for label in range(CLASSES)]
    with torch.no_grad():
        images = task.generate(model, prompts, num_samples, steps, guidance, "euler", seed)
    if images.ndim != 4 or images.shape[1] != 1:
        raise SystemExit(f"{source}: generate returned {tuple(images.shape)}, not grey images (N, 1, H, W)")
    pixels = ((images[:, 0].float().clamp(-1, 1) + 1) * 127.5).round().cpu().numpy()  # (N, H, W)
    return to_features(pixels)


def sample_run(source: str, num_samples: int, steps: int, guidance: Guidance | float, seed: int) -> tuple[np.ndarray, dict]:
    """(10·num_samples, 64) features of a run's samples, prompt-major, and where they came from (``open_run``)."""
    task, model, origin = open_run(source)
    return sample_features(task, model, source, num_samples, steps, guidance, seed), origin


@dataclass(frozen=True)
class Setting:
    """One guidance setting of a sweep."""

    name: str  # e.g. "CFG 3.0", "RAAG w_max 18 α 12"
    guidance: str  # cfg | raag
    scale: float  # CFG's scale, RAAG's w_max
    alpha: float = 0.0  # RAAG's alpha

    def build(self) -> Guidance:
        return build_guidance(self.guidance, self.scale, self.alpha)


def sweep_settings(cfg_scales: str, raag: str) -> list[Setting]:
    """Constant CFG at each scale of ``"1,2,3"``, then RAAG at each ``W_MAX:ALPHA`` of ``"18:12,3:2"``."""
    settings = [Setting(f"CFG {float(scale):g}", "cfg", float(scale)) for scale in cfg_scales.split(",") if scale]
    for item in filter(None, raag.split(",")):
        w_max, _, alpha = item.partition(":")
        if not alpha:
            raise ValueError(f"--sweep-raag: {item!r} is not W_MAX:ALPHA, e.g. 18:12")
        setting = Setting(f"RAAG w_max {float(w_max):g} α {float(alpha):g}", "raag", float(w_max), float(alpha))
        setting.build()  # refuse values out of range before any sampling
        settings.append(setting)
    return settings


def run_sweep(source: str, settings: list[Setting], step_counts: list[int], num_samples: int, seed: int,
              classifier: DigitClassifier, splits: DigitSplits) -> tuple[dict, list[dict]]:
    """Every setting at every step count on one run: (origin, one row per setting with a
    ``by_steps`` entry per step count: accuracy, FD, spread, and the mean scale (and RAAG ratio) per step)."""
    task, model, origin = open_run(source)
    labels = np.repeat(np.arange(CLASSES), num_samples)
    rows = []
    for setting in settings:
        row = {"name": setting.name, "guidance": setting.guidance, "scale": setting.scale, "alpha": setting.alpha, "by_steps": {}}
        for steps in step_counts:
            log = ScaleLog(setting.build())
            features = sample_features(task, model, source, num_samples, steps, log, seed)
            metrics = assess(features, labels, classifier, splits)
            row["by_steps"][steps] = {**metrics, "scale_per_step": log.mean_scales, "ratio_per_step": log.mean_ratios}
            print(f"  {setting.name}, {steps} steps: {metrics['accuracy']:.1%} / {metrics['fd']:.3f} / {metrics['spread']:.2f}",
                  file=sys.stderr, flush=True)
        rows.append(row)
    return origin, rows


def target_check(rows: list[dict], steps: int) -> dict:
    """The issue's target at ``steps``: settings with accuracy >= 97 % and FD <= 1.2× CFG 1.0's."""
    unguided = next((row for row in rows if row["guidance"] == "cfg" and row["scale"] == 1.0), None)
    if unguided is None:
        return {"steps": steps, "unguided_fd": None, "met_by": []}
    limit = 1.2 * unguided["by_steps"][steps]["fd"]
    met = [row["name"] for row in rows
           if row["by_steps"][steps]["accuracy"] >= 0.97 and row["by_steps"][steps]["fd"] <= limit]
    return {"steps": steps, "unguided_fd": unguided["by_steps"][steps]["fd"], "fd_limit": limit, "met_by": met}


def sweep_table(rows: list[dict], step_counts: list[int]) -> str:
    """One line per setting: accuracy / FD / spread at each step count."""
    lines = [f"{'guidance':<24}" + "".join(f"{f'{steps} steps: acc / FD / spread':>33}" for steps in step_counts)]
    for row in rows:
        cells = "".join(f"{row['by_steps'][steps]['accuracy']:>18.1%} / {row['by_steps'][steps]['fd']:>5.3f} / "
                        f"{row['by_steps'][steps]['spread']:.2f}" for steps in step_counts)
        lines.append(f"{row['name']:<24}{cells}")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    """One line per generator: training time, then accuracy, FD and spread."""
    def seconds(value):
        return "–" if value is None else f"{value:.0f}"

    lines = [f"{'generator':<44}{'step':>6}{'steps s':>9}{'wall s':>8}{'accuracy':>10}{'FD':>8}{'spread':>8}"]
    for row in rows:
        lines.append(f"{row['name'][-44:]:<44}{row.get('step') or '–':>6}{seconds(row.get('steps_s')):>9}"
                     f"{seconds(row.get('wall_s')):>8}{row['accuracy']:>10.1%}{row['fd']:>8.3f}{row['spread']:>8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", metavar="RUN_DIR", help="run dirs or checkpoint folders, one row each")
    parser.add_argument("--num-samples", type=int, default=20, help="samples per digit (default 20)")
    parser.add_argument("--steps", type=int, default=25, help="Euler steps (default 25)")
    parser.add_argument("--cfg", type=float, default=3.0, help="guidance scale; with --guidance raag its w_max (default 3.0)")
    parser.add_argument("--guidance", default="cfg", help="cfg (constant --cfg) or raag (default cfg)")
    parser.add_argument("--raag-alpha", type=float, default=RAAG_ALPHA, help=f"RAAG's alpha (default {RAAG_ALPHA:g})")
    parser.add_argument("--sweep", action="store_true", help="compare guidance settings on one run (see above)")
    parser.add_argument("--sweep-steps", default="4,8,25", help="--sweep: Euler step counts (default 4,8,25)")
    parser.add_argument("--sweep-cfg", default="1,2,3", help="--sweep: constant CFG scales (default 1,2,3)")
    parser.add_argument("--sweep-raag", default=f"18:{RAAG_ALPHA:g},3:{RAAG_ALPHA:g}",
                        help=f"--sweep: RAAG settings W_MAX:ALPHA (default 18:{RAAG_ALPHA:g},3:{RAAG_ALPHA:g}; "
                        "18:12 is the authors' SD3.5 example)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.num_samples < 2:
        parser.error(f"--num-samples: the spread needs at least 2 samples per digit, got {args.num_samples}")
    try:
        guidance = build_guidance(args.guidance, args.cfg, args.raag_alpha)
        settings = sweep_settings(args.sweep_cfg, args.sweep_raag) if args.sweep else []
        step_counts = [int(steps) for steps in args.sweep_steps.split(",") if steps] if args.sweep else [args.steps]
    except ValueError as error:
        parser.error(str(error))
    if args.sweep and (len(args.sources) != 1 or not settings or min(step_counts) < 1):
        parser.error("--sweep takes one RUN_DIR, at least one setting and step counts >= 1")

    splits = DigitSplits.make(args.seed)
    classifier = DigitClassifier(splits.train_x, splits.train_y, seed=args.seed)
    labels = np.repeat(np.arange(CLASSES), args.num_samples)
    floor = {"name": "real held-out digits (floor)", **assess(*real_rows(splits, args.num_samples, args.seed), classifier, splits)}
    ceiling = {"name": "one real digit per class, repeated", **assess(*collapsed_rows(splits, args.num_samples), classifier, splits)}
    common = {
        "samples_per_digit": args.num_samples,
        "classifier_accuracy_on_real_digits": classifier.score(splits.held_out_x, splits.held_out_y),
        "reference_digits": int(len(splits.reference_y)),
        "floor": floor,
        "ceiling": ceiling,
    }
    if args.sweep:
        return print_sweep(args, settings, step_counts, classifier, splits, common, parser)
    runs = []
    for source in args.sources:
        try:
            features, origin = sample_run(source, args.num_samples, args.steps, guidance, args.seed)
        except UsageError as error:
            parser.error(str(error))
        runs.append({**origin, **assess(features, labels, classifier, splits)})
    result = {**common, "steps": args.steps, "cfg": args.cfg, "guidance": args.guidance, "raag_alpha": args.raag_alpha,
              "runs": runs}
    if args.json:
        print(json.dumps(result))
        return 0
    how = f"CFG {args.cfg}" if args.guidance == "cfg" else f"RAAG w_max {args.cfg:g} α {args.raag_alpha:g}"
    print(f"{args.num_samples} samples per digit, {args.steps} Euler steps, {how}; FD and spread against "
          f"{result['reference_digits']} real reference digits; the classifier recognises "
          f"{result['classifier_accuracy_on_real_digits']:.1%} of held-out real digits")
    print(table([*runs, floor, ceiling]))
    if floor["count"] < CLASSES * args.num_samples:
        print(f"(the floor row has {floor['count']} real digits: the held-out split has fewer than {args.num_samples} of some classes)")
    print("\nper digit (accuracy / spread):")
    print(f"{'':<8}" + "".join(f"{row['name'][-16:]:>18}" for row in runs))
    for word in DIGIT_WORDS[:CLASSES]:
        print(f"{word:<8}" + "".join(f"{row['per_digit'][word]['accuracy']:>11.0%} / {row['per_digit'][word]['spread']:.2f}"
                                    for row in runs))
    return 0


def print_sweep(args, settings: list[Setting], step_counts: list[int], classifier: DigitClassifier, splits: DigitSplits,
                common: dict, parser: argparse.ArgumentParser) -> int:
    """``--sweep``: every setting at every step count on the one run, as a table (or JSON)."""
    source = args.sources[0]
    try:
        origin, rows = run_sweep(source, settings, step_counts, args.num_samples, args.seed, classifier, splits)
    except UsageError as error:
        parser.error(str(error))
    target = target_check(rows, max(step_counts))
    result = {**common, "run": origin, "step_counts": step_counts, "settings": rows, "target": target}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{origin['name']} (step {origin['step']}): {args.num_samples} samples per digit, Euler; FD and spread against "
          f"{result['reference_digits']} real reference digits (real held-out digits: FD {common['floor']['fd']:.3f}, "
          f"spread {common['floor']['spread']:.2f}); the classifier recognises "
          f"{result['classifier_accuracy_on_real_digits']:.1%} of held-out real digits")
    print(sweep_table(rows, step_counts))
    print("\nRAAG at each step, first (noise) to last: mean ratio ||v_cond - v_uncond|| / ||v_uncond||, mean scale")
    for row in rows:
        if row["guidance"] == "raag":
            for steps in step_counts:
                record = row["by_steps"][steps]
                print(f"  {row['name']}, {steps} steps, ratio: {' '.join(f'{value:.2f}' for value in record['ratio_per_step'])}")
                print(f"  {row['name']}, {steps} steps, scale: {' '.join(f'{value:.2f}' for value in record['scale_per_step'])}")
    if target["unguided_fd"] is None:
        print("\n(no CFG 1 row: add 1 to --sweep-cfg for the target)")
    else:
        print(f"\ntarget at {target['steps']} steps: accuracy >= 97 % and FD <= {target['fd_limit']:.3f} "
              f"(1.2 × CFG 1.0's {target['unguided_fd']:.3f}): "
              + (f"met by {', '.join(target['met_by'])}" if target["met_by"] else "not met"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
