"""Every benchmark runs each contender in a fresh process: its memory, threads and
allocator state are its own, and one method's leftovers never slow the next."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


def run_child(module: str, name: str, out_dir: str, argv: list[str], timeout: float) -> dict[str, Any]:
    """``python -m <module> --child <name> --json <file> <argv>``: the JSON the child wrote,
    or ``{"error": [why]}`` (its last line of stderr, or the timeout)."""
    out_json = os.path.join(out_dir, f".{name.replace(' ', '_')}.json")
    cmd = [sys.executable, "-m", module, "--child", name, "--json", out_json, *argv]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        ok = proc.returncode == 0 and os.path.exists(out_json)
        data = json.load(open(out_json)) if ok else {"error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    except subprocess.TimeoutExpired:
        data = {"error": [f"timed out after {timeout}s"]}
    if os.path.exists(out_json):
        os.remove(out_json)
    if "error" in data:
        print(f"  {name} failed: {data['error'][0]}", flush=True)
    return data
