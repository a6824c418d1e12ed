"""The staging copy spread over threads (``copies.copy_parallel``): every byte lands where a
plain ``copy_`` would put it, whatever the mix of tensors, and the parts are balanced."""

import torch

from distckpt.copies import _split, copy_parallel


def _pairs():
    g = torch.Generator().manual_seed(0)
    srcs = [
        torch.randn(3_000_001, generator=g),  # big, odd length: cut across parts
        torch.randn(64, 64, generator=g).t(),  # not contiguous: copied whole
        torch.empty(0),
        torch.randint(0, 100, (5_000_000,), generator=g, dtype=torch.int16),
        torch.randn(7, generator=g).to(torch.bfloat16),
        torch.tensor(3.5),  # 0-d
        torch.randn(2_000_000, generator=g, dtype=torch.float64),
    ]
    return [(torch.full_like(s, float("nan")) if s.is_floating_point() else torch.zeros_like(s), s) for s in srcs]


def test_every_byte_lands_in_place_with_several_threads():
    for threads in (1, 2, 3, 4):
        pairs = _pairs()
        copy_parallel(pairs, threads=threads)
        assert all(torch.equal(d, s) for d, s in pairs), threads


def test_parts_are_balanced_and_cover_everything_in_order():
    pairs = _pairs()
    total = sum(d.nbytes for d, _ in pairs)
    per = -(-total // 3)
    parts = _split(pairs, per)
    assert len(parts) == 3
    sizes = [sum(d.nbytes for d, _ in part) for part in parts]
    assert sum(sizes) == total
    assert max(sizes) <= per + 64 * 64 * 4  # at most one whole (uncut) tensor over
