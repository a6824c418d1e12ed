"""The benchmarks behind ``benchmarks/`` and ``distckpt bench``: JSON and a PNG chart out.

``save`` (the save/restore benchmark against torch.save and DCP; its contenders and the
machine's ceilings are in ``methods``) and ``storage`` (throughput per storage backend).
They use the public API (plus one wait for the staging pool's reserve); matplotlib and psutil come with ``distckpt[bench]``.
"""


def main(argv: list[str] | None = None) -> int:
    """``distckpt.bench.main``: the save benchmark (kept for scripts that call it)."""
    from .save import main as save_main

    return save_main(argv)
