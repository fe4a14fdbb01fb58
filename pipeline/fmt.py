"""Sizes and ages for people: formatted in summaries, reports, cards and plots, parsed from options and matrix
files. Sizes are binary everywhere (1 MiB = 2**20 bytes) and labelled as such, so no two places disagree."""

import re

from pipeline.errors import BadInput

BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(n: float) -> str:
    for unit in BYTE_UNITS:
        if n < 1024 or unit == BYTE_UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def in_unit(n: float, unit: str) -> float:
    """`n` bytes in one of BYTE_UNITS (a plot axis needs one unit for all its bars)."""
    return n / 1024 ** BYTE_UNITS.index(unit)


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not match:
        raise BadInput(f"size '{text}' not understood; write e.g. 500M, 500MiB or 20G (binary units)")
    return int(float(match[1]) * 1024 ** " kmgt".index(match[2] or " "))


def parse_age(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text.lower())
    if not match:
        raise BadInput(f"age '{text}' not understood; write e.g. 12h or 7d")
    return float(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]
