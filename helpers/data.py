"""The course's datasets: a registry, a strict validator and a loader that returns 🤗 datasets.

Every dataset of the course is listed in `data/dataset_info.json` (written by
`data/generate.py`) with its file(s), its format and its columns, in the spirit of
LLaMA-Factory's registry. `load_dataset` reads the file, checks every record *before* anything
is handed to 🤗 datasets, and fails loudly with the file, the line and the field of the first
problem. Nothing is skipped or repaired silently.

    from helpers.data import load_dataset
    ds = load_dataset("alpaca_zh,alpaca_en")                   # one Dataset, 600 rows
    dd = load_dataset("alpaca_zh", dev_ratio=0.1)              # DatasetDict: train / dev
    ctc = load_dataset("promptcblue_ctc", split="dev")
    mine = load_dataset("my_data.jsonl", format="alpaca")      # your own file

Formats and their columns (role -> column name as written by the course):

    promptcblue   prompt: input, response: target, choices: answer_choices
                  (optional: sample_id, type, task_dataset)             JSON Lines
    alpaca        prompt: instruction, query: input (may be ""), response: output
                                                                        JSON array or JSON Lines
    conversation  messages: conversation = [{"human": ..., "assistant": ...}, ...]
                  (optional: conversation_id, category)                 JSON Lines
    preference    prompt, chosen, rejected (optional: answer)           JSON Lines
    text          one document per line                                 plain text

Importing this module has no side effects; 🤗 datasets is imported on first load.
"""
from __future__ import annotations

import bisect
import copy
import difflib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

try:
    from helpers.env import REPO_ROOT
except ImportError:  # pragma: no cover - helpers/env.py is part of the course
    REPO_ROOT = Path(__file__).resolve().parents[1]

DATA_DIR = REPO_ROOT / "data"
REGISTRY = DATA_DIR / "dataset_info.json"
REGENERATE = "python data/generate.py"

__all__ = ["DataFormatError", "FORMATS", "columns_of", "dataset_names", "dataset_info", "format_of", "load_dataset",
           "read_records"]

# format -> [(role, default column, kind, required)]. Kinds: "text" (non-empty string),
# "str" (any string), "choices" (non-empty list of non-empty strings), "int", "turns".
FORMATS: dict[str, list[tuple[str, str, str, bool]]] = {
    "promptcblue": [("prompt", "input", "text", True), ("response", "target", "text", True),
                    ("choices", "answer_choices", "choices", True), ("id", "sample_id", "str", False),
                    ("type", "type", "str", False), ("task", "task_dataset", "str", False)],
    "alpaca": [("prompt", "instruction", "text", True), ("query", "input", "str", True),
               ("response", "output", "text", True)],
    "conversation": [("messages", "conversation", "turns", True), ("id", "conversation_id", "int", False),
                     ("category", "category", "str", False)],
    "preference": [("prompt", "prompt", "text", True), ("chosen", "chosen", "text", True),
                   ("rejected", "rejected", "text", True), ("answer", "answer", "str", False)],
    "text": [("text", "text", "text", True)],
}
_DEFAULT_TAGS = {"user": "human", "assistant": "assistant"}


