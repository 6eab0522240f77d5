"""Checkpoints, in one place: the atomic on-disk layout, each backend's DCP state, and the offline tools.

* :mod:`~training.checkpoint.store` — how a checkpoint is written and chosen: ``step_N/`` with
  ``dcp/``, per-rank state, ``meta.json`` and a checksummed ``COMPLETE.json``, renamed into place.
* :mod:`~training.checkpoint.torch_state`, :mod:`~training.checkpoint.deepspeed_state` — the ``dcp/``
  part for the torch backends and for DeepSpeed ZeRO-3: one layout, so any backend loads any other's.
* :mod:`~training.checkpoint.locate`, :mod:`~training.checkpoint.inspection`,
  :mod:`~training.checkpoint.export`, :mod:`~training.checkpoint.reshard`,
  :mod:`~training.checkpoint.safetensors_file` — ``translution ckpt inspect | export | reshard``.
"""
