"""An HTTP proxy in front of an S3 endpoint that counts what the endpoint served.

Point s3fs at ``S3Proxy(endpoint).endpoint`` instead of the endpoint itself: every request is
forwarded unchanged, and ``requests`` (per kind: GET, LIST, HEAD, PUT, DELETE) and
``served`` (response body bytes per kind) say what a restore or a save really asked of
the store - measured outside distckpt, as an S3 bill would. The tests' fault injection
(``tests/support/faults.py``) is a subclass.
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class S3Proxy:
    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.target = (parts.hostname, parts.port)
        self.requests: Counter[str] = Counter()
        self.served: Counter[str] = Counter()
        self.most_at_once: Counter[str] = Counter()  #: the most requests of a kind in flight together
        self._in_flight: Counter[str] = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.served.clear()
            self.most_at_once.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def intercept(self, h: BaseHTTPRequestHandler) -> bool:
        """Answer ``h`` here instead of forwarding it (subclasses: injected faults)."""
        return False

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        kind = _kind(h.command, h.path)
        with self._lock:
            self._in_flight[kind] += 1
            self.most_at_once[kind] = max(self.most_at_once[kind], self._in_flight[kind])
        try:
            self._forward(h, kind)
        finally:
            with self._lock:
                self._in_flight[kind] -= 1

    def _forward(self, h: BaseHTTPRequestHandler, kind: str) -> None:
        body = _read_body(h)
        if self.intercept(h):
            return
        conn = http.client.HTTPConnection(*self.target, timeout=60)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("transfer-encoding",)}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        conn.request(h.command, h.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        out = {
            k: v for k, v in resp.getheaders() if k.lower() not in ("transfer-encoding", "connection", "content-length")
        }
        respond(h, resp.status, out, data, head=h.command == "HEAD", length=resp.getheader("Content-Length"))
        conn.close()
        with self._lock:
            self.requests[kind] += 1
            self.served[kind] += 0 if h.command == "HEAD" else len(data)


def _kind(method: str, path: str) -> str:
    query = urlsplit(path).query
    if method == "GET" and ("list-type" in query or "prefix=" in query or urlsplit(path).path.count("/") <= 1):
        return "LIST"
    return method


def _read_body(h: BaseHTTPRequestHandler) -> bytes | None:
    if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(h.rfile.readline().strip().split(b";")[0], 16)
            if size == 0:
                h.rfile.readline()
                break
            chunks.append(h.rfile.read(size))
            h.rfile.readline()
        return b"".join(chunks)
    length = int(h.headers.get("Content-Length", 0) or 0)
    return h.rfile.read(length) if length else (b"" if h.command in ("PUT", "POST") else None)


def respond(
    h: BaseHTTPRequestHandler, status: int, headers: dict, data: bytes, head: bool = False, length: str | None = None
) -> None:
    h.send_response(status)
    for k, v in headers.items():
        h.send_header(k, v)
    h.send_header("Content-Length", length if head and length is not None else str(len(data)))
    h.end_headers()
    if not head:
        h.wfile.write(data)