def columns_of(format: str) -> dict[str, str]:
    """role -> column name of one format, as `load_dataset` names them (e.g. alpaca: prompt -> 'instruction').

    The one table of columns per format is FORMATS; this reads it. Taught in notebooks/00_setup_and_tour.ipynb.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format '{format}'; known formats: {', '.join(FORMATS)}")
    return {role: column for role, column, _, _ in FORMATS[format]}


def format_of(dataset) -> str:
    """The format of a dataset that `load_dataset` returned, read from its columns.

    `load_dataset` gives every format its standard column names, and no two formats share their required
    ones, so the dataset carries its format with it (through `select`, `shuffle`, splits): nothing later has
    to be told "promptcblue" again. A DatasetDict answers for its splits, a row (a dict) for itself. Raises ValueError naming the columns
    when they match no format, or more than one. Taught in notebooks/00_setup_and_tour.ipynb.
    """
    names = getattr(dataset, "column_names", None)
    if names is None and isinstance(dataset, dict):  # one row: its keys
        names = list(dataset)
    if isinstance(names, dict):  # a DatasetDict: every split has the same format
        found = {split: format_of(part) for split, part in dataset.items()}
        if len(set(found.values())) != 1:
            raise ValueError(f"the splits have different formats: {found}")
        return next(iter(found.values()))
    if names is None:
        raise TypeError(f"format_of takes a 🤗 Dataset (from helpers.data.load_dataset) or one of its rows, "
                        f"got {type(dataset).__name__}")
    matches = [fmt for fmt, spec in FORMATS.items()
               if all(column in names for _, column, _, required in spec if required)]
    if len(matches) != 1:
        wanted = "; ".join(f"{fmt}: {', '.join(c for _, c, _, r in spec if r)}" for fmt, spec in FORMATS.items())
        found = "none" if not matches else " and ".join(matches)
        raise ValueError(f"columns {', '.join(names) or '(none)'} match {found} of the course's formats "
                         f"({wanted}); load the data with helpers.data.load_dataset, or pass fmt=...")
    return matches[0]
_WS = re.compile(r"[ \t\n\r]*")


class DataFormatError(ValueError):
    """A record that does not match its format.

    Attributes: `path` (the file), `line` (1-based line where the record starts), `field`
    (the column, e.g. 'output' or 'conversation[2].assistant'; None for whole-record problems)
    and `problem` (the message without the location). Taught in notebooks/00_setup_and_tour.ipynb.
    """

    def __init__(self, path: str | os.PathLike, line: int, field: str | None, problem: str):
        self.path = Path(path)
        self.line = line
        self.field = field
        self.problem = problem
        where = f"{_shown(self.path)}, line {line}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {problem}")


def _shown(path: Path) -> str:
    """The path as a reader would type it: relative to the repository when inside it."""
    try:
        return Path(path).resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

def _registry() -> dict[str, dict]:
    if not REGISTRY.exists():
        raise FileNotFoundError(f"{_shown(REGISTRY)} not found; regenerate the course data with: {REGENERATE}")
    with open(REGISTRY, encoding="utf-8") as f:
        return json.load(f)


def dataset_names() -> list[str]:
    """Names of the datasets registered in data/dataset_info.json, in registry order.

    Taught in notebooks/00_setup_and_tour.ipynb.
    """
    return list(_registry())


def _unknown(name: str, known: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ValueError(f"unknown dataset '{name}'.{hint} Known datasets: {', '.join(known)}. "
                      "To load your own file, pass its path and format=..., "
                      f"one of: {', '.join(FORMATS)}.")


def dataset_info(name: str) -> dict:
    """The registry entry of one dataset: file_name, format, columns, description.

    `file_name` is a path relative to data/ or a dict split -> path. Raises ValueError for an
    unknown name, with a "did you mean". Taught in notebooks/00_setup_and_tour.ipynb.
    """
    registry = _registry()
    if name not in registry:
        raise _unknown(name, list(registry))
    return copy.deepcopy(registry[name])


# ---------------------------------------------------------------------------------------------
# Reading: JSON Lines, JSON arrays and plain text, each value with the line it starts on
# ---------------------------------------------------------------------------------------------

def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataFormatError(path, line, None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x}); "
                                                "save the file as UTF-8") from None
    return text[1:] if text.startswith("\ufeff") else text


def _read_json_array(path: Path, text: str) -> list[tuple[int, Any]]:
    newlines = [i for i, ch in enumerate(text) if ch == "\n"]

    def line_at(pos: int) -> int:
        return bisect.bisect_left(newlines, pos) + 1

    decoder = json.JSONDecoder()
    pos = text.index("[") + 1  # the caller saw '[' as the first non-blank character
    records: list[tuple[int, Any]] = []
    pos = _WS.match(text, pos).end()
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            start = pos
            if start >= len(text):
                raise DataFormatError(path, line_at(start), None,
                                      "the file ends inside the JSON array (is it truncated?)")
            try:
                value, pos = decoder.raw_decode(text, start)
            except json.JSONDecodeError as e:
                raise DataFormatError(path, line_at(start), None,
                                      f"invalid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
            records.append((line_at(start), value))
            pos = _WS.match(text, pos).end()
            if text.startswith(",", pos):
                pos = _WS.match(text, pos + 1).end()
                continue
            if text.startswith("]", pos):
                pos += 1
                break
            if pos >= len(text):
                raise DataFormatError(path, line_at(start), None,
                                      "the file ends inside the JSON array (is it truncated?)")
            raise DataFormatError(path, line_at(pos), None,
                                  "invalid JSON: expected ',' or ']' after this record")
    pos = _WS.match(text, pos).end()
    if pos < len(text):
        raise DataFormatError(path, line_at(pos), None, "unexpected text after the closing ']'")
    return records


def _read_json_lines(path: Path, text: str) -> list[tuple[int, Any]]:
    records = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue  # blank lines hold no record
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            hint = ""
            if line.strip() in ("{", "["):
                hint = (" -- each record of a JSON Lines file must be on one line; a pretty-printed "
                        "file must be one JSON array [...] of records")
            raise DataFormatError(path, number, None,
                                  f"invalid JSON: {e.msg} (column {e.colno}){hint}") from None
    return records


def read_records(path: str | os.PathLike, format: str) -> list[tuple[int, Any]]:
    """Parse a data file into (line, value) pairs without checking the values.

    Text files give one string per line; JSON files may be a JSON array or JSON Lines (decided by
    the first character). Raises DataFormatError for bytes that are not UTF-8 or invalid JSON.
    Taught in notebooks/00_setup_and_tour.ipynb.
    """
    path = Path(path)
    text = _decode(path)
    if format == "text":
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the final newline ends the last line
        return [(i, line.rstrip("\r")) for i, line in enumerate(lines, 1)]
    if text.lstrip().startswith("["):
        return _read_json_array(path, text)
    return _read_json_lines(path, text)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def _check_value(path: Path, line: int, field: str, kind: str, value: Any, tags: dict[str, str]) -> None:
    def fail(problem: str, where: str = field) -> None:
        raise DataFormatError(path, line, where, problem)

    if kind in ("text", "str"):
        if not isinstance(value, str):
            fail(f"expected a string, found {_json_type(value)}")
        if kind == "text" and not value.strip():
            fail(f"empty string (every example needs a non-empty {field})")
    elif kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            fail(f"expected an integer, found {_json_type(value)}")
    elif kind == "choices":
        if not isinstance(value, list):
            fail(f"expected an array of strings, found {_json_type(value)}")
        if not value:
            fail("empty array (list every possible label)")
        for i, choice in enumerate(value):
            if not isinstance(choice, str):
                fail(f"expected a string, found {_json_type(choice)}", f"{field}[{i}]")
            if not choice.strip():
                fail("empty string (every label must be non-empty)", f"{field}[{i}]")
    elif kind == "turns":
        if not isinstance(value, list):
            fail(f"expected an array of turns, found {_json_type(value)}")
        if not value:
            fail("empty conversation (it needs at least one turn)")
        user, assistant = tags["user"], tags["assistant"]
        for i, turn in enumerate(value):
            where = f"{field}[{i}]"
            if not isinstance(turn, dict):
                fail(f"expected an object with keys '{user}' and '{assistant}', found {_json_type(turn)}", where)
            if set(turn) != {user, assistant}:
                fail(f"expected keys '{user}' and '{assistant}', found: {', '.join(map(repr, turn)) or 'none'}", where)
            for key in (user, assistant):
                if not isinstance(turn[key], str):
                    fail(f"expected a string, found {_json_type(turn[key])}", f"{where}.{key}")
                if not turn[key].strip():
                    fail(f"empty string (every turn needs a non-empty '{key}' message)", f"{where}.{key}")


def _validate(path: Path, records: list[tuple[int, Any]], format: str, columns: dict[str, str],
              tags: dict[str, str]) -> list[dict]:
    """Check every record; return them with the format's default column names."""
    spec = FORMATS[format]
    if not records:
        raise DataFormatError(path, 1, None, "the file holds no records")
    if format == "text":
        out = []
        for line, value in records:
            if not value.strip():
                raise DataFormatError(path, line, "text", "empty line (every line is one document)")
            out.append({"text": value})
        return out
    wanted = [(role, columns.get(role, default), default, kind, required) for role, default, kind, required in spec]
    expected = [col for _, col, _, _, required in wanted if required]
    first_keys: list[str] | None = None
    first_line = 0
    out = []
    for line, record in records:
        if not isinstance(record, dict):
            raise DataFormatError(path, line, None, f"expected a JSON object with columns "
                                                    f"{', '.join(expected)}; found {_json_type(record)}")
        for _, col, _, _, required in wanted:
            if required and col not in record:
                close = difflib.get_close_matches(col, [k for k in record if k not in expected], n=1)
                hint = f" (is '{close[0]}' meant to be '{col}'?)" if close else ""
                raise DataFormatError(path, line, col, f"missing column{hint}; expected columns: "
                                      f"{', '.join(expected)}; found: {', '.join(record) or 'none'}")
        if first_keys is None:
            first_keys, first_line = list(record), line
        elif set(record) != set(first_keys):
            extra = [k for k in record if k not in first_keys]
            lacking = [k for k in first_keys if k not in record]
            field = (extra or lacking)[0]
            raise DataFormatError(path, line, field, f"every record must have the same columns as the "
                                  f"first one (line {first_line}: {', '.join(first_keys)}); "
                                  f"found: {', '.join(record)}")
        renamed = {}
        for _, col, default, kind, _ in wanted:
            if col in record:
                _check_value(path, line, col, kind, record[col], tags)
                renamed[default] = record[col]
        mapped = {col for _, col, _, _, _ in wanted}
        renamed.update((k, v) for k, v in record.items() if k not in mapped)
        if format == "promptcblue":
            target_col, choices_col = columns.get("response", "target"), columns.get("choices", "answer_choices")
            if record[target_col] not in record[choices_col]:
                raise DataFormatError(path, line, target_col, f"{record[target_col]!r} is not one of "
                                      f"{choices_col} ({', '.join(record[choices_col])})")
        if format == "conversation" and tags != _DEFAULT_TAGS:
            renamed["conversation"] = [{"human": t[tags["user"]], "assistant": t[tags["assistant"]]}
                                       for t in renamed["conversation"]]
        out.append(renamed)
    return out


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def _looks_like_path(name: str) -> bool:
    return ("/" in name or os.sep in name or Path(name).suffix.lower() in (".json", ".jsonl", ".txt")
            or Path(name).exists())


