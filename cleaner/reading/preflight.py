"""Checks a job runs before any compute, so that a wrong URI or class spec fails in seconds.

- Every s3:// location a job reads (shards, class spec, checkpoints, a manifest) is looked
  up, and every location it writes gets a small probe object written and deleted again.
  Permanent problems end the job with a PreflightError naming the URI and the problem:
  the S3 endpoint cannot be reached, the bucket does not exist, access is denied, the
  credentials are rejected, the object or prefix is not there, a folder is not writable.
  Transient ones (HTTP 5xx, throttling, a dropped connection) are retried a few times with
  backoff here; during the job the AWS SDK's standard retry strategy retries every request
  (cleaner.reading.uri.s3_filesystem).
- The labels of the first samples are compared with the class spec: when more than a
  small fraction of them fall outside it (integers >= the class count, names the spec does
  not list), the spec does not describe the data and the job stops. A few stray labels
  stay per-sample "label out of range" failures in the manifest.

PreflightError is a ConfigError: the job entry points print it as one line and exit 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tarfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pyarrow.fs as pafs
from braceexpand import braceexpand

from cleaner.config import ConfigError
from cleaner.reading import uri as uri_lib

# Tries of one preflight S3 call for errors that may pass (each try is a single request).
NETWORK_ATTEMPTS = 4  # no connection (refused, DNS, timeout): ~2 s in all, then "cannot reach"
TRANSIENT_ATTEMPTS = 8  # HTTP 5xx, throttling, a connection reset mid-request: ~16 s in all
BACKOFF_S = 0.25
BACKOFF_MAX_S = 4.0
CONNECT_TIMEOUT_S = 5.0
# The class spec does not match the data when more than this fraction of the peeked labels
# (and at least 2) fall outside it.
SPEC_MISMATCH_FRACTION = 0.02
PEEK_SAMPLES = 500
PEEK_SHARDS = 2

PROBE_NAME = "_clipcleaner_preflight"
_AWS_ERROR = re.compile(
    r"AWS Error (?P<code>[A-Z_]+)(?: \(HTTP status (?P<status>\d+)\))? during "
    r"(?P<op>\w+) operation: (?P<detail>.*)",
    re.DOTALL,
)
_CURL_CODE = re.compile(r"curlCode: (\d+)")
_UNREACHABLE_CURL = {5, 6, 7, 28}  # cannot resolve proxy / host, cannot connect, timed out
_CREDENTIAL_CODES = {
    "INVALID_ACCESS_KEY_ID",
    "SIGNATURE_DOES_NOT_MATCH",
    "EXPIRED_TOKEN",
    "INVALID_CLIENT_TOKEN_ID",
    "MISSING_AUTHENTICATION_TOKEN",
    "INVALID_SIGNATURE",
}
_TRANSIENT_CODES = {
    "INTERNAL_FAILURE",
    "SERVICE_UNAVAILABLE",
    "SLOW_DOWN",
    "THROTTLING",
    "REQUEST_TIMEOUT",
    "REQUEST_EXPIRED",
}


class PreflightError(ConfigError):
    """A job's inputs or outputs cannot work: raised before any compute, naming the URI."""


def endpoint_description() -> str:
    """AWS_ENDPOINT_URL(_S3), or AWS's own endpoint for the configured region."""
    endpoint = uri_lib.s3_endpoint()
    if endpoint:
        return endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return f"https://s3.{region}.amazonaws.com" if region else "https://s3.amazonaws.com"


@dataclass(frozen=True)
class S3Failure:
    kind: str  # network, transient, no_bucket, denied, credentials, other
    code: str
    operation: str
    detail: str


def classify(err: OSError) -> S3Failure:
    """What kind of problem a pyarrow S3 error is, from the AWS error it carries."""
    text = str(err)
    match = _AWS_ERROR.search(text)
    if match is None:
        return S3Failure("other", "", "", text)
    code, status = match["code"], int(match["status"] or 0)
    detail = " ".join(match["detail"].split())
    if code == "NETWORK_CONNECTION":
        # No connection at all (DNS, refused, timed out) vs one dropped mid-request.
        curl = _CURL_CODE.search(detail)
        kind = "network" if curl is None or int(curl[1]) in _UNREACHABLE_CURL else "transient"
    elif code == "NO_SUCH_BUCKET":
        kind = "no_bucket"
    elif code == "ACCESS_DENIED" or status == 403 or "AccessDenied" in detail:
        kind = "denied"
    elif code in _CREDENTIAL_CODES or status == 401:
        kind = "credentials"
    elif code in _TRANSIENT_CODES or status in (429, 500, 502, 503, 504):
        kind = "transient"
    else:
        kind = "other"
    return S3Failure(kind, code, match["op"], detail)


