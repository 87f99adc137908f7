"""Fitting the detectors the selection config asks for, over the score files.

    detectors = fit_detectors(cfg, score_uris, class_names, verified=..., num_gpus=...)

Returns None for `selection.detector=clipcleaner` (the manifest is then CLIPCleaner's,
unchanged). Otherwise the fitted members (DeFT, CleanNet) in a `FittedDetectors` that the
manifest builders apply row by row (cleaner/detectors/apply.py). Blocks of embeddings
stay in Ray's object store (`RayBlocks`) or, given `blocks=LocalBlocks(...)`, in this
process (tests, small runs).
"""

from __future__ import annotations

import time

import numpy as np

from cleaner.config import CleanJobConfig, ConfigError
from cleaner.detectors import cleannet, deft
from cleaner.detectors.apply import CLIPCLEANER, FittedDetectors
from cleaner.detectors.blocks import LocalBlocks, RayBlocks, flatten
from cleaner.detectors.verified import SHARDS, VerifiedLabels, check_known_keys

CLASS_GROUPS = 8  # reduce tasks of the CleanNet class sample, at most


def members_needed(cfg) -> list[str]:
    """The detectors to fit besides CLIPCleaner (which the base manifest always has)."""
    if cfg.detector == CLIPCLEANER:
        return []
    if cfg.detector != "ensemble":
        return [cfg.detector]
    members = cfg.ensemble.members or [
        CLIPCLEANER,
        "deft",
        *(["cleannet"] if cfg.verified else []),
    ]
    return [m for m in members if m != CLIPCLEANER]


def ensemble_members(cfg, fitted: list[str]) -> tuple[str, ...]:
    return tuple(cfg.ensemble.members or [CLIPCLEANER, *fitted])


def _shape(block) -> tuple[int, int]:
    return len(block["label"]), int(block["embedding"].shape[1])


def _true_labels(block) -> tuple[np.ndarray, np.ndarray]:
    rows = np.flatnonzero(block["true_label"] >= 0)
    return block["key"][rows].astype(str), block["true_label"][rows]


def verified_from_shards(blocks, num_classes: int) -> VerifiedLabels:
    """The true labels the shards carry (Clothing1M's clean labels), as verified labels."""
    labels: dict[str, int] = {}
    for keys, values in blocks.map(_true_labels):
        labels.update(zip(keys.tolist(), values.tolist(), strict=True))
    labels = {k: v for k, v in labels.items() if 0 <= v < num_classes}
    if not labels:
        raise ConfigError(
            "selection.verified=shards: no usable sample carries a true (verified) label"
        )
    return VerifiedLabels(SHARDS, labels)


def fit_deft(blocks, cfg: CleanJobConfig, class_names, num_rows: int, num_gpus: float, log):
    """DeFT's prompts, trained by a PromptTrainer (a Ray actor, or here for LocalBlocks)."""
    settings = cfg.selection.deft
    args = (cfg.model.model_dump(), class_names, settings.model_dump(), cfg.seed)
    if isinstance(blocks, LocalBlocks):
        handle = deft.Handle(deft.PromptTrainer(*args))
        return deft.train_prompts(blocks, handle, settings, num_rows, cfg.seed, log=log)
    import ray

    actor = (
        ray.remote(deft.PromptTrainer)
        .options(num_gpus=num_gpus, num_cpus=1 if num_gpus == 0 else 0)
        .remote(*args)
    )
    try:
        return deft.train_prompts(
            blocks, deft.Handle(actor, remote=True), settings, num_rows, cfg.seed, log=log
        )
    finally:
        ray.kill(actor)


def fit_cleannet(blocks, cfg: CleanJobConfig, verified: VerifiedLabels, num_classes, dim, log):
    """CleanNet: class sample + k-means references, verified rows, then training."""
    settings, seed = cfg.selection.cleannet, cfg.seed
    counts = np.sum(blocks.map(cleannet.class_counts, num_classes), axis=0)
    keep = np.minimum(1.0, cleannet.SAMPLE_MARGIN * settings.ref_sample / np.maximum(counts, 1))
    groups = max(1, min(CLASS_GROUPS, num_classes))
    candidates = blocks.map_partitioned(cleannet.sample_candidates, groups, keep, groups, seed)
    class_groups = [
        blocks.run(
            cleannet.class_samples_and_references, settings, num_classes, dim, seed, *candidates[g]
        )
        for g in range(groups)
    ]
    found, rows = blocks.map_partitioned(cleannet.verified_rows, 2, verified.labels)
    found_keys = {str(k) for part in flatten(blocks.get(found)) for k in part["keys"]}
    check_known_keys(verified, found_keys)
    verified_rows = blocks.run(cleannet.concat_parts, *rows)
    usable = len(found_keys)
    log(
        f"[cleannet] {usable} verified samples usable of {len(verified)}; "
        f"{int((counts > 0).sum())} classes, {settings.num_ref} references each"
    )
    if usable == 0:
        raise ConfigError(f"selection.verified: {verified.source}: no verified sample is usable")
    fitted = blocks.get(
        blocks.run(
            cleannet.train_cleannet,
            settings,
            num_classes,
            dim,
            seed,
            verified_rows,
            *class_groups,
        )
    )
    return fitted.with_verified(verified, settings.trust_verified)


def fit_detectors(
    cfg: CleanJobConfig,
    score_uris: list[str],
    class_names: list[str],
    *,
    shards: list[str] | None = None,
    verified: VerifiedLabels | None = None,
    num_gpus: float = 0,
    blocks=None,
    log=print,
) -> FittedDetectors | None:
    """Fit what `cfg.selection` asks for (None for clipcleaner); see the module docstring.
    score_uris[i] holds the scores of shards[i] (the shards: DeFT's image tuning reads them)."""
    selection = cfg.selection
    wanted = members_needed(selection)
    if selection.detector == CLIPCLEANER:
        return None
    blocks = blocks if blocks is not None else RayBlocks(score_uris)
    shapes = blocks.map(_shape)
    num_rows = int(sum(n for n, _ in shapes))
    dim = max((d for n, d in shapes if n), default=0)
    if num_rows == 0:  # the manifest lists every sample as failed, with its reason
        log("[detectors] no usable sample: nothing to fit; the manifest is CLIPCleaner's")
        blocks.release()
        return None
    log(f"[detectors] fitting {', '.join(wanted) or 'nothing'} on {num_rows} usable samples")
    members: dict = {}
    seconds: dict[str, float] = {}
    try:
        if "deft" in wanted:
            begun = time.perf_counter()
            if selection.deft.image_tuning != "none":
                from cleaner.detectors.deft_images import fit_deft_images

                members["deft"] = fit_deft_images(cfg, class_names, shards or [], log=log)
            else:
                members["deft"] = fit_deft(blocks, cfg, class_names, num_rows, num_gpus, log)
            seconds["deft"] = time.perf_counter() - begun
            log(f"[detectors] deft fitted ({seconds['deft']:.1f} s)")
        if "cleannet" in wanted:
            begun = time.perf_counter()
            if verified is None or selection.verified == SHARDS:
                verified = verified_from_shards(blocks, len(class_names))
            members["cleannet"] = fit_cleannet(blocks, cfg, verified, len(class_names), dim, log)
            seconds["cleannet"] = time.perf_counter() - begun
            log(f"[detectors] cleannet fitted ({seconds['cleannet']:.1f} s)")
    finally:
        blocks.release()
    return FittedDetectors(
        chosen=selection.detector,
        members=members,
        ensemble_members=ensemble_members(selection, list(members)),
        suggest_min_confidence=selection.suggest_min_confidence,
        fit_seconds=seconds,
    )
