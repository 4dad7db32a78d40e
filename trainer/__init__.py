"""trainer: fine-tune SAM's prompt encoder and mask decoder on cached embeddings.

``trainer run|eval|export|demo``. The files follow the pipeline: ``config`` (dataclasses + YAML), ``order``
(the pure sample order), ``data`` (reading, residency, prefetch), ``prompts`` (boxes, points, corrective
clicks), ``decoder`` (one decoder call per step), ``losses``, ``lora``, ``semantic``, ``train`` (the loop),
``evaluate`` / ``eval_run``, ``checkpoint``, ``export``, ``plots``, ``demo``, ``cli``. See docs/training.md.
"""
