"""trainer: fine-tune SAM's prompt encoder and mask decoder on cached embeddings.

``trainer run|eval|export|demo``. The files follow the pipeline: ``config`` (dataclasses + YAML), ``order``
(the pure sample order), ``data`` (reading, residency, prefetch), ``prompts`` (boxes, points, corrective
clicks), ``decoder`` (one decoder call per step), ``losses``, ``lora``, ``task`` (the task protocol) with
``instance`` and ``semantic`` (the two tasks), ``model`` (what trains), ``session`` (``setup`` and
``train_step``), ``train`` (the loop), ``evaluate`` / ``eval_run``, ``checkpoint``, ``export``, ``plots``,
``demo``, ``cli``. See docs/architecture.md and docs/training.md.
"""
