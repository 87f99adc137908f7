"""The clean samples of a manifest as WebDataset shards: plans, and writing one shard.

`plan_export` reads the manifest's small columns and decides which samples go into which
output shard: the clean rows (status "clean"), plus, with relabel, the noisy rows that
have a suggested label. Failed and off-topic rows are left out. By default each input
shard with a selected sample gives one output shard; with shard_size, the selected rows
(in manifest order) are cut into shards of that many samples. Output names are
`<prefix>-000000.tar, ...` in manifest order: the same manifest and settings give the
same names and bytes.

`write_export_shard` reads the input shards of one plan, finds each selected sample by its
position (and checks its key), and writes its tar members unchanged: same names, same
bytes. A relabelled sample gets its .cls rewritten to the suggested label and its .json
the suggested `label` with the given label kept as `given_label`. The shard is written
atomically with a record under `_export_shards/`; a rerun skips shards whose record
matches.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from cleaner.reading import uri as uri_lib
from cleaner.reading.shard_writer import add_member, commit_shard, matching_record
from cleaner.reading.shards import RawSample, iter_tar_samples
from cleaner.reasons import stable_reason

RECORDS_DIR = "_export_shards"
SHARD_NAME = "{prefix}-{index:06d}.tar"
KEEP_LABEL = -1  # a row exported with its given label
EXPORTED_STATUS = "clean"
RELABELLED_STATUS = "noisy"


@dataclass
class ExportSelection:
    """The manifest rows an export writes, in manifest order, and how many of each kind."""

    shards: np.ndarray  # object [M]: recorded shard path of each selected row
    positions: np.ndarray  # int64 [M]
    keys: np.ndarray  # object [M]
    given: np.ndarray  # int64 [M]: the given label
    relabel_to: np.ndarray  # int64 [M]: the suggested label, or KEEP_LABEL
    counts: dict


def select_rows(manifest_uri: str, relabel: bool) -> ExportSelection:
    """The rows to export: clean ones, and with relabel the noisy ones with a suggestion."""
    fs, path = uri_lib.resolve(manifest_uri)
    columns = ["key", "shard", "shard_pos", "status", "label", "suggested_label"]
    with fs.open_input_file(path) as f:
        table = pq.read_table(f, columns=columns)
    status = np.asarray(table.column("status").to_pylist(), dtype=object)
    suggested = table.column("suggested_label").to_numpy()
    labels = table.column("label").to_numpy()
    clean = status == EXPORTED_STATUS
    noisy = status == RELABELLED_STATUS
    relabelled = noisy & (suggested >= 0) if relabel else np.zeros_like(noisy)
    chosen = np.flatnonzero(clean | relabelled)
    kinds, numbers = np.unique(status, return_counts=True)
    counts = {
        "manifest_rows": len(status),
        "by_status": {str(k): int(n) for k, n in zip(kinds, numbers, strict=True)},
        "clean": int(clean.sum()),
        "relabelled": int(relabelled.sum()),
        "expected": len(chosen),
    }
    return ExportSelection(
        shards=np.asarray(table.column("shard").to_pylist(), dtype=object)[chosen],
        positions=table.column("shard_pos").to_numpy()[chosen].astype(np.int64),
        keys=np.asarray(table.column("key").to_pylist(), dtype=object)[chosen],
        given=labels[chosen].astype(np.int64),
        relabel_to=np.where(relabelled, suggested, KEEP_LABEL)[chosen].astype(np.int64),
        counts=counts,
    )


def plan_export(
    selection: ExportSelection,
    locations: dict[str, str],
    prefix: str,
    shard_size: int | None,
) -> list[dict]:
    """One plan per output shard: its name and, per input shard it draws from, the rows.

    locations maps a recorded shard path to where the shard is read now.
    """
    n = len(selection.keys)
    if shard_size is None:
        starts = np.flatnonzero(np.r_[True, selection.shards[1:] != selection.shards[:-1]])
        bounds = list(zip(starts, np.r_[starts[1:], n], strict=True)) if n else []
    else:
        bounds = [(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]
    plans = []
    for index, (start, stop) in enumerate(bounds):
        rows = slice(start, stop)
        shards = selection.shards[rows]
        cuts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1]])
        segments = []
        for first, last in zip(cuts, np.r_[cuts[1:], len(shards)], strict=True):
            part = slice(start + first, start + last)
            recorded = str(selection.shards[start + first])
            segments.append(
                {
                    "recorded": recorded,
                    "shard": locations[recorded],
                    "positions": selection.positions[part].tolist(),
                    "keys": [str(k) for k in selection.keys[part]],
                    "given": selection.given[part].tolist(),
                    "relabel_to": selection.relabel_to[part].tolist(),
                }
            )
        plans.append({"name": SHARD_NAME.format(prefix=prefix, index=index), "segments": segments})
    return plans


def plan_fingerprint(plan: dict) -> str:
    """What decides a shard's bytes: its name and rows (not where the input is read now)."""
    content = [
        plan["name"],
        [
            [s["recorded"], s["positions"], s["keys"], s["given"], s["relabel_to"]]
            for s in plan["segments"]
        ],
    ]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]


