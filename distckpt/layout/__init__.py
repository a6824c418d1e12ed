"""The on-storage contract: what a committed step is and how it gets there.

``manifest`` (``manifest.json``: every file with size and checksum), ``commit`` (rename vs
marker: how a step becomes visible atomically), ``catalog`` (what is committed, what is
leftover, ``CheckpointInfo``), ``lease`` (one writing job per root) and ``tier`` (a storage
with its commit and catalog). Nothing here is a collective.
"""
