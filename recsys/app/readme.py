"""Generated README sections: the text between a begin and an end marker is replaced whole."""

from __future__ import annotations

from pathlib import Path


def replace_section(readme: Path, begin: str, end: str, body: str) -> None:
    """Replace the text between ``begin`` and ``end`` (raise when a marker is missing)."""
    text = readme.read_text()
    if begin not in text or end not in text:
        raise ValueError(f"{readme} has no generated-section markers ({begin!r} ... {end!r})")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{body}\n{end}{tail}")
