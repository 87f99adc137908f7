"""The ingestion job's body: list a native layout, write shards on Ray Data, report.

Outputs under `output`: `<prefix>-NNNNNN.tar` shards, `classes.yaml` (a class spec the
clean and train jobs read), `make_shards_report.json` (counts, failures grouped by
reason, every failure with its path or line) and `_make_shards/<shard>.json` records
that let a rerun skip finished shards.
"""

from __future__ import annotations

import json
import re
import time

import yaml

from cleaner.classes import ClassSpec, shipped_spec_path
from cleaner.config import ConfigError, MakeShardsConfig
from cleaner.reading import uri as uri_lib
from cleaner.reading.layouts import LayoutOptions, Listing, list_dataset
from cleaner.reading.shard_writer import RECORDS_DIR, WriteOptions, plan_shards, write_shard
from cleaner.reasons import group_reasons

REPORT_FILE = "make_shards_report.json"
CLASSES_FILE = "classes.yaml"


def listing_spec_yaml(listing: Listing, dataset: str) -> str:
    """The class spec written beside the shards: the shipped one the listing's classes come
    from (names, templates and features), else a bare one from the listing's names."""
    if listing.spec is None:
        return class_spec_yaml(listing.class_names, dataset)
    path = shipped_spec_path(listing.spec)
    header = (
        f"# Written by jobs.make_shards: the class spec shipped as cleaner/specs/{path.name}\n"
        f"# (also usable as data.classes={listing.spec}).\n"
    )
    return header + path.read_text()


def class_spec_yaml(names: list[str], dataset: str) -> str:
    """A class spec (cleaner/classes.py format) listing the classes in label order."""
    spec = {"name": dataset, "templates": ["a photo of a {c}."], "classes": list(names)}
    ClassSpec.from_dict(spec)  # the clean job must accept what we write
    header = (
        f"# Class spec of {dataset}, written by jobs.make_shards: classes in label order.\n"
        "# Add prompt features per class (see cleaner/demo/shapes.yaml) for better scores.\n"
    )
    return header + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)


def list_for(cfg: MakeShardsConfig) -> Listing:
    options = LayoutOptions(
        split=cfg.split,
        label_list=cfg.label_list,
        class_names=cfg.class_names,
        mini=cfg.mini,
        sources=tuple(cfg.sources) if cfg.sources else None,
    )
    try:
        return list_dataset(cfg.layout, cfg.input, options)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def shard_plans(cfg: MakeShardsConfig, listing: Listing) -> list[dict]:
    """The shards this config writes: the listing spread over them (unless spread_classes
    is false), shard_size images each, named `<prefix>-NNNNNN.tar`."""
    seed = cfg.seed if cfg.spread_classes else None
    return plan_shards(listing.entries, cfg.shard_size, cfg.prefix or cfg.split, seed=seed)


def _write_row(row: dict, **kwargs) -> dict:
    plan = {k: [v.item() if hasattr(v, "item") else v for v in row[k]] for k in row if k != "name"}
    plan["name"] = str(row["name"])
    record = write_shard(plan, **kwargs)
    return {"record": json.dumps(record)}


def write_all(cfg: MakeShardsConfig, plans: list[dict], class_names: list[str]):
    """Write the planned shards with Ray Data (one CPU task per shard); yields each record."""
    import ray

    kwargs = {
        "root": cfg.input,
        "output": cfg.output,
        "class_names": class_names,
        "options": WriteOptions(resize=cfg.resize, jpeg_quality=cfg.jpeg_quality),
        "resume": cfg.resume,
    }
    ds = ray.data.from_items(plans, override_num_blocks=len(plans))
    ds = ds.map(_write_row, fn_kwargs=kwargs, num_cpus=1)
    for row in ds.iter_rows():
        yield json.loads(row["record"])


def remove_stale_shards(
    output: str, prefix: str, keep: set[str], records_dir: str = RECORDS_DIR
) -> list[str]:
    """Delete `<prefix>-NNNNNN.tar` shards (and their records under records_dir) this plan
    does not name (jobs.export_shards reuses it for its own shards and records)."""
    try:
        present = uri_lib.list_files(output, ".tar")
    except FileNotFoundError:
        return []
    pattern = re.compile(rf"{re.escape(prefix)}-\d{{6}}\.tar")
    fs, _ = uri_lib.resolve(output)
    removed = []
    for uri in present:
        name = uri_lib.basename(uri)
        if pattern.fullmatch(name) and name not in keep:
            for target in (uri, uri_lib.join(output, records_dir, name + ".json")):
                if uri_lib.exists(target):
                    fs.delete_file(uri_lib.resolve(target)[1])
            removed.append(name)
    return removed