def _resolve(name: str | os.PathLike, format: str | None, columns: dict | None):
    """-> (label, {split: path}, format, columns, tags)"""
    registry = _registry()
    if isinstance(name, str) and name in registry:
        info = registry[name]
        if format is not None and format != info["format"]:
            raise ValueError(f"dataset '{name}' has format '{info['format']}', not '{format}'")
        files = info["file_name"]
        files = {"train": files} if isinstance(files, str) else files
        return (name, {split: DATA_DIR / rel for split, rel in files.items()}, info["format"],
                {**info.get("columns", {}), **(columns or {})}, {**_DEFAULT_TAGS, **info.get("tags", {})})
    if not isinstance(name, os.PathLike) and not _looks_like_path(name):
        raise _unknown(name, list(registry))
    path = Path(name)
    if not path.exists() and not path.is_absolute() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such data file (and '{name}' is not a registered dataset: "
                                f"{', '.join(registry)})")
    if format is None:
        raise ValueError(f"{path}: pass format=... to load your own file, one of: {', '.join(FORMATS)}")
    if format not in FORMATS:
        raise ValueError(f"unknown format '{format}'; known formats: {', '.join(FORMATS)}")
    return str(path), {"train": path}, format, dict(columns or {}), dict(_DEFAULT_TAGS)