def _failure_message(uri: str, what: str, failure: S3Failure, attempts: int) -> str:
    endpoint = endpoint_description()
    bucket = _bucket_of(uri)
    if failure.kind == "network":
        return (
            f"cannot reach S3 endpoint {endpoint} (needed for {uri}): {failure.detail} "
            f"[{attempts} tries]"
        )
    if failure.kind == "no_bucket":
        return f"{uri}: bucket {bucket!r} does not exist (S3 endpoint {endpoint})"
    if failure.kind == "denied":
        return (
            f"{uri}: access denied ({what}, {failure.operation} refused by {endpoint}); "
            f"the job's credentials or IAM role must allow it"
        )
    if failure.kind == "credentials":
        return f"{uri}: S3 rejected the credentials ({failure.code}: {failure.detail})"
    if failure.kind == "transient":
        return (
            f"{uri}: S3 endpoint {endpoint} kept failing ({what}: {failure.code} "
            f"{failure.detail}) after {attempts} tries"
        )
    return f"{uri}: {what} failed: {failure.detail}"


def _bucket_of(uri: str) -> str:
    return uri[len("s3://") :].split("/", 1)[0]


def _s3_call(op: Callable, uri: str, what: str):
    """Run one S3 call: transient and network errors are retried briefly, the rest raise."""
    delay = BACKOFF_S
    attempt = 0
    while True:
        attempt += 1
        try:
            return op()
        except OSError as err:
            failure = classify(err)
            limit = {"network": NETWORK_ATTEMPTS, "transient": TRANSIENT_ATTEMPTS}.get(
                failure.kind, 1
            )
            if attempt >= limit:
                raise PreflightError(_failure_message(uri, what, failure, attempt)) from None
            time.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)


def _probe_filesystem() -> pafs.S3FileSystem:
    # One request per call, so that _s3_call decides what is retried and for how long.
    return uri_lib.s3_filesystem(max_attempts=1, connect_timeout=CONNECT_TIMEOUT_S)


def check_s3_readable(uri: str) -> None:
    """An s3:// object or prefix exists and can be read (a brace pattern: its first file)."""
    if "{" in uri:
        uri = next(iter(braceexpand(uri)))
    fs = _probe_filesystem()
    path = uri[len("s3://") :].rstrip("/")
    bucket = _bucket_of(uri)
    if not path:
        raise PreflightError(f"{uri}: no bucket named")
    info = _s3_call(lambda: fs.get_file_info(path), uri, "reading")
    if info.type != pafs.FileType.NotFound:
        return
    if path != bucket:
        found = _s3_call(lambda: fs.get_file_info(bucket), uri, "looking up the bucket")
        if found.type != pafs.FileType.NotFound:
            raise PreflightError(f"{uri}: not found (no such object or prefix in {bucket!r})")
    raise PreflightError(
        f"{uri}: bucket {bucket!r} does not exist (S3 endpoint {endpoint_description()})"
    )


def check_writable(uri: str) -> None:
    """A folder or s3:// prefix accepts a new file: a probe is written there and deleted."""
    probe = uri_lib.join(uri, f"{PROBE_NAME}-{uuid.uuid4().hex[:12]}")
    if not uri_lib.is_s3(uri):
        fs, path = uri_lib.resolve(probe)
        try:
            uri_lib.makedirs(uri)
            with fs.open_output_stream(path) as f:
                f.write(b"ok")
            fs.delete_file(path)
        except OSError as err:
            raise PreflightError(f"{uri}: output folder is not writable: {err}") from None
        return
    if not uri[len("s3://") :].strip("/"):
        raise PreflightError(f"{uri}: no bucket named")
    fs = _probe_filesystem()
    path = probe[len("s3://") :]

    def write() -> None:
        with fs.open_output_stream(path) as f:
            f.write(b"ok")

    _s3_call(write, uri, "writing")
    with contextlib.suppress(PreflightError):  # a role that may write but not delete: it stays
        _s3_call(lambda: fs.delete_file(path), uri, "deleting the write probe")


def _input_locations(items: Iterable[str | list[str] | None]) -> list[str]:
    found: list[str] = []
    for item in items:
        if item is None:
            continue
        found.extend([item] if isinstance(item, str) else item)
    return found