def make_shards(cfg: MakeShardsConfig, log=print) -> dict:
    """Run the ingestion for a validated config (Ray must be connected unless dry_run)."""
    t0 = time.perf_counter()
    listing = list_for(cfg)
    prefix = cfg.prefix or cfg.split
    plans = shard_plans(cfg, listing)
    dataset = cfg.dataset_name or f"{cfg.layout}-{cfg.split}"
    spec_text = listing_spec_yaml(listing, dataset)
    if listing.spec is not None:
        log(f"[make_shards] class spec: the shipped {listing.spec!r} (names, templates, features)")
    elif listing.note:
        log(f"[make_shards] class spec: {listing.note}")
    log(
        f"[make_shards] {cfg.layout} {cfg.split}: {len(listing.entries)} images, "
        f"{len(listing.class_names)} classes, {len(listing.problems)} unusable list entries"
        f"{f', {listing.excluded} outside the subset' if listing.excluded else ''} "
        f"-> {len(plans)} shards of up to {cfg.shard_size}"
    )
    failures = list(listing.problems)
    counts = {
        "listed": len(listing.entries),
        "list_problems": len(listing.problems),
        "excluded_by_subset": listing.excluded,
        "shards": len(plans),
        "shards_written": 0,
        "shards_skipped": 0,
        "written": 0,
        "reencoded": 0,
        "unreadable": 0,
    }
    labels = [e.label for e in listing.entries]
    summary: dict = {
        "job": "make_shards",
        "layout": cfg.layout,
        "input": cfg.input,
        "output": cfg.output,
        "split": cfg.split,
        "dry_run": cfg.dry_run,
        "num_classes": len(listing.class_names),
        "label_range": [min(labels), max(labels)] if labels else None,
        "classes_present": len(set(labels)),
    }
    if not cfg.dry_run:
        uri_lib.makedirs(cfg.output)
        uri_lib.write_text(uri_lib.join(cfg.output, CLASSES_FILE), spec_text)
        t1 = time.perf_counter()
        records = write_all(cfg, plans, listing.class_names) if plans else []
        for done, record in enumerate(records, start=1):
            counts["shards_skipped" if record["skipped"] else "shards_written"] += 1
            counts["written"] += record["written"]
            counts["reencoded"] += record["reencoded"]
            counts["unreadable"] += len(record["failures"])
            failures.extend({**f, "shard": record["name"]} for f in record["failures"])
            state = "skipped (already written)" if record["skipped"] else "written"
            log(
                f"[make_shards] {done}/{len(plans)} {record['name']}: {state}, "
                f"{record['written']} images, {len(record['failures'])} unreadable"
            )
        seconds = time.perf_counter() - t1
        summary["removed_stale_shards"] = remove_stale_shards(
            cfg.output, prefix, {p["name"] for p in plans}
        )
        summary["write_seconds"] = round(seconds, 3)
        fresh = sum(len(p["paths"]) for p in plans) if counts["shards_skipped"] == 0 else None
        summary["images_per_second"] = round(fresh / seconds, 2) if fresh and seconds else None
    summary["counts"] = counts
    summary["failed_by_reason"] = group_reasons(f["reason"] for f in failures)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary["failures"] = failures
    if not cfg.dry_run:
        report = json.dumps(summary, indent=2) + "\n"
        uri_lib.write_text(uri_lib.join(cfg.output, REPORT_FILE), report)
    for reason, count in list(summary["failed_by_reason"].items())[:10]:
        log(f"[make_shards]   {count:>9,} x {reason}")
    log(
        f"[make_shards] {counts['written']} images in {counts['shards_written']} shards written, "
        f"{counts['shards_skipped']} skipped, {len(failures)} failures; "
        f"report {uri_lib.join(cfg.output, REPORT_FILE) if not cfg.dry_run else '(dry run)'}"
    )
    return summary