def relabelled_members(sample: RawSample, given: int, label: int) -> list[tuple[str, bytes]]:
    """The sample's members with .cls set to `label` and the .json carrying `label` and
    `given_label` (a .json is added when the sample had none)."""
    members = []
    for ext, data in sample.members.items():
        name = sample.names.get(ext, f"{sample.key}.{ext}")
        if ext == "cls":
            data = str(label).encode()
        elif ext == "json":
            data = relabelled_json(data, given, label)
        members.append((name, data))
    if "json" not in sample.members:
        members.append((f"{sample.key}.json", relabelled_json(None, given, label)))
    return members


def relabelled_json(data: bytes | None, given: int, label: int) -> bytes:
    meta = json.loads(data.decode("utf-8")) if data else {}
    meta = meta if isinstance(meta, dict) else {"original": meta}
    meta.update(label=int(label), given_label=int(given))
    return json.dumps(meta, sort_keys=True).encode()


def _copy_segment(tar: tarfile.TarFile, segment: dict) -> tuple[int, list[dict]]:
    """Write one input shard's selected samples into `tar`: (written, problems)."""
    wanted = {int(p): i for i, p in enumerate(segment["positions"])}
    problems: list[dict] = []
    written = 0
    found: set[int] = set()
    try:
        fs, path = uri_lib.resolve(segment["shard"])
        with fs.open_input_stream(path, buffer_size=uri_lib.STREAM_BUFFER_BYTES) as stream:
            for position, sample in enumerate(iter_tar_samples(stream)):
                row = wanted.get(position)
                if row is None:
                    continue
                found.add(position)
                expected = segment["keys"][row]
                if sample.key != expected:
                    problems.append(
                        {
                            "key": expected,
                            "reason": f"the shard changed: position {position} holds "
                            f"{sample.key!r}",
                        }
                    )
                elif segment["relabel_to"][row] == KEEP_LABEL:
                    for ext, data in sample.members.items():
                        add_member(tar, sample.names.get(ext, f"{sample.key}.{ext}"), data)
                    written += 1
                else:
                    for name, data in relabelled_members(
                        sample, segment["given"][row], segment["relabel_to"][row]
                    ):
                        add_member(tar, name, data)
                    written += 1
                if len(found) == len(wanted):
                    break
    except (tarfile.TarError, OSError, EOFError) as err:
        reason = stable_reason(f"shard unreadable: {type(err).__name__}: {err}")
        problems.append({"key": None, "reason": reason})
    lost = [segment["keys"][i] for p, i in wanted.items() if p not in found]
    problems.extend({"key": key, "reason": "not in the shard"} for key in lost)
    return written, [{**p, "shard": segment["recorded"]} for p in problems]


def write_export_shard(plan: dict, output: str, resume: bool = True) -> dict:
    """Write one output shard (atomically) and its record; skip it when the record matches.

    Returns the record: name, fingerprint, expected, written, problems, seconds, skipped.
    """
    fingerprint = plan_fingerprint(plan)
    shard_uri = uri_lib.join(output, plan["name"])
    record_uri = uri_lib.join(output, RECORDS_DIR, plan["name"] + ".json")
    expected = sum(len(s["positions"]) for s in plan["segments"])
    record = matching_record(record_uri, fingerprint) if resume else None
    if record is not None and record.get("written") == expected and uri_lib.exists(shard_uri):
        return {**record, "skipped": True}
    started = time.perf_counter()
    buf = io.BytesIO()
    written = 0
    problems: list[dict] = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for segment in plan["segments"]:
            count, found = _copy_segment(tar, segment)
            written += count
            problems.extend(found)
    record = {
        "name": plan["name"],
        "fingerprint": fingerprint,
        "expected": expected,
        "written": written,
        "problems": problems,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return commit_shard(shard_uri, record_uri, buf.getvalue(), record)


def export_batch(batch: dict[str, np.ndarray], output: str, resume: bool) -> dict:
    """Ray Data UDF: plans (JSON) in, their records (JSON) out."""
    records = [
        json.dumps(write_export_shard(json.loads(str(p)), output, resume)) for p in batch["plan"]
    ]
    return {"record": np.array(records, dtype=object)}