def _names(names: str | os.PathLike | Iterable) -> list:
    if isinstance(names, os.PathLike):
        return [names]
    if isinstance(names, str):
        items = [n.strip() for n in names.split(",")]
    elif not isinstance(names, Iterable):
        raise TypeError(f"expected dataset names like 'alpaca_zh' or 'alpaca_zh,alpaca_en' (or a list of them), "
                        f"got {names!r}; known names: {', '.join(dataset_names())}")
    else:
        items = [n.strip() if isinstance(n, str) else n for n in names]
    if not items or any(n == "" for n in items):
        raise ValueError(f"expected dataset names like 'alpaca_zh' or 'alpaca_zh,alpaca_en', got {names!r}")
    return items


def load_dataset(names: str | os.PathLike | Iterable, split: str = "train", dev_ratio: float | None = None,
                 seed: int = 42, format: str | None = None, columns: dict[str, str] | None = None):
    """Load one or more datasets as a 🤗 `datasets.Dataset`, after checking every record.

    names: a registered name ('alpaca_zh'), several joined by commas ('alpaca_zh,alpaca_en') or
        a list; datasets of the same format are concatenated in order. A path to your own file
        works too, with `format=` (and `columns=` {role: column} if its column names differ).
    split: 'train', or for datasets that have them 'dev' / 'test'.
    dev_ratio: if given, return a `DatasetDict` with 'train' and 'dev', split off with
        `train_test_split(test_size=dev_ratio, seed=seed)`.

    Columns come back under the format's standard names (see the module docstring). Raises
    DataFormatError (file, line, field) for a bad record, ValueError for unknown names, mixed
    formats or a missing split, FileNotFoundError (with the command that regenerates the course
    data) for a missing file. Taught in notebooks/00_setup_and_tour.ipynb.
    """
    import datasets  # deferred: importing helpers.data stays cheap and side-effect free

    if dev_ratio is not None and not 0 < dev_ratio < 1:
        raise ValueError(f"dev_ratio must be between 0 and 1 (exclusive), got {dev_ratio}")
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown format '{format}'; known formats: {', '.join(FORMATS)}")
    resolved = [_resolve(name, format, columns) for name in _names(names)]
    formats = {fmt for _, _, fmt, _, _ in resolved}
    if len(formats) > 1:
        listing = ", ".join(f"{label} ({fmt})" for label, _, fmt, _, _ in resolved)
        raise ValueError(f"cannot combine datasets of different formats: {listing}")
    parts = []
    for label, files, fmt, cols, tags in resolved:
        if split not in files:
            raise ValueError(f"dataset '{label}' has no split '{split}'; it has: {', '.join(files)}")
        path = files[split]
        if not path.exists():
            raise FileNotFoundError(f"{_shown(path)} not found; regenerate the course data with: {REGENERATE}")
        rows = _validate(path, read_records(path, fmt), fmt, cols, tags)
        try:
            parts.append(datasets.Dataset.from_list(rows))
        except Exception as e:  # e.g. an extra column whose type changes from row to row
            raise ValueError(f"{_shown(path)}: 🤗 datasets could not build a table: {e}") from e
    try:
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    except ValueError as e:
        labels = ", ".join(label for label, *_ in resolved)
        raise ValueError(f"cannot concatenate {labels}: their columns differ ({e})") from e
    if dev_ratio is None:
        return ds
    parted = ds.train_test_split(test_size=dev_ratio, seed=seed)
    return datasets.DatasetDict({"train": parted["train"], "dev": parted["test"]})
