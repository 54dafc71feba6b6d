"""Read and write the project's text files (JSONL, CSV, plain text) so that every Unicode character round-trips.

`str.splitlines()` is wrong for these formats: it also splits on U+2028/U+2029, U+0085 and the control
characters \\x1c-\\x1e, which JSON strings may hold unescaped, and it cuts quoted CSV cells that span lines
before `csv` sees them. Here JSONL is split on "\\n" only, CSV goes through the `csv` module over the whole
text, and files are read without newline translation, so a reader returns exactly what the file holds.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .errors import InvalidParameter, PromptFileError

_JSON_WHITESPACE = " \t\r\n"  # what JSON allows between tokens; str.strip() would also eat U+2028 etc.
_LARGEST_FIELD = 2**31 - 1  # the most the csv module takes on every platform
_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # the line ends of a plain text file (Unix, Windows, old Mac)


def read_text(path: str | Path, what: str = "file") -> str:
    """The whole file as UTF-8 (a leading byte-order mark dropped), without newline translation.

    Raises PromptFileError naming the file when it is missing, unreadable or not UTF-8."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            return handle.read()
    except FileNotFoundError:
        raise PromptFileError(f"{what} {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise PromptFileError(f"{what} {str(path)!r} is a directory; give a file") from None
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"cannot read {what} {str(path)!r}: not UTF-8 text ({exc.reason} at byte "
                              f"{exc.start}); save it as UTF-8") from None  # fmt: skip
    except OSError as exc:
        raise PromptFileError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None


def read_json_object(path: str | Path, what: str = "file") -> dict[str, Any]:
    """A JSON file that must hold one object (a run's config.json, judge_agreement.json).

    Raises PromptFileError naming the file when it is unreadable, not JSON, or not an object."""
    text = read_text(path, what)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PromptFileError(f"{what} {str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                              "restore it or delete its directory to start over") from None  # fmt: skip
    if not isinstance(value, dict):
        raise PromptFileError(f"{what} {str(path)!r} holds {type(value).__name__}, not a JSON object")
    return value


def text_lines(text: str) -> list[str]:
    """Non-blank lines of a plain text file, split at line ends only (\\n, \\r\\n or \\r), kept as written."""
    return [line for line in _LINE_BREAK.split(text) if line.strip()]


def jsonl_lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) for each line of JSONL text that is not blank, split on "\\n" only."""
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip(_JSON_WHITESPACE):
            yield number, line


def iter_jsonl(text: str, where: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank JSONL line; a malformed line is a PromptFileError."""
    for number, line in jsonl_lines(text):
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{where} line {number}: not valid JSON ({exc.msg})") from None


def csv_table(text: str, where: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows as dicts keyed by it) of CSV text; quoted cells keep their line breaks, however long.

    Strict, so that nothing is lost silently: raises PromptFileError naming the file and row for text the
    csv module cannot parse (an unterminated quote, a stray quote), a repeated column name, or a row with
    more or fewer cells than the header (an unquoted comma, a short row)."""
    csv.field_size_limit(_LARGEST_FIELD)  # the default, 128 KiB, refuses many-shot templates
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, [])
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise PromptFileError(f"{where}: column(s) {', '.join(map(repr, repeated))} appear more than once; "
                                  "give every column its own name")  # fmt: skip
        rows = []
        for cells in reader:
            if not cells:  # a blank line
                continue
            if len(cells) != len(header):
                raise PromptFileError(
                    f"{where} row ending on line {reader.line_num}: {len(cells)} cells under a header of "
                    f"{len(header)}; quote cells that hold commas, and give every row all its cells"
                )
            rows.append(dict(zip(header, cells)))
    except csv.Error as exc:
        raise PromptFileError(f"{where} line {reader.line_num}: not valid CSV ({exc}); check its quotes") from None
    return header, rows


def jsonl_line(value: Any) -> str:
    """One JSONL line (with its "\\n") that `json.loads` turns back into `value`.

    Non-ASCII text is written as itself; a string holding a lone surrogate (not encodable as UTF-8) makes
    the line fall back to ASCII escapes, which still round-trip."""
    line = json.dumps(value, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(value)
    return line + "\n"


def jsonl_text(rows: Iterable[Any]) -> str:
    return "".join(jsonl_line(row) for row in rows)


def check_output_path(path: str | Path, directory: bool = False) -> None:
    """Raise InvalidParameter if nothing could be written at `path`: a file where a directory is wanted or
    the reverse, or a file standing where one of its parent directories should be."""
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise InvalidParameter(f"{str(path)!r} is a file; give a directory to write into")
    if not directory and path.is_dir():
        raise InvalidParameter(f"{str(path)!r} is a directory; give a file name to write to")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise InvalidParameter(f"cannot write {str(path)!r}: {str(parent)!r} is a file, not a directory")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` as UTF-8 to `path` through a temporary file in the same folder, so that readers and a
    crash never see a half-written file."""
    with atomic_output(path) as handle:
        handle.write(text.encode("utf-8"))


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[BinaryIO]:
    """A binary handle whose bytes replace `path` only when the block finishes without an exception (written
    to a temporary file in the same folder, then renamed): readers and a crash never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private (0600); give it an ordinary file's mode
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _umask() -> int:
    """The process's umask (read by setting it, then putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
