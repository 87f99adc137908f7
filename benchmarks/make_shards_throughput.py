"""make_shards throughput: images per second writing shards with 1 and with 2 CPUs.

    python -m benchmarks.make_shards_throughput [--images 20000] [--cpus 1 2] [--resize 32]

Generates small JPEGs in an ImageFolder tree (10 classes, 64x48 px, ~1 KB each) once,
then for each CPU count starts a fresh local Ray with that many CPUs and runs the
ingestion (listing, writing shards of 1,000, report) into a fresh folder. Reported:
images/s of the shard-writing step (Ray Data, one task per shard) and of the whole job,
the 2-vs-1 CPU ratio, and the load average (the machine may be shared).
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

from PIL import Image

from cleaner.config import MakeShardsConfig, load_config
from cleaner.reading.ingest import make_shards


def generate(root: Path, count: int, classes: int = 10) -> None:
    """`count` small solid-colour JPEGs with a stripe, spread over `classes` folders."""
    for i in range(count):
        label = i % classes
        img = Image.new("RGB", (64, 48), ((label * 25) % 256, (i * 7) % 256, 90))
        img.paste((255, 255, 255), (i % 50, 0, i % 50 + 8, 48))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        path = root / f"class{label:02d}" / f"{i:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())


def run(root: Path, out: Path, cpus: int, resize: int | None) -> dict:
    import ray

    cfg = load_config(
        None,
        [
            "layout=imagefolder",
            f"input={root}",
            f"output={out}",
            "shard_size=1000",
            *([f"resize={resize}"] if resize else []),
        ],
        MakeShardsConfig,
    )
    ray.init(address="local", num_cpus=cpus, include_dashboard=False)
    try:
        start = time.perf_counter()
        summary = make_shards(cfg, log=lambda _: None)
        total = time.perf_counter() - start
    finally:
        ray.shutdown()
    written = summary["counts"]["written"]
    return {
        "cpus": cpus,
        "images": written,
        "write_images_per_s": summary["images_per_second"],
        "job_seconds": round(total, 2),
        "job_images_per_s": round(written / total, 1),
        "load": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--resize", type=int, default=None, help="re-encode at this short side")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        start = time.perf_counter()
        generate(root, args.images)
        print(f"generated {args.images} JPEGs in {time.perf_counter() - start:.1f} s")
        print(f"load average before: {os.getloadavg()}")
        results = []
        for cpus in args.cpus:
            result = run(root, Path(tmp) / f"shards-{cpus}", cpus, args.resize)
            results.append(result)
            print(
                f"  {cpus} CPU: {result['images']} images, writing {result['write_images_per_s']} "
                f"img/s, whole job {result['job_seconds']} s = {result['job_images_per_s']} img/s "
                f"(load average {tuple(round(x, 2) for x in result['load'])})"
            )
        if len(results) > 1 and results[0]["write_images_per_s"]:
            ratio = results[-1]["write_images_per_s"] / results[0]["write_images_per_s"]
            print(
                f"writing speed-up {results[-1]['cpus']} vs {results[0]['cpus']} CPUs: {ratio:.2f}x"
            )


if __name__ == "__main__":
    main()
