"""Layout rules the formatter cannot keep by itself (see ``[tool.ruff.format]`` in pyproject.toml)."""

from __future__ import annotations

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
