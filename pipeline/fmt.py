"""Sizes and ages for people: formatted in summaries and reports, parsed from options and matrix files."""

import re

from pipeline.errors import BadInput


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)b?\s*", text.lower())
    if not match:
        raise BadInput(f"size '{text}' not understood; write e.g. 500M or 20G")
    return int(float(match[1]) * 1024 ** " kmgt".index(match[2] or " "))


def parse_age(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text.lower())
    if not match:
        raise BadInput(f"age '{text}' not understood; write e.g. 12h or 7d")
    return float(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]
