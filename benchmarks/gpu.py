"""GPU throughput against hardware bounds: CLIP scoring and ResNet-50 DDP training.

    python -m benchmarks.gpu --json gpu.json          # one GPU, about 5 minutes
    python -m benchmarks.gpu --smoke --json smoke.json  # CPU, tiny sizes, seconds

Measures, in one run, with random weights (nothing is downloaded):
  scoring, decode excluded  ViT-B-32 (QuickGELU, bf16) ClipScorer on uint8 images already
                            decoded: the model's own speed, against the compute bound
                            peak_tflops / GFLOP per image (8.8 GFLOP/image for ViT-B/32's
                            image tower; H100/H200 dense bf16 ~989 TFLOP/s).
  decode only               JPEG decode + resize (cleaner.reading.shards.decode_image) in
                            a process pool of --decode-workers.
  scoring, decode included  decode in the pool while the GPU scores the previous batch.
  training                  ResNet-50 (224 px, bf16 autocast, SGD, mixup) in a DDP group of
                            one rank on this GPU, fed synthetic uint8 batches already on the
                            device, against NVIDIA's 2,470 img/s per A100 (AMP, DALI) reference.
The JSON holds every figure, the ratios, the GPU, torch version and the load average.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

VIT_B32_GFLOP = 8.8  # per 224 px image, image tower (2 x 4.4 GMAC)
H100_BF16_DENSE_TFLOPS = 989.0
A100_RN50_AMP_REFERENCE = 2470.0  # img/s per GPU, NVIDIA DeepLearningExamples, A100 80GB AMP

FULL = {
    "model": "ViT-B-32",
    "classes": 1000,
    "score_batch": 512,
    "score_batches": 60,
    "jpegs": 4096,
    "jpeg_size": (500, 375),
    "train_network": "resnet50",
    "train_size": 224,
    "train_batch": 256,
    "train_steps": 60,
    "warmup": 10,
}
SMOKE = {
    "model": "tiny-clip-shapes",
    "classes": 8,
    "score_batch": 8,
    "score_batches": 3,
    "jpegs": 16,
    "jpeg_size": (48, 40),
    "train_network": "tiny_cnn",
    "train_size": 32,
    "train_batch": 8,
    "train_steps": 3,
    "warmup": 1,
}


def gflop_per_image(model: torch.nn.Module, size: int, device: torch.device) -> float:
    """Forward GFLOP of one image through the image tower, counted by torch (2 per MAC).

    nn.MultiheadAttention's inference fast path (eval mode, no grad) is one fused op that
    the counter does not see: it is off while counting (a third of the tiny CLIP's FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    image = torch.zeros(1, 3, size, size, device=device)
    counter = FlopCounterMode(display=False)
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with counter, torch.no_grad():
            model.encode_image(image)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    return counter.get_total_flops() / 1e9


def make_jpegs(count: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    """Smooth random JPEGs (camera-like sizes, not noise: noise JPEGs decode slowly)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    out = []
    for _ in range(count):
        small = rng.integers(0, 255, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def decode_batch(args: tuple[list[bytes], int, dict]) -> np.ndarray:
    from cleaner.reading.shards import decode_image

    jpegs, size, resize = args
    return np.stack([decode_image(j, size, **resize) for j in jpegs])


def build_scorer(cfg: dict, device: torch.device):
    from cleaner.config import ModelConfig
    from cleaner.scoring.models import load_clip
    from cleaner.scoring.prompts import encode_prompts
    from cleaner.scoring.scorer import ClipScorer

    model_cfg = ModelConfig(
        name=cfg["model"], random_weights=True, precision="bf16", quick_gelu=True
    )
    text_model = load_clip(model_cfg, device="cpu")
    prompts = [[f"a photo of a thing number {k}."] for k in range(cfg["classes"])]
    bank = encode_prompts(text_model.model, text_model.tokenizer, prompts)
    flops = gflop_per_image(text_model.model, text_model.image_size, torch.device("cpu"))
    del text_model
    scorer = ClipScorer(model_cfg.model_dump(), bank, device=str(device))
    return scorer, flops


def bench_scoring(cfg: dict, device: torch.device, workers: int) -> dict:
    scorer, flops = build_scorer(cfg, device)
    size, batch = scorer.clip.image_size, cfg["score_batch"]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (batch, size, size, 3), dtype=np.uint8)
    for _ in range(cfg["warmup"]):
        scorer.score(images)
    start = time.perf_counter()
    for _ in range(cfg["score_batches"]):
        scorer.score(images)  # each ends in one .cpu(): the timing includes the GPU work
    model_s = time.perf_counter() - start
    model_ips = cfg["score_batches"] * batch / model_s

    jpegs = make_jpegs(cfg["jpegs"], cfg["jpeg_size"])
    chunks = [(jpegs[i : i + batch], size, scorer.clip.resize) for i in range(0, len(jpegs), batch)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(decode_batch, chunks[:workers]))  # workers started and warm
        start = time.perf_counter()
        decoded = sum(len(x) for x in pool.map(decode_batch, chunks))
        decode_ips = decoded / (time.perf_counter() - start)
        start, scored = time.perf_counter(), 0
        for pixels in pool.map(decode_batch, chunks):  # decoding runs ahead of the GPU
            scored += len(scorer.score(pixels)["probs"])
        pipeline_ips = scored / (time.perf_counter() - start)
    return {
        "model": cfg["model"],
        "image_size": size,
        "batch": batch,
        "gflop_per_image_measured": flops,
        "decode_excluded_images_per_s": model_ips,
        "decode_only_images_per_s": decode_ips,
        "decode_included_images_per_s": pipeline_ips,
        "decode_workers": workers,
    }


def bench_training(cfg: dict, device: torch.device) -> dict:
    import torch.distributed as dist

    from training.devices import amp_dtype_for, configure_backends, make_scaler, normalise
    from training.mixfix import make_optimizer, train_one_epoch
    from training.networks import build_network

    configure_backends(device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        model = build_network(cfg["train_network"], 1000).to(device)
        model = model.to(memory_format=torch.channels_last)
        ids = [device.index or 0] if device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        optimizer = make_optimizer(ddp, 0.1, 0.9, 1e-4)
        amp = amp_dtype_for(device, "auto")
        scaler = make_scaler(amp, device)
        size, batch = cfg["train_size"], cfg["train_batch"]
        gen = torch.Generator(device=device).manual_seed(0)
        raw = torch.randint(0, 255, (batch, size, size, 3), dtype=torch.uint8, device=device)
        raw = raw if device.type == "cuda" else raw.contiguous()
        mean = torch.tensor([0.485, 0.456, 0.406], device=device).reshape(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], device=device).reshape(1, 3, 1, 1)
        labels = torch.randint(0, 1000, (batch,), device=device, generator=gen)

        def batches(steps):
            for _ in range(steps):
                yield (
                    normalise(raw, mean, std).contiguous(memory_format=torch.channels_last),
                    labels,
                )

        kwargs = {
            "beta": 1.0,
            "device": device,
            "generator": np.random.default_rng(0),
            "scaler": scaler,
            "amp_dtype": amp,
        }
        train_one_epoch(ddp, optimizer, batches(cfg["warmup"]), **kwargs)
        start = time.perf_counter()
        stats = train_one_epoch(ddp, optimizer, batches(cfg["train_steps"]), **kwargs)
        seconds = time.perf_counter() - start  # the final float(loss) waits for the GPU
    finally:
        dist.destroy_process_group()
    ips = stats["samples"] / seconds
    return {
        "network": cfg["train_network"],
        "image_size": size,
        "batch_per_gpu": batch,
        "precision": str(amp),
        "images_per_s_per_gpu": ips,
        "reference_images_per_s": A100_RN50_AMP_REFERENCE,
        "ratio_to_reference": ips / A100_RN50_AMP_REFERENCE,
        "loss_finite": bool(np.isfinite(stats["loss"])),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (a test)")
    parser.add_argument("--json", default="gpu-benchmark.json", help="results file")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    parser.add_argument("--decode-workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args(argv)

    cfg = SMOKE if args.smoke else FULL
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    workers = 1 if args.smoke else args.decode_workers
    started = time.perf_counter()
    result: dict = {
        "mode": "smoke" if args.smoke else "full",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "capability": list(torch.cuda.get_device_capability(device))
        if device.type == "cuda"
        else None,
        "torch": torch.__version__,
        "load_average_before": list(os.getloadavg()),
    }
    scoring = bench_scoring(cfg, device, workers)
    gflop = VIT_B32_GFLOP if cfg["model"] == "ViT-B-32" else scoring["gflop_per_image_measured"]
    bound = args.peak_tflops * 1e3 / gflop
    scoring.update(
        gflop_per_image_used=gflop,
        peak_tflops=args.peak_tflops,
        compute_bound_images_per_s=bound,
        decode_excluded_fraction_of_bound=scoring["decode_excluded_images_per_s"] / bound,
        decode_included_fraction_of_bound=scoring["decode_included_images_per_s"] / bound,
    )
    result["scoring"] = scoring
    print(f"[gpu] scoring: {json.dumps(scoring)}", flush=True)
    if not args.skip_training:
        result["training"] = bench_training(cfg, device)
        print(f"[gpu] training: {json.dumps(result['training'])}", flush=True)
    result["seconds"] = time.perf_counter() - started
    result["load_average_after"] = list(os.getloadavg())
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"[gpu] wrote {args.json} ({result['seconds']:.0f} s)", flush=True)
    return result


if __name__ == "__main__":
    main()
