"""Who reads what in a restore (``SharedReader``'s schedule), as a pure function: shared
storage reads each file once and broadcasts it; node memory is read by every rank whose
node holds the file, and only the ranks whose node lacks it receive it, point to point."""

from distckpt.dcp.read_schedule import CHUNK, schedule

MB = 1 << 20


def _who_gets(own, chunks, world):
    got = {r: set(own[r]) for r in range(world)}
    for c in chunks:
        for r in c.to if c.to is not None else [r for r in range(world) if r != c.src]:
            got[r].add(c.name)
        got[c.src].add(c.name)
    return got


def test_shared_storage_reads_each_file_once_and_broadcasts_what_several_ranks_need():
    needs = [{"big": 3 * CHUNK, "mine0": MB}, {"big": 3 * CHUNK, "mine1": MB}, {"big": 3 * CHUNK}]
    own, chunks = schedule(needs)
    assert own == [["mine0"], ["mine1"], []]  # a file one rank needs: that rank alone reads it
    assert [(c.name, c.start, c.to) for c in chunks] == [("big", i * CHUNK, None) for i in range(3)]
    assert len({c.src for c in chunks}) == 1  # one reader for the whole file
    assert _who_gets(own, chunks, 3) == {0: {"big", "mine0"}, 1: {"big", "mine1"}, 2: {"big"}}


def test_node_memory_is_read_where_it_is_held_and_sent_only_to_ranks_that_lack_it():
    # 4 ranks as 2 nodes; node 1 (ranks 2, 3) was replaced: node 0 holds both nodes' files
    files = {"a.distcp": 2 * CHUNK + 5, "b.distcp": CHUNK, ".metadata": 900}
    needs = [dict(files) for _ in range(4)]  # DDP: every rank needs everything
    holders = {name: {0, 1} for name in files}
    own, chunks = schedule(needs, holders)
    assert all(c.to == (2, 3) and c.src in (0, 1) for c in chunks)  # never a broadcast, never to 0 or 1
    assert not own[2] and not own[3]
    assert _who_gets(own, chunks, 4) == {r: set(files) for r in range(4)}
    for name in files:  # each rank of node 0 reads each file once: itself, or as the sender
        for r in (0, 1):
            assert (name in own[r]) + any(c.src == r and c.name == name and c.start == 0 for c in chunks) == 1
    assert {c.src for c in chunks if c.name == "a.distcp"} != {c.src for c in chunks if c.name == "b.distcp"}


def test_intact_node_memory_moves_nothing_between_ranks():
    needs = [{"x": 10 * MB, "y": MB} for _ in range(4)]
    own, chunks = schedule(needs, {"x": {0, 1, 2, 3}, "y": {0, 1, 2, 3}})
    assert chunks == [] and all(sorted(o) == ["x", "y"] for o in own)
