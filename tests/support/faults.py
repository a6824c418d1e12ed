"""Real faults for tests: an HTTP proxy in front of the S3 server that fails or drops requests,
a small filesystem that really fills up, and a step file doctored on disk (``doctor``).

``FaultProxy`` (an ``S3Proxy``) forwards every request to the real S3 server (moto) unchanged, except the
ones a rule selects: those get a real S3 error response (``500 InternalError``,
``503 SlowDown``) or have their connection dropped, exactly what s3fs/botocore see when an
S3 endpoint misbehaves or goes away; or are answered late (``slow``).
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler

from distckpt.bench.s3proxy import S3Proxy, respond


@dataclass
class Rule:
    match: str  # substring of the request path
    methods: tuple[str, ...] = ("PUT", "POST")
    status: int = 500  # 0: drop the connection without answering
    remaining: int | None = None  # fail this many times, then pass (None: always)
    delay: float = 0.0  # > 0: forwarded unchanged after this many seconds (a slow server)


class FaultProxy(S3Proxy):
    """Forwards (and counts, see ``S3Proxy``) every request, except those a rule selects."""

    def __init__(self, target: str) -> None:
        self.rules: list[Rule] = []
        self.injected = 0
        super().__init__(target)

    def fail(
        self, match: str, *, methods: tuple[str, ...] = ("PUT", "POST"), status: int = 500, times: int | None = None
    ) -> None:
        with self._lock:
            self.rules.append(Rule(match, methods, status, times))

    def slow(self, match: str, seconds: float, *, methods: tuple[str, ...] = ("GET", "HEAD")) -> None:
        """Requests that ``match`` are answered as usual, ``seconds`` late."""
        with self._lock:
            self.rules.append(Rule(match, methods, delay=seconds))

    def heal(self) -> None:
        with self._lock:
            self.rules.clear()

    def _pick(self, method: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if method in rule.methods and rule.match in path and (rule.remaining is None or rule.remaining > 0):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                    self.injected += 1
                    return rule
        return None

    def intercept(self, h: BaseHTTPRequestHandler) -> bool:
        rule = self._pick(h.command, h.path)
        if rule is not None and rule.delay:
            time.sleep(rule.delay)
            return False
        if rule is not None and rule.status == 0:
            h.close_connection = True
            h.connection.close()  # the server "went away" mid-request
            return True
        if rule is not None:
            code = "SlowDown" if rule.status == 503 else "InternalError"
            payload = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
            respond(h, rule.status, {"Content-Type": "application/xml"}, payload)
            return True
        return False


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


def doctor(stepdir: str, name: str, data: bytes) -> None:
    """Replace a committed step's file and fix up its manifest to match, as an attacker would:
    only what distckpt does with the file's content stands in the way."""
    import json

    from distckpt.layout.manifest import checksum_bytes

    with open(os.path.join(stepdir, name), "wb") as f:
        f.write(data)
    man_path = os.path.join(stepdir, "manifest.json")
    with open(man_path) as f:
        man = json.load(f)
    man["files"][name].update(size=len(data), checksum=checksum_bytes(data))
    with open(man_path, "w") as f:
        json.dump(man, f)
