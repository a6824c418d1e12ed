"""The ``distckpt`` logger. Records carry the rank (``record.rank``) and say it in the text."""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger("distckpt")


def _env_rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:  # pragma: no cover - torch missing or half-initialised
        pass
    return int(os.environ.get("RANK", "0") or 0)


class _RankAdapter(logging.LoggerAdapter):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        rank = _env_rank()
        kwargs.setdefault("extra", {})["rank"] = rank
        return f"[rank {rank}] {msg}", kwargs


log = _RankAdapter(logger, {})
