"""Layout rules the formatter cannot keep by itself (see ``[tool.ruff.format]`` in pyproject.toml)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("embedcache", "trainer", "kernels", "bench", "tests")

# A formatted line that starts by closing a bracket and still carries a comment: the formatter split the
# statement because the comment pushed it past the line length (a trailing comment counts towards it).
SPLIT_BY_COMMENT = re.compile(r"^\s*[)\]}][^#\n]*\s#(?! fmt: skip)")


def test_no_statement_is_split_by_its_trailing_comment():
    hits = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if SPLIT_BY_COMMENT.match(line)
    ]
    assert not hits, "put these comments on their own line above the statement:\n" + "\n".join(hits)


# The registries that map a task's or a variant's config value to its class; everything else goes through
# them (the task protocol, trainer.variant's protocol) and never compares those values itself.
REGISTRIES = ("trainer/task.py", "trainer/variants.py")
# config.py declares the choices (tests/test_trainer_units.py ties them to the registries) and checks them
ALLOWED = (*REGISTRIES, "trainer/config.py")


def _registry_names() -> set[str]:
    """The keys of ``TASKS`` and ``ENCODER_ADAPTERS`` as their files spell them (no import: this test stays
    fast); ``none`` is left out, as other settings use it too."""
    names = set()
    for rel in REGISTRIES:
        for node in ast.walk(ast.parse((REPO / rel).read_text())):
            target = getattr(node, "target", None) or (
                node.targets[0] if isinstance(node, ast.Assign) else None
            )
            if isinstance(target, ast.Name) and target.id in ("TASKS", "ENCODER_ADAPTERS"):
                names |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    return names - {"none"}


def _name_comparisons(source: str, names: set[str]) -> list[int]:
    """Lines of ``source`` that compare with a registry name (``== "conv_lora"``, ``"semantic" in ...``) or
    compare ``.task`` / ``.encoder_adapter`` at all."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        sides += [e for s in sides if isinstance(s, (ast.Tuple, ast.List, ast.Set)) for e in s.elts]
        named = any(isinstance(s, ast.Constant) and s.value in names for s in sides)
        by_field = any(isinstance(s, ast.Attribute) and s.attr in ("task", "encoder_adapter") for s in sides)
        if named or by_field:
            lines.append(node.lineno)
    return lines


def test_tasks_and_variants_are_not_compared_by_name_outside_their_registries():
    names = _registry_names()
    assert {"instance", "semantic", "lora", "conv_lora"} <= names  # the parse found the registries
    assert _name_comparisons('if cfg.model.task != "instance":\n    pass\n', names) == [1]
    assert _name_comparisons('ok = adapter in ("lora",)\n', names) == [1]
    hits = [
        f"{path.relative_to(REPO)}:{n}: {path.read_text().splitlines()[n - 1].strip()}"
        for path in sorted((REPO / "trainer").rglob("*.py"))
        if path.relative_to(REPO).as_posix() not in ALLOWED
        for n in _name_comparisons(path.read_text(), names)
    ]
    assert not hits, (
        "ask the task or the variant (trainer.task.Task, trainer.variant.Variant) instead of comparing its "
        "name:\n" + "\n".join(hits)
    )