def check_io(inputs: Iterable[str | list[str] | None], outputs: Iterable[str | None] = ()) -> None:
    """Read access to every s3:// input, write access to every output; PreflightError if not.

    Local inputs are left to the readers (they name missing files themselves).
    """
    for location in _input_locations(inputs):
        if uri_lib.is_s3(location):
            check_s3_readable(location)
    for location in outputs:
        if location is not None:
            check_writable(location)


def _remote(location: str | None) -> str | None:
    return location if location is not None and uri_lib.is_s3(location) else None


def check_clean_job_io(cfg) -> None:
    """Preflight of jobs.clean: shards, class spec and checkpoints readable, output writable."""
    check_io(
        [
            cfg.data.input,
            cfg.data.test_input,
            _remote(cfg.data.classes),
            _remote(cfg.model.pretrained),
            _remote(cfg.model.config_file),
        ],
        [cfg.output],
    )


def check_train_job_io(cfg) -> None:
    """Preflight of jobs.train: shards, manifest, class spec, weights readable, storage writable."""
    check_io(
        [
            cfg.data.input,
            cfg.data.manifest,
            cfg.data.test_input,
            _remote(cfg.data.classes),
            _remote(cfg.network.pretrained),
        ],
        [cfg.run.storage],
    )


# ------------------------------------------------------------------------------------------
# Labels vs the class spec
# ------------------------------------------------------------------------------------------


@dataclass
class LabelPeek:
    """What the first samples' labels say about the class spec."""

    samples: int = 0
    labelled: int = 0
    outside: int = 0
    max_label: int | None = None
    examples: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)


def _raw_label(members: dict[str, bytes]):
    if "cls" in members:
        try:
            return members["cls"].decode("utf-8").strip()
        except UnicodeDecodeError:
            return None
    if "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        if isinstance(meta, dict):
            return meta.get("label")
    return None


def _label_outside(value, names: list[str]) -> tuple[bool, int | None]:
    """(the label is not in the spec, its integer value if it is one). Negatives and
    malformed values are not the spec's fault: they stay per-sample failures."""
    if isinstance(value, bool) or value is None:
        return False, None
    if isinstance(value, int):
        return value >= len(names), value
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            number = int(text)
            return number >= len(names), number
        return bool(text) and text not in names, None
    return False, None


def peek_labels(
    shards: list[str],
    class_names: list[str],
    max_samples: int = PEEK_SAMPLES,
    max_shards: int = PEEK_SHARDS,
) -> LabelPeek:
    """Labels of up to `max_samples` samples from the first `max_shards` readable shards."""
    from cleaner.reading.shards import iter_tar_samples

    peek = LabelPeek()
    for shard in shards:
        if peek.samples >= max_samples or len(peek.shards) >= max_shards:
            break
        try:
            fs, path = uri_lib.resolve(shard)
            with fs.open_input_stream(path, buffer_size=uri_lib.STREAM_BUFFER_BYTES) as stream:
                peek.shards.append(shard)
                for sample in iter_tar_samples(stream):
                    peek.samples += 1
                    value = _raw_label(sample.members)
                    if value is not None:
                        peek.labelled += 1
                        outside, number = _label_outside(value, class_names)
                        if number is not None:
                            peek.max_label = (
                                number if peek.max_label is None else max(peek.max_label, number)
                            )
                        if outside:
                            peek.outside += 1
                            if len(peek.examples) < 5 and repr(value) not in peek.examples:
                                peek.examples.append(repr(value))
                    if peek.samples >= max_samples:
                        break
        except (tarfile.TarError, OSError, EOFError):
            continue  # unreadable and truncated shards become failure rows in the job
    return peek


def check_labels_match_spec(
    shards: list[str], class_names: list[str], spec_name: str = "the class spec"
) -> LabelPeek:
    """PreflightError when the first samples' labels show the class spec is not the data's."""
    peek = peek_labels(shards, class_names)
    limit = max(1, int(SPEC_MISMATCH_FRACTION * peek.labelled))
    if peek.outside > limit:
        reach = f"; integer labels reach {peek.max_label}" if peek.max_label is not None else ""
        where = ", ".join(uri_lib.basename(s) for s in peek.shards)
        raise PreflightError(
            f"class spec mismatch: {spec_name} has {len(class_names)} classes "
            f"(labels 0..{len(class_names) - 1} or their names), but {peek.outside} of the "
            f"first {peek.labelled} labels in {where} are outside it (e.g. "
            f"{', '.join(peek.examples)}){reach}. Give data.classes a spec listing every "
            f"class of the data, in label order."
        )
    return peek
