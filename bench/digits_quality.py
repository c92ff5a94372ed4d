"""Do generated digits look like the digit asked for? A classifier trained on scikit-learn's
digits labels samples that ``flowmill sample`` makes for the ten prompts.

    python bench/digits_quality.py RUN_DIR [--num-samples 20] [--steps 25] [--cfg 3.0]

The classifier sees the same 32×32 images the model was trained on (the packed digits),
brought back to 8×8 by block averaging, so real digits and samples go through one path.
Prints the accuracy per digit and overall, for the run's EMA weights.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from flowmill.data.builtin import DIGIT_WORDS, digit_caption, digit_images
from flowmill.train.sample import load_task_and_model


def to_features(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32) uint8 → (N, 64) features: 4×4 block means of 8×8, scaled to [0, 1]."""
    count = images.shape[0]
    return images.reshape(count, 8, 4, 8, 4).mean(axis=(2, 4)).reshape(count, 64) / 255.0


def train_classifier(seed: int = 0) -> tuple[LogisticRegression, float]:
    """A digit classifier and its accuracy on held-out real digits."""
    images, labels = digit_images(32)
    train_x, test_x, train_y, test_y = train_test_split(to_features(images), labels, test_size=0.25, random_state=seed)
    classifier = LogisticRegression(max_iter=2000, C=10.0).fit(train_x, train_y)
    return classifier, float(classifier.score(test_x, test_y))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="run dir or checkpoint folder")
    parser.add_argument("--num-samples", type=int, default=20, help="samples per digit (default 20)")
    parser.add_argument("--steps", type=int, default=25, help="Euler steps (default 25)")
    parser.add_argument("--cfg", type=float, default=3.0, help="guidance scale (default 3.0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)

    classifier, real_accuracy = train_classifier()
    task, model, checkpoint = load_task_and_model(args.source)
    prompts = [digit_caption(label) for label in range(10)]
    with torch.no_grad():
        images = task.generate(model, prompts, args.num_samples, args.steps, args.cfg, "euler", args.seed)
    pixels = ((images[:, 0].float().clamp(-1, 1) + 1) * 127.5).round().numpy()  # (N, 32, 32)
    predicted = classifier.predict(to_features(pixels)).reshape(10, args.num_samples)
    per_digit = (predicted == np.arange(10)[:, None]).mean(axis=1)
    result = {
        "checkpoint": str(checkpoint.path),
        "samples_per_digit": args.num_samples,
        "steps": args.steps,
        "cfg": args.cfg,
        "classifier_accuracy_on_real_digits": real_accuracy,
        "per_digit": {DIGIT_WORDS[label]: float(per_digit[label]) for label in range(10)},
        "accuracy": float(per_digit.mean()),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"checkpoint: {checkpoint.path}")
    print(f"classifier accuracy on held-out real digits: {real_accuracy:.3f}")
    for label in range(10):
        print(f"  {DIGIT_WORDS[label]:>5}: {per_digit[label]:.2f}")
    print(f"samples recognised as the digit asked for: {result['accuracy']:.1%} "
          f"({args.num_samples} per digit, {args.steps} Euler steps, CFG {args.cfg})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
