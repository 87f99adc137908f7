"""What the class spec's prompts are worth: per-class features vs templates vs bare names.

    make demo-data
    python -m benchmarks.prompt_ablation --data data/demo/train [--data data/demo-hard/train]

For each shard folder (demo shards, whose .json carries the true label) the images are
embedded once, in this process, by the clean job's scorer (`ClipScorer`, the model's own
decoding); then, for every prompt variant of the class spec, the zero-shot probabilities
are recomputed from the same embeddings and the job's default selection runs on them
(zero-shot + in-sample probe, the EM engine of `select_from_scores`). Printed per variant:
zero-shot accuracy against the true labels, the AUROC of p(label) as a clean score, the
clean selection's precision / recall / F1 / AUROC (positive = clean), and `cos`: how close
the variant's class text embeddings are to the one-template ones (1.0: the prompts change
nothing the text tower sees). No Ray.

Variants (the spec's classes, names and order are kept; only the prompts change):
  features     the spec as shipped: one prompt per visual feature
  shuffled features  a control: each class gets the next class's features
  templates    no features: the spec's own templates
  one template no features: "a photo of a {c}." (what jobs.make_shards used to write)
  bare name    no features: "{c}" alone
  openai-80    no features: OpenAI's 80 ImageNet templates
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from cleaner.classes import ClassSpec
from cleaner.config import ModelConfig, SelectionConfig
from cleaner.metrics import detection_metrics
from cleaner.reading import uri as uri_lib
from cleaner.reading.shards import STATUS_OK, read_shard
from cleaner.scoring.models import load_clip
from cleaner.scoring.prompts import encode_prompts, ensemble_probs_numpy
from cleaner.scoring.scorer import ClipScorer
from cleaner.selection.probe import fit_probe_probs
from cleaner.selection.rules import SourceScores
from cleaner.selection.score_table import engine_options
from cleaner.selection.select import select_from_scores
from jobs.common import load_class_spec


def variants(spec: ClassSpec) -> dict[str, ClassSpec]:
    """The prompt variants of a spec: same classes, other prompts."""
    openai = load_class_spec("imagenet1k").templates

    def without_features(templates) -> ClassSpec:
        data = spec.to_dict()
        data["classes"] = [c if isinstance(c, str) else c["name"] for c in data["classes"]]
        data["templates"] = list(templates)
        return ClassSpec.from_dict(data)

    shuffled = spec.to_dict()  # a control: every class gets the next class's features
    entries = shuffled["classes"]
    features = [e.get("features", []) if isinstance(e, dict) else [] for e in entries]
    for i, entry in enumerate(entries):
        if isinstance(entry, dict) and features[(i + 1) % len(entries)]:
            entry["features"] = features[(i + 1) % len(entries)]
            entry.pop("similar_to", None)
    return {
        "features": spec,
        "shuffled features": ClassSpec.from_dict(shuffled),
        "templates": without_features(spec.templates),
        "one template": without_features(["a photo of a {c}."]),
        "bare name": without_features(["{c}"]),
        "openai-80": without_features(openai),
    }


def embed(shards: list[str], scorer: ClipScorer, spec: ClassSpec, batch: int = 256):
    """(embeddings float32 [N, D], labels, true labels) of the usable samples of `shards`."""
    embeddings, labels, truths = [], [], []
    for shard in shards:
        for rows in read_shard(
            shard,
            class_names=spec.names,
            image_size=scorer.clip.image_size,
            extensions=["jpg", "jpeg", "png"],
            batch_size=batch,
            **scorer.clip.resize,
        ):
            ok = (np.asarray(rows["status"]) == STATUS_OK) & (np.asarray(rows["label"]) >= 0)
            if ok.any():
                embeddings.append(scorer.embed(rows["image"][ok]).numpy())
                labels.append(np.asarray(rows["label"])[ok])
                truths.append(np.asarray(rows["true_label"])[ok])
    return np.concatenate(embeddings), np.concatenate(labels), np.concatenate(truths)


def evaluate(zs, probe, labels, truths, num_classes: int, cfg: SelectionConfig) -> dict:
    """Zero-shot accuracy and AUROC, and the default selection's detection metrics."""
    rows = np.arange(labels.shape[0])
    clean = labels == truths
    sources = {"zeroshot": SourceScores(p_label=zs[rows, labels], max_p=zs.max(axis=1))}
    sources["probe"] = SourceScores(p_label=probe[rows, labels], max_p=probe.max(axis=1))
    result = select_from_scores(labels, num_classes, sources, **engine_options(cfg))
    det = detection_metrics(result.is_clean, clean, result.clean_score)
    return {
        "zeroshot_accuracy": float((zs.argmax(axis=1) == truths).mean()),
        "zeroshot_auroc": detection_metrics(clean, clean, zs[rows, labels])["auroc"],
        "precision": det["precision"],
        "recall": det["recall"],
        "f1": det["f1"],
        "auroc": det["auroc"],
        "clean": int(result.is_clean.sum()),
    }


