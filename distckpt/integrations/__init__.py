"""distckpt inside the frameworks users train with: one module per framework.

``lightning`` (a ``CheckpointIO`` plugin for ``pytorch-lightning``), ``accelerate`` (an
``Accelerator`` whose ``save_state``/``load_state`` go through distckpt) and
``transformers`` (a ``Trainer`` whose checkpoints and ``resume_from_checkpoint`` do).
Each imports its framework when it is imported itself, never from ``import distckpt``;
install them with the extras ``distckpt[lightning]`` and ``distckpt[hf]``.

Frameworks name checkpoints by path (``.../epoch=3-step=400.ckpt``, ``.../checkpoint-400``);
distckpt names them by step under one root. ``links.Links`` joins the two: the framework's
path becomes a small JSON *link* naming a committed step, written only once that step is
committed (see ``links``).
"""
