"""trainer: fine-tune SAM's prompt encoder and mask decoder on cached embeddings.

``trainer run|eval|export|demo``. The files follow the pipeline: ``config`` (dataclasses + YAML), ``order``
(the pure sample order), ``data`` (reading, residency, prefetch), ``prompts`` (boxes, points, corrective
clicks), ``decoder`` (one decoder call per step), ``losses``, ``lora``, ``task`` (the task protocol) with
``instance`` and ``semantic`` (the two tasks), ``variant`` (the variant protocol) and ``variants`` (its
registry) with ``lora``, ``encoder_tail``, ``adapted`` and the tasks' heads, ``model`` (what trains),
``session`` (``setup`` and ``train_step``), ``train`` (the loop), ``evaluate`` / ``eval_run``,
``checkpoint``, ``export`` and ``tuned`` (``load_tuned``), ``predictor``, ``plots``, ``demo``, ``cli``. See
docs/architecture.md and docs/training.md.

``trainer.load_tuned(path)`` rebuilds any model ``trainer export`` wrote (``trainer.tuned``).
"""


def __getattr__(name: str):
    # imported on first use, so that importing one trainer module does not build the whole model stack
    if name == "load_tuned":
        from trainer.tuned import load_tuned

        return load_tuned
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