def closeness(bank, reference) -> float:
    """Mean over classes of the cosine between a class's mean prompt embedding and its
    one-template embedding: how much the prompts change what the text tower sees."""
    mean = (bank.features * bank.mask[..., None]).sum(axis=1)
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)
    return float((mean * reference.features[:, 0]).sum(axis=1).mean())


def run(data: str, model: ModelConfig, classes: str, tau: float) -> dict:
    spec = load_class_spec(classes)
    shards = uri_lib.expand_shard_spec(data)
    clip = load_clip(model, device="cpu")  # the text tower, for every variant's prompts
    bank = encode_prompts(clip.model, clip.tokenizer, spec.prompts())
    scorer = ClipScorer(model.model_dump(), bank, tau=tau, device="cpu")
    start = time.perf_counter()
    embeddings, labels, truths = embed(shards, scorer, spec)
    print(
        f"{data}: {labels.shape[0]} samples, {(labels != truths).mean():.1%} wrong labels, "
        f"embedded in {time.perf_counter() - start:.1f} s"
    )
    cfg = SelectionConfig()  # the clean job's defaults
    probe = fit_probe_probs(embeddings, labels, spec.num_classes, mode=cfg.probe, C=cfg.probe_c)
    results = {}
    one_template = encode_prompts(
        clip.model, clip.tokenizer, variants(spec)["one template"].prompts()
    )
    print(
        f"  {'prompts':<19}{'J':>4}{'zs acc':>8}{'zs AUROC':>10}{'prec':>8}{'recall':>8}{'F1':>8}{'AUROC':>8}{'clean':>7}"
    )
    for name, variant in variants(spec).items():
        bank = encode_prompts(clip.model, clip.tokenizer, variant.prompts())
        zs = ensemble_probs_numpy(embeddings, bank, tau).astype(np.float64)
        row = evaluate(zs, probe, labels, truths, spec.num_classes, cfg)
        row["prompts_per_class"] = int(bank.mask.sum(axis=1).max())
        row["cos_to_one_template"] = closeness(bank, one_template)
        results[name] = row
        print(
            f"  {name:<19}{row['prompts_per_class']:>4}{row['zeroshot_accuracy']:>8.4f}"
            f"{row['zeroshot_auroc']:>10.4f}{row['precision']:>8.4f}{row['recall']:>8.4f}"
            f"{row['f1']:>8.4f}{row['auroc']:>8.4f}{row['clean']:>7}{row['cos_to_one_template']:>7.3f}"
        )
    return {"samples": int(labels.shape[0]), "wrong": int((labels != truths).sum()), **results}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", help="demo shards (repeatable)")
    parser.add_argument("--classes", default="demo", help="class spec (data.classes)")
    parser.add_argument("--model", default="tiny-clip-shapes", help="open_clip model name")
    parser.add_argument("--pretrained", default=None, help="open_clip tag or checkpoint")
    parser.add_argument("--tau", type=float, default=0.07)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    model = ModelConfig(name=args.model, pretrained=args.pretrained)
    load_before = os.getloadavg()
    out = {
        data: run(data, model, args.classes, args.tau) for data in args.data or ["data/demo/train"]
    }
    out["load_average"] = [round(x, 2) for x in (*load_before, *os.getloadavg())]
    print(f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}")
    if args.json:
        uri_lib.write_text(args.json, json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
