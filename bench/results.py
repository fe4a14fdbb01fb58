"""How a benchmark records what it measured in bench/RESULTS.md (scripts run as `python bench/<name>.py`)."""

from __future__ import annotations

from pathlib import Path


def put_section(results: Path, start: str, end: str, section: str) -> None:
    """Replace the section between the `start` and `end` markers with `section` (which holds both), or append it."""
    text = results.read_text()
    if start in text:
        text = text[:text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    results.write_text(text)


def append(results: Path, text: str) -> None:
    """Print a table and add it at the end of the results file."""
    print(text)
    with results.open("a") as fh:
        fh.write("\n" + text)
