"""Training throughput with 1 and 2 workers: scaling efficiency, measured in one run.

    python -m benchmarks.train_scaling --manifest runs/demo [--epochs 3]

Runs the MixFix training job twice on the same data (1 worker, then 2), each for a few
epochs, and compares the steady-state training images/s (the median over epochs after
the first, which pays for start-up and decoding). Efficiency = ips(2) / (2 * ips(1));
target >= 0.8. On a 2-core machine both workers share the cores with the data tasks, so
read this as a lower bound for machines with a core (or GPU) per worker.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from cleaner.config import load_config
from jobs.train import run_train
from training.config import TrainJobConfig


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/train-demo.yaml")
    parser.add_argument("--manifest", default="runs/demo")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)

    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            cfg = load_config(
                args.config,
                [
                    f"data.manifest={args.manifest}",
                    "data.test_input=null",
                    f"run.storage={tmp}",
                    f"run.name=scaling-{workers}",
                    f"optim.epochs={args.epochs}",
                    f"optim.batch_size={args.batch_size}",
                    f"scaling.num_workers={workers}",
                    "mixfix.mode=clean_only",  # no prediction pass: training throughput only
                ],
                TrainJobConfig,
            )
            summary = run_train(cfg)
            history = summary["history"]
            steady = [h["train_images_per_s"] for h in history[1:]] or [
                history[0]["train_images_per_s"]
            ]
            rates[workers] = statistics.median(steady)
    efficiency = rates[2] / (2 * rates[1])
    print(f"1 worker : {rates[1]:8.1f} images/s")
    print(f"2 workers: {rates[2]:8.1f} images/s")
    print(f"scaling efficiency ips(2) / (2 * ips(1)) = {efficiency:.3f}  (target >= 0.8)")
    return {"images_per_s": rates, "efficiency": efficiency}


if __name__ == "__main__":
    main()
