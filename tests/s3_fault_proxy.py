"""A fault-injecting HTTP proxy for an S3 endpoint (stdlib only), for the storage fault tests.

Clients are pointed at the proxy as their S3 endpoint; it forwards every request to the real
endpoint (moto) with the request line, the end-to-end headers in their order and spelling
(Host included: SigV4 signs the host the client connected to) and the body bytes unchanged;
only hop-by-hop headers (Connection, Expect, Transfer-Encoding, ...) are not passed on, and
a chunked body is forwarded with its length instead. moto does not verify signatures by
default, and one that does would still accept these: what was signed arrives unchanged.

With a seeded RNG, for a fraction of requests it instead answers 500 InternalError or 503
SlowDown with an S3-style XML body, or closes the connection without any response (after
reading the request); independently it can delay a fraction of requests. Every injected
fault is counted, so a test can assert that faults actually happened.

Faults are injected before the request reaches the endpoint, so a fault never leaves a
half-applied change behind (a lost response to an applied request is a different failure,
not simulated here).
"""

from __future__ import annotations

import http.client
import random
import socket
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

# not forwarded: they describe one hop (client -> proxy or proxy -> endpoint), not the request
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "expect",
})
ERRORS = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}
FAULT_KINDS = ("http_500", "http_503", "dropped")


def _error_body(code: str, message: str, path: str, request_id: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{path.split('?', 1)[0]}</Resource><RequestId>{request_id}</RequestId>"
        "</Error>"
    ).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDKs expect
    server: _ProxyServer

    def setup(self) -> None:
        super().setup()
        self.upstream: http.client.HTTPConnection | None = None
        self.server.track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, add=False)
            if self.upstream is not None:
                self.upstream.close()

    def log_message(self, *args) -> None:  # quiet test output
        pass

    def do_GET(self) -> None:
        self._proxy()

    do_PUT = do_POST = do_HEAD = do_DELETE = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _proxy(self) -> None:
        body = self._read_body()  # always consumed: the connection stays in a known state
        fault, delay = self.server.proxy.decide(self.command, self.path)
        if delay:
            time.sleep(delay)
        if fault == "dropped":
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if fault in ("http_500", "http_503"):
            self._send_error_xml(int(fault[-3:]))
            return
        try:
            status, reason, headers, payload = self._forward(body)
        except (OSError, http.client.HTTPException):
            self.server.proxy.count("upstream_errors")
            self.close_connection = True
            self.send_response_only(502, "Bad Gateway")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.server.proxy.count("forwarded")
        self.send_response_only(status, reason)
        chunked = False
        for name, value in headers:
            if name.lower() == "transfer-encoding":
                chunked = True
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        if chunked:  # the body was de-chunked on the way in: frame it by length
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        # once more on a fresh connection: a kept-alive one to moto may have gone stale (a
        # request moto did receive would then be sent twice; acceptable in a test proxy)
        for attempt in range(2):
            if self.upstream is None:
                self.upstream = http.client.HTTPConnection(*self.server.proxy.upstream,
                                                           timeout=60)
            try:
                conn = self.upstream
                conn.putrequest(self.command, self.path, skip_host=True,
                                skip_accept_encoding=True)
                for name, value in self.headers.items():  # order and spelling kept
                    if name.lower() not in HOP_BY_HOP:
                        conn.putheader(name, value)
                if "Transfer-Encoding" in self.headers:
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body or None)
                response = conn.getresponse()
                payload = response.read()
                if response.will_close:
                    conn.close()
                    self.upstream = None
                return response.status, response.reason, response.getheaders(), payload
            except (OSError, http.client.HTTPException):
                self.upstream.close()
                self.upstream = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _send_error_xml(self, status: int) -> None:
        code, message = ERRORS[status]
        request_id = f"FAULT{self.server.proxy.counts()['requests']:08d}"
        payload = _error_body(code, message, self.path, request_id)
        self.send_response_only(status, "Internal Server Error" if status == 500
                                else "Service Unavailable")
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", request_id)
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # Ray Data tasks and pyarrow's I/O pool open connections in bursts

    def __init__(self, address, proxy: S3FaultProxy):
        super().__init__(address, _Handler)
        self.proxy = proxy
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def handle_error(self, request, client_address) -> None:
        """A client that hangs up (a timeout on its side, a process ending) is no error."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            self.proxy.count("client_disconnects")
            return
        super().handle_error(request, client_address)

    def track(self, sock: socket.socket, add: bool) -> None:
        with self._open_lock:
            (self._open.add if add else self._open.discard)(sock)

    def close_connections(self) -> None:
        with self._open_lock:
            for sock in list(self._open):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class S3FaultProxy:
    """`fault_rate` of requests fail (500 / 503 / dropped connection, equally likely among
    `faults`); independently, `latency_rate` of requests wait `latency_s` (a (min, max)
    range) first. Decisions come from one `random.Random(seed)` in arrival order.

    With `fail_first=N` (N > 0) the schedule is deterministic instead: the first N arrivals
    of every distinct request (method and target, query included) fail and later repeats
    (the client's retries) pass, so every request needs exactly N retries. Settings may be
    changed while the proxy runs."""

    def __init__(self, upstream_url: str, *, fault_rate: float = 0.1, latency_rate: float = 0.1,
                 latency_s: tuple[float, float] = (0.05, 0.3), seed: int = 0,
                 faults: tuple[str, ...] = FAULT_KINDS, fail_first: int = 0):
        parsed = urlparse(upstream_url)
        if parsed.scheme != "http" or not parsed.hostname or not parsed.port:
            raise ValueError(f"upstream must be http://host:port, got {upstream_url!r}")
        unknown = set(faults) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; use {FAULT_KINDS}")
        self.upstream = (parsed.hostname, parsed.port)
        self.fault_rate, self.latency_rate, self.latency_s = fault_rate, latency_rate, latency_s
        self.faults = tuple(faults)
        self.fail_first = fail_first
        self._arrivals: Counter[tuple[str, str]] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._server = _ProxyServer(("127.0.0.1", 0), self)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = None

    def decide(self, method: str, target: str) -> tuple[str | None, float]:
        """(fault kind or None, seconds of added latency) for the next request; counted."""
        with self._lock:
            self._counts["requests"] += 1
            if self.fail_first > 0:
                self._arrivals[(method, target)] += 1
                hit = self._arrivals[(method, target)] <= self.fail_first
            else:
                hit = self._rng.random() < self.fault_rate
            fault = None
            if self.faults and hit:
                fault = self._rng.choice(self.faults)
                self._counts[fault] += 1
            delay = 0.0
            if self._rng.random() < self.latency_rate:
                delay = self._rng.uniform(*self.latency_s)
                self._counts["delayed"] += 1
            return fault, delay

    def count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def counts(self) -> dict[str, int]:
        """A snapshot: requests, forwarded, http_500, http_503, dropped, delayed,
        upstream_errors (missing keys are 0)."""
        with self._lock:
            snapshot = {key: 0 for key in ("requests", "forwarded", "delayed",
                                           "upstream_errors", *FAULT_KINDS)}
            snapshot.update(self._counts)
            return snapshot

    def injected(self) -> int:
        """Failures injected so far (500s, 503s and dropped connections; not delays)."""
        counts = self.counts()
        return sum(counts[kind] for kind in FAULT_KINDS)

    def start(self) -> S3FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1}, daemon=True,
                                        name="s3-fault-proxy")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
