"""A loopback HTTP proxy in front of an S3 endpoint that injects faults, for tests.

    proxy = S3FaultProxy("http://127.0.0.1:<moto port>").start()
    proxy.set_faults(each_once=True, fail_rate=0.1, reset_rate=0.02)  # transient faults
    proxy.set_faults(deny="all")     # 403 AccessDenied for every request
    proxy.set_faults(deny="writes")  # 403 for PUT / POST / DELETE: read-only credentials
    os.environ["AWS_ENDPOINT_URL"] = proxy.url
    ...
    proxy.injected  # Counter({"503": 40, "500": 39, "reset": 39, ...})
    proxy.faults    # [(method, path, fault), ...] of every injected fault

Every request is forwarded unchanged (method, path, headers, body) to the upstream
endpoint, except the ones chosen for a fault: those are answered with an S3 error
document (503 SlowDown, 500 InternalError) or by resetting the connection without an
answer, and never reach upstream. Transient faults are chosen per request: the first
`fail_first` requests, the first request of each kind (method, path, names of the query
parameters) when `each_once`, so that every kind of call the client makes meets a fault and
must retry it, then each request with probability `fail_rate` (and a reset with
`reset_rate`), from a seeded generator; they cycle through 503, 500 and a reset.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

S3_ERRORS = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
    403: ("AccessDenied", "Access Denied"),
}
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
}


def error_document(code: int, resource: str) -> bytes:
    name, message = S3_ERRORS[code]
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{name}</Code><Message>{message}</Message>"
        f"<Resource>{resource}</Resource><RequestId>fault-proxy</RequestId></Error>"
    ).encode()


class S3FaultProxy:
    """A threaded HTTP proxy on 127.0.0.1 that forwards to `upstream` and injects faults."""

    def __init__(self, upstream: str, seed: int = 0):
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self.fail_first = 0
        self.fail_rate = 0.0
        self.reset_rate = 0.0
        self.each_once = False
        self.deny: str | None = None
        self._seen: set[tuple] = set()
        self.faults: list[tuple[str, str, str]] = []
        self.requests = 0
        self.forwarded = 0
        self.injected: Counter[str] = Counter()
        self._alternate = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self) -> None:
                body = self._read_body()
                fault = proxy._choose_fault(self.command, self.path)
                if fault == "reset":
                    # SO_LINGER 0: close sends a TCP RST, the client sees "connection reset".
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault is not None:
                    self._answer(
                        int(fault),
                        {"Content-Type": "application/xml"},
                        error_document(int(fault), self.path),
                    )
                    return
                status, headers, payload = proxy._forward(
                    self.command, self.path, self.headers, body
                )
                self._answer(status, headers, payload)

            def _answer(self, status: int, headers: dict[str, str], payload: bytes) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                if self.command == "HEAD":
                    length = headers.get("Content-Length") or headers.get("content-length")
                    self.send_header("Content-Length", str(length or 0))
                    self.end_headers()
                    return
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> S3FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def set_faults(
        self,
        *,
        fail_first: int = 0,
        fail_rate: float = 0.0,
        reset_rate: float = 0.0,
        each_once: bool = False,
        deny: str | None = None,
    ) -> None:
        """Set the faults to inject from now on and zero the counters."""
        if deny not in (None, "all", "writes"):
            raise ValueError(f"deny must be None, 'all' or 'writes', not {deny!r}")
        with self._lock:
            self.fail_first, self.fail_rate, self.reset_rate = fail_first, fail_rate, reset_rate
            self.each_once, self.deny = each_once, deny
            self._seen = set()
            self.faults = []
            self.requests = self.forwarded = 0
            self.injected = Counter()

    @property
    def injected_total(self) -> int:
        with self._lock:
            return sum(self.injected.values())

    def _choose_fault(self, method: str, path: str) -> str | None:
        with self._lock:
            self.requests += 1
            # The kind of a request: method, path and query parameter names, not values (a
            # retried multipart upload has a new uploadId but is the same kind of call).
            base, _, query = path.partition("?")
            kind = (method, base, tuple(sorted(q.split("=")[0] for q in query.split("&") if q)))
            first_of_its_kind = kind not in self._seen
            self._seen.add(kind)
            if self.deny == "all" or (
                self.deny == "writes" and method in ("PUT", "POST", "DELETE")
            ):
                fault = "403"
            elif (
                self.fail_first > 0
                or (self.each_once and first_of_its_kind)
                or self._rng.random() < self.fail_rate
            ):
                self.fail_first = max(0, self.fail_first - 1)
                fault = ("503", "500", "reset")[self._alternate % 3]
                self._alternate += 1
            elif self._rng.random() < self.reset_rate:
                fault = "reset"
            else:
                self.forwarded += 1
                return None
            self.injected[fault] += 1
            self.faults.append((method, path, fault))
            return fault

    def _forward(self, method: str, path: str, headers, body: bytes):
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=60)
        try:
            sent = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
            sent.pop("Content-Length", None)
            sent.pop("content-length", None)
            if body or method in ("PUT", "POST"):
                sent["Content-Length"] = str(len(body))
            conn.request(method, path, body=body or None, headers=sent)
            response = conn.getresponse()
            payload = response.read()
            return response.status, dict(response.getheaders()), payload
        finally:
            conn.close()
