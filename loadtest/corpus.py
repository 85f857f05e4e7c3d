"""Offline text for load-test prompts: the documentation that ships with the Python interpreter.

`pydoc_data.topics` holds the language reference's topics (about 460K characters of English
prose with code); when a distribution strips it, the docstrings of the standard library's own
modules stand in. Nothing is downloaded, and the same interpreter gives the same text, so a
seeded workload is reproducible on any machine with that Python.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from functools import lru_cache
from pathlib import Path

MIN_CHARS = 20_000  # less than this and long documents would repeat themselves


@lru_cache(maxsize=1)
def corpus_text() -> str:
    """The whole corpus as one string (paragraphs separated by blank lines)."""
    try:
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[k].strip() for k in sorted(topics))
    except ImportError:
        text = ""
    if len(text) < MIN_CHARS:
        text = _stdlib_docstrings()
    if len(text) < MIN_CHARS:
        raise RuntimeError(
            f"found only {len(text)} characters of offline text in this Python "
            "installation (pydoc_data and the stdlib sources are missing)"
        )
    return text


def _stdlib_docstrings() -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.glob("*.py")):
        try:
            module = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(module):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    docs.append(doc)
    return "\n\n".join(docs)


@lru_cache(maxsize=1)
def sentences() -> tuple[str, ...]:
    """Short prose lines of the corpus (for chat questions)."""
    out = []
    for para in corpus_text().split("\n\n"):
        line = " ".join(para.split())
        if 40 <= len(line) <= 240 and line[0].isalpha():
            out.append(line)
    return tuple(out)


def document(rng: random.Random, num_chars: int) -> str:
    """`num_chars` characters of contiguous corpus text from a random offset (wrapping around),
    starting at a paragraph so a document reads like one."""
    if num_chars < 1:
        raise ValueError(f"num_chars must be >= 1, got {num_chars}")
    text = corpus_text()
    start = text.find("\n\n", rng.randrange(len(text)))
    start = 0 if start < 0 else start + 2
    out = []
    while num_chars > 0:
        piece = text[start : start + num_chars]
        out.append(piece)
        num_chars -= len(piece)
        start = 0
    return "".join(out)
