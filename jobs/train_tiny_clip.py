"""Train the tiny demo CLIP on generated shapes and ship it as an open_clip checkpoint.

    python -m jobs.train_tiny_clip [--num-images 40000] [--epochs N | --steps N | --minutes M]
        [--seed 0] [--out cleaner/assets/tiny-clip-shapes.pt]

Trains from scratch on CPU (deterministic for a given seed, step count and thread count),
evaluates prompt-ensemble zero-shot accuracy on held-out generated images, saves an fp16 state
dict, reloads it through ``open_clip.create_model_and_transforms("tiny-clip-shapes",
pretrained=...)`` and writes a metrics JSON next to the checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import open_clip
import torch

from cleaner.classes import DEMO_CLASS_SPEC, ClassSpec
from cleaner.demo.tiny_clip import (
    GENERATION_SIZE,
    TINY_CLIP_CHECKPOINT,
    TINY_CLIP_NAME,
    CaptionMix,
    TrainConfig,
    build_training_data,
    count_parameters,
    load_tiny_clip,
    register_tiny_clip,
    save_fp16_state_dict,
    train_tiny_clip,
    zero_shot_accuracy,
    zero_shot_predictions,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m jobs.train_tiny_clip", description=__doc__)
    parser.add_argument("--num-images", type=int, default=40_000, help="training images")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=None, help=f"default {defaults.epochs}")
    length.add_argument("--steps", type=int, default=None, help="optimizer steps")
    length.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="training budget; converted once to a step count by timing a few steps "
        "(printed, so the run can be repeated exactly with --steps)",
    )
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument(
        "--caption-mix",
        type=_caption_mix,
        default=defaults.caption_mix,
        metavar="E,T,A",
        help="weights of ensemble-prompt, template and attribute captions (default "
        f"{defaults.caption_mix.ensemble},{defaults.caption_mix.template},"
        f"{defaults.caption_mix.attribute})",
    )
    parser.add_argument(
        "--target-attrs",
        type=_attr_list,
        default=defaults.target_attrs,
        metavar="KEYS",
        help="comma-separated draw attributes that attribute captions must match to count as "
        "positives ('' = class only, 'all' = every asserted attribute; default "
        f"{_attr_text(defaults.target_attrs)!r})",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--eval-images", type=int, default=2000, help="held-out images")
    parser.add_argument(
        "--eval-seed", type=int, default=None, help="seed of the held-out images (seed + 1000)"
    )
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--out", type=Path, default=TINY_CLIP_CHECKPOINT)
    parser.add_argument(
        "--metrics", type=Path, default=None, help="metrics JSON (default: <out>.metrics.json)"
    )
    return parser.parse_args(argv)


def _caption_mix(text: str) -> CaptionMix:
    values = [float(v) for v in text.split(",")]
    if len(values) != 3 or min(values) < 0 or sum(values) <= 0:
        raise argparse.ArgumentTypeError("expected three non-negative weights E,T,A")
    return CaptionMix(*values)


def _attr_list(text: str) -> tuple[str, ...] | None:
    if text.strip() == "all":
        return None
    return tuple(k.strip() for k in text.split(",") if k.strip())


def _attr_text(keys: tuple[str, ...] | None) -> str:
    return "all" if keys is None else ",".join(keys)


def _seconds_per_step(model, tokenizer, data, spec, config: TrainConfig, steps: int = 8) -> float:
    """Time a few training steps on a throwaway copy of the model."""
    probe = replace(config, steps=steps + 2, warmup_steps=1)
    scratch = copy.deepcopy(model)
    train_tiny_clip(scratch, tokenizer, data, spec, replace(probe, steps=2), log=None)
    result = train_tiny_clip(scratch, tokenizer, data, spec, replace(probe, steps=steps), log=None)
    return result.seconds / steps


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate, save and verify the tiny CLIP checkpoint."""
    args = parse_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["python", "-m", "jobs.train_tiny_clip", *argv_list])
    eval_seed = args.seed + 1000 if args.eval_seed is None else args.eval_seed
    metrics_path = args.metrics or args.out.with_name(args.out.name.split(".")[0] + ".metrics.json")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    spec = ClassSpec.load(DEMO_CLASS_SPEC)
    register_tiny_clip()
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP_NAME)
    tokenizer = open_clip.get_tokenizer(TINY_CLIP_NAME)
    print(
        f"model {TINY_CLIP_NAME}: {count_parameters(model):,} parameters, "
        f"context length {tokenizer.context_length}, image size {model.visual.image_size}",
        flush=True,
    )

    t0 = time.perf_counter()
    data = build_training_data(args.num_images, args.seed, preprocess, spec)
    data_seconds = time.perf_counter() - t0
    print(
        f"generated {len(data)} images ({GENERATION_SIZE} px -> preprocess "
        f"{tuple(data.images.shape[1:])}) in {data_seconds:.1f}s",
        flush=True,
    )

    config = TrainConfig(
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        seed=args.seed,
        caption_mix=args.caption_mix,
        target_attrs=args.target_attrs,
        log_every=args.log_every,
    )
    if args.epochs is not None:
        config = replace(config, epochs=args.epochs)
    elif args.steps is not None:
        config = replace(config, steps=args.steps)
    elif args.minutes is not None:
        per_step = _seconds_per_step(model, tokenizer, data, spec, config)
        steps = max(1, int(args.minutes * 60 / per_step))
        config = replace(config, steps=steps)
        print(
            f"--minutes {args.minutes}: {per_step * 1000:.0f} ms/step -> {steps} steps "
            f"(repeat exactly with --steps {steps})",
            flush=True,
        )
    total = config.total_steps(len(data))
    print(f"training {total} steps, batch {config.batch_size}, lr {config.lr}", flush=True)

    result = train_tiny_clip(model, tokenizer, data, spec, config, log=_print)
    print(f"trained {result.steps} steps in {result.seconds:.1f}s", flush=True)

    accuracy = zero_shot_accuracy(model, tokenizer, preprocess, args.eval_images, eval_seed, spec)
    print(f"zero-shot accuracy (fp32, {args.eval_images} held-out images): {accuracy:.4f}")

    size = save_fp16_state_dict(model, args.out)
    reloaded, reloaded_preprocess, reloaded_tokenizer = load_tiny_clip(args.out)
    params = count_parameters(reloaded)
    labels, predictions = zero_shot_predictions(
        reloaded, reloaded_tokenizer, reloaded_preprocess, args.eval_images, eval_seed, spec
    )
    reloaded_accuracy = float((predictions == labels).mean())
    per_class = {
        name: round(float((predictions[labels == k] == k).mean()), 4)
        for k, name in enumerate(spec.names)
    }
    print(
        f"reloaded {args.out} via open_clip.create_model_and_transforms({TINY_CLIP_NAME!r}): "
        f"{params:,} parameters, {size / 1e6:.2f} MB, "
        f"zero-shot accuracy {reloaded_accuracy:.4f}",
        flush=True,
    )
    print("per-class accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in per_class.items()))

    metrics = {
        "model": TINY_CLIP_NAME,
        "checkpoint": args.out.name,
        "zero_shot_accuracy": round(reloaded_accuracy, 4),
        "zero_shot_accuracy_fp32": round(accuracy, 4),
        "zero_shot_accuracy_per_class": per_class,
        "eval_images": args.eval_images,
        "eval_seed": eval_seed,
        "parameters": params,
        "checkpoint_bytes": size,
        "train_seconds": round(result.seconds, 1),
        "data_seconds": round(data_seconds, 1),
        "final_loss": round(result.final_loss, 4),
        "num_images": args.num_images,
        "seed": args.seed,
        "threads": args.threads,
        "train_config": {k: v for k, v in asdict(config).items() if k != "log_every"},
        "total_steps": total,
        "command": command,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
        },
        "machine": platform.machine(),
    }
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {metrics_path}")
    return 0


def _print(message: str) -> None:
    print(message, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
