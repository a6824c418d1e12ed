"""Real faults for tests: an HTTP proxy in front of the S3 server that fails or drops requests,
and a small filesystem that really fills up.

``FaultProxy`` forwards every request to the real S3 server (moto) unchanged, except the
ones a rule selects: those get a real S3 error response (``500 InternalError``,
``503 SlowDown``) or have their connection dropped, exactly what s3fs/botocore see when an
S3 endpoint misbehaves or goes away.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass
class Rule:
    match: str  # substring of the request path
    methods: tuple[str, ...] = ("PUT", "POST")
    status: int = 500  # 0: drop the connection without answering
    remaining: int | None = None  # fail this many times, then pass (None: always)


class FaultProxy:
    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.target = (parts.hostname, parts.port)
        self.rules: list[Rule] = []
        self.injected = 0
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

    def fail(
        self, match: str, *, methods: tuple[str, ...] = ("PUT", "POST"), status: int = 500, times: int | None = None
    ) -> None:
        with self._lock:
            self.rules.append(Rule(match, methods, status, times))

    def heal(self) -> None:
        with self._lock:
            self.rules.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _pick(self, method: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if method in rule.methods and rule.match in path and (rule.remaining is None or rule.remaining > 0):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                    self.injected += 1
                    return rule
        return None

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        body = _read_body(h)
        rule = self._pick(h.command, h.path)
        if rule is not None and rule.status == 0:
            h.close_connection = True
            h.connection.close()  # the server "went away" mid-request
            return
        if rule is not None:
            code = "SlowDown" if rule.status == 503 else "InternalError"
            payload = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
            _respond(h, rule.status, {"Content-Type": "application/xml"}, payload)
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
        _respond(h, resp.status, out, data, head=h.command == "HEAD", length=resp.getheader("Content-Length"))
        conn.close()


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


def _respond(
    h: BaseHTTPRequestHandler, status: int, headers: dict, data: bytes, head: bool = False, length: str | None = None
) -> None:
    h.send_response(status)
    for k, v in headers.items():
        h.send_header(k, v)
    h.send_header("Content-Length", length if head and length is not None else str(len(data)))
    h.end_headers()
    if not head:
        h.wfile.write(data)


class SmallDisk:
    """A tmpfs of ``size_mb`` mounted at ``path``: writes beyond it fail with a real ENOSPC."""

    def __init__(self, path: str, size_mb: int) -> None:
        self.path = path
        os.makedirs(path, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", f"distckpt-test-{uuid.uuid4().hex[:6]}", path],
            check=True,
            capture_output=True,
        )

    def close(self) -> None:
        subprocess.run(["umount", "-l", self.path], check=False, capture_output=True)
