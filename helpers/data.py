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
    real = load_dataset("alpaca_gpt4_zh")                      # the seeds' real data, from the Hub (online)

The registry has two parts. The course's synthetic datasets are files in data/ (`dataset_names()`: what
loads here, offline). The seeds' real datasets are named by their Hugging Face Hub id (`hf_hub_url`, as in
LLaMA-Factory) or, where they are not on the Hub, by where to download them (`real_dataset_names()`); each
names its local stand-in, the synthetic dataset of the same format. Online, a real dataset is loaded with
🤗 datasets, mapped to the course's columns and checked like a file (its first `check_rows` rows, or all);
where the Hub is out of reach, `load_dataset` says so and names the stand-in. Your own entries go in
`data/my_datasets.json` (optional; generate.py neither writes nor checks it), in the same layout.

Formats and their columns (role -> column name as written by the course):

    promptcblue   prompt: input, response: target, choices: answer_choices
                  (optional: sample_id, type, task_dataset)             JSON Lines
    alpaca        prompt: instruction, query: input (may be ""), response: output
                                                                        JSON array or JSON Lines
    conversation  messages: conversation = [{"human": ..., "assistant": ...}, ...]
                  (optional: conversation_id, category)                 JSON Lines
    preference    prompt, chosen, rejected (optional: answer)           JSON Lines
    text          one document per line                                 plain text

A registry entry's "columns" maps a role to the dataset's own column: "input" (a column), "" (the dataset has
none: the course column is left empty, as ChatGLM Efficient Tuning writes it) or "output[1]" (item 1 of a
list column). "tags" names the keys of a conversation turn ({"user": "human", "assistant": "assistant"}), and
"where" keeps only the rows whose column has the given value ({"task_dataset": "CHIP-CTC"}).

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
from typing import Any, Iterable, NamedTuple

try:
    from helpers.env import REPO_ROOT, offline
except ImportError:  # pragma: no cover - helpers/env.py is part of the course
    REPO_ROOT = Path(__file__).resolve().parents[1]

    def offline() -> bool:
        return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}

DATA_DIR = REPO_ROOT / "data"
REGISTRY = DATA_DIR / "dataset_info.json"
# A learner's own registry entries: optional, same layout, never written or checked by data/generate.py.
USER_REGISTRY = DATA_DIR / "my_datasets.json"
REGENERATE = "python data/generate.py"
HUB_CHECK_ROWS = 1000  # rows of a Hub dataset checked before it is used (load_dataset(check_rows=None): all)

__all__ = ["DataFormatError", "FORMATS", "RealDataUnavailable", "columns_of", "dataset_names", "dataset_info",
           "format_of", "load_dataset", "read_records", "real_dataset_names"]

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

    Attributes: `path` (the file; for a dataset read from the Hub, its address 'hf://datasets/<id>', a str),
    `line` (1-based line where the record starts; for a Hub dataset, the 1-based row), `field`
    (the column, e.g. 'output' or 'conversation[2].assistant'; None for whole-record problems)
    and `problem` (the message without the location). Taught in notebooks/00_setup_and_tour.ipynb.
    """

    def __init__(self, path: str | os.PathLike, line: int, field: str | None, problem: str, unit: str = "line"):
        hub = isinstance(path, str) and path.startswith("hf://")
        self.path = path if hub else Path(path)
        self.line = line
        self.field = field
        self.problem = problem
        where = f"{self.path if hub else _shown(self.path)}, {unit} {line}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {problem}")


class RealDataUnavailable(OSError):
    """A registered real dataset that cannot be loaded here: the Hub is out of reach (offline, or not cached),
    or it is not on the Hub at all and has to be downloaded by hand. The message names the dataset and its
    local stand-in. Taught in README.md ("Your own data, and the seeds' real data")."""


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

# Keys a registry entry may have. LLaMA-Factory's names where the course has the same notion (file_name,
# hf_hub_url, subset, columns, tags, ranking; ChatGLM Efficient Tuning's file_sha1); "format" is the course's
# own (one of FORMATS, where LLaMA-Factory's "formatting" is alpaca or sharegpt).
_ENTRY_KEYS = ("file_name", "hf_hub_url", "subset", "splits", "download", "file_sha1", "format", "columns", "tags",
               "where", "ranking", "standin", "license", "rows", "seed", "source", "description")
_NOT_HERE = {
    "formatting": "the course names its formats with 'format' (one of: " + ", ".join(FORMATS) + "); LLaMA-Factory's "
                  "'formatting' (alpaca or sharegpt) is not read here",
    "ms_hub_url": "ModelScope is not supported here; give hf_hub_url (a Hugging Face Hub id) or file_name",
    "script_url": "loading scripts are not supported here; give hf_hub_url or file_name",
    "folder": "'folder' is not supported here; give the data files' path in file_name",
}
_INDEXED = re.compile(r"^(.+)\[(\d+)\]$")  # "output[1]": item 1 of the list in column "output"


def _course_registry() -> dict[str, dict]:
    if not REGISTRY.exists():
        raise FileNotFoundError(f"{_shown(REGISTRY)} not found; regenerate the course data with: {REGENERATE}")
    with open(REGISTRY, encoding="utf-8") as f:
        return json.load(f)


def _user_entries() -> dict:
    """The learner's own registry (USER_REGISTRY), unchecked; {} when there is none."""
    if not USER_REGISTRY.is_file():
        return {}
    try:
        entries = json.loads(USER_REGISTRY.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{_shown(USER_REGISTRY)}: not valid JSON ({e}); it holds your own entries, "
                         '{"my_data": {"file_name": "my_data.jsonl", "format": "alpaca"}}') from None
    if not isinstance(entries, dict):
        raise ValueError(f"{_shown(USER_REGISTRY)}: expected one JSON object {{name: entry}}, "
                         f"found {_json_type(entries)}")
    return entries


def _check_entry(name: str, entry: Any, where: str, own: bool = True) -> None:
    """Raise ValueError, naming the registry file and the entry, for an entry helpers.data cannot use.

    `own`: an entry of the learner's (it needs file_name or hf_hub_url); the course's real entries may instead
    say where to download the data by hand ("download")."""
    def fail(problem: str) -> None:
        raise ValueError(f"{where}, entry '{name}': {problem}")

    if not isinstance(entry, dict):
        fail(f"expected an object, found {_json_type(entry)}")
    for key in entry:
        if key in _NOT_HERE:
            fail(_NOT_HERE[key])
        if key not in _ENTRY_KEYS:
            close = difflib.get_close_matches(key, _ENTRY_KEYS, n=1)
            fail(f"unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                 + f"; the keys an entry may have: {', '.join(_ENTRY_KEYS)}")
    fmt = entry.get("format")
    if fmt not in FORMATS:
        fail(f"'format' must be one of {', '.join(FORMATS)}, got {fmt!r}")
    sources = [key for key in ("file_name", "hf_hub_url") if key in entry]
    if own and len(sources) != 1:
        fail("give exactly one of file_name (a file, or {split: file}, relative to this registry's folder) "
             "and hf_hub_url (a Hugging Face Hub id like 'owner/name')")
    if not sources and "download" not in entry:
        fail("it needs file_name, hf_hub_url or download")
    files = entry.get("file_name")
    if files is not None and not (
            (isinstance(files, str) and files.strip())
            or (isinstance(files, dict) and files
                and all(isinstance(v, str) and v.strip() for v in files.values()))):
        fail("file_name must be a path, or an object {split: path}, e.g. {\"train\": \"mine/train.jsonl\"}")
    hub = entry.get("hf_hub_url")
    if hub is not None and not (isinstance(hub, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", hub)):
        fail(f"hf_hub_url must be a Hub id like 'owner/name', got {hub!r}")
    columns = entry.get("columns", {})
    if not isinstance(columns, dict):
        fail(f"'columns' must be an object {{role: column}}, found {_json_type(columns)}")
    roles = {role: (kind, required) for role, _, kind, required in FORMATS[fmt]}
    for role, column in columns.items():
        if role not in roles:
            fail(f"'{role}' is not a role of the {fmt} format; its roles: {', '.join(roles)}")
        if not isinstance(column, str):
            fail(f"columns['{role}'] must be a column name (a string), found {_json_type(column)}")
        if column == "" and roles[role][1] and roles[role][0] != "str":
            fail(f"the {fmt} format needs a '{role}' column; \"\" (no such column) is only for roles that may be empty")
    tags = entry.get("tags", {})
    if tags and fmt != "conversation":
        fail("'tags' (the keys of a conversation turn) belong to the conversation format only")
    if not isinstance(tags, dict) or set(tags) - {"user", "assistant"} or not all(
            isinstance(v, str) and v for v in tags.values()):
        fail('\'tags\' must be an object like {"user": "human", "assistant": "assistant"}')
    keep = entry.get("where", {})
    if not isinstance(keep, dict) or not all(
            isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(x, str) for x in v))
            for v in keep.values()):
        fail('\'where\' must be an object {column: value or [values]}, e.g. {"task_dataset": "CHIP-CTC"}')
    splits = entry.get("splits", ["train"])
    if not (isinstance(splits, list) and splits and all(isinstance(x, str) and x for x in splits)):
        fail("'splits' must be a list of split names, e.g. [\"train\"]")


def _registries() -> tuple[dict[str, dict], dict[str, Path], set[str]]:
    """(name -> entry, name -> the folder its relative file_name is read from, the names your registry gives a
    file_name): the course's entries, then yours.

    Your entry may reuse the name of a course entry that has no file here (a real dataset) only to give its
    file_name: the data you downloaded, read with the course's format and columns. Any other reuse is an error.
    """
    registry = _course_registry()
    base = {name: DATA_DIR for name in registry}
    yours = set()
    where = _shown(USER_REGISTRY)
    for name, entry in _user_entries().items():
        own = name not in registry
        if not own:
            course = registry[name]
            if "file_name" in course or not isinstance(entry, dict) or set(entry) != {"file_name"}:
                hint = ("; to load a real dataset you downloaded under its course name, give only its file_name"
                        if "file_name" not in course else "")
                raise ValueError(f"{where}: '{name}' is a course dataset; give your entry a name of its own{hint}")
            entry = {**course, **entry}
        _check_entry(name, entry, where, own=own)
        registry[name] = entry
        base[name] = USER_REGISTRY.parent
        yours.add(name)
    return registry, base, yours


def _registry() -> dict[str, dict]:
    return _registries()[0]


def dataset_names() -> list[str]:
    """Names of the datasets that load here, offline, in registry order: the course's files in data/
    (data/dataset_info.json), then your own entries with a file_name (data/my_datasets.json).

    The seeds' real datasets, which need the Hub or a download, are listed by `real_dataset_names()`.
    Taught in notebooks/00_setup_and_tour.ipynb.
    """
    return [name for name, info in _registry().items() if "file_name" in info]


def real_dataset_names() -> list[str]:
    """Names of the registered datasets that are not files here, in registry order: the seeds' real data on the
    Hugging Face Hub (`hf_hub_url`) or to download by hand (`download`), and your own Hub entries.

    `dataset_info(name)` tells each one's format, source, licence and `standin`: the course dataset of the same
    format to use where the real one cannot be had. Taught in README.md ("Your own data, and the seeds' real data").
    """
    return [name for name, info in _registry().items() if "file_name" not in info]


def _unknown(name: str, registry: dict[str, dict]) -> ValueError:
    known = [n for n, info in registry.items() if "file_name" in info]
    real = [n for n, info in registry.items() if "file_name" not in info]
    close = difflib.get_close_matches(name, known + real, n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    listing = f"Known datasets: {', '.join(known)}."
    if real:
        listing += f" Real datasets (online, or downloaded by hand): {', '.join(real)}."
    return ValueError(f"unknown dataset '{name}'.{hint} {listing} "
                      "To load your own file, pass its path and format=..., "
                      f"one of: {', '.join(FORMATS)}.")


def dataset_info(name: str) -> dict:
    """The registry entry of one dataset: file_name (or hf_hub_url / download), format, columns, description.

    `file_name` is a path relative to data/ or a dict split -> path. A real dataset's entry also names its
    `standin`, `license`, `source` and, where known, `rows`. Raises ValueError for an unknown name, with a
    "did you mean". Taught in notebooks/00_setup_and_tour.ipynb.
    """
    registry = _registry()
    if name not in registry:
        raise _unknown(name, registry)
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

def _check_value(path: Path | str, line: int, field: str, kind: str, value: Any, tags: dict[str, str],
                 unit: str = "line") -> None:
    def fail(problem: str, where: str = field) -> None:
        raise DataFormatError(path, line, where, problem, unit)

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


def _wanted(format: str, columns: dict[str, str]) -> list[tuple[str, str, str, str, bool]]:
    """[(role, the dataset's column spec, the course's column, kind, required)] of one format."""
    return [(role, columns.get(role, default), default, kind, required)
            for role, default, kind, required in FORMATS[format]]


def _base(spec: str) -> str:
    """The dataset column a column spec reads: 'output[1]' -> 'output'; '' (no such column) -> ''."""
    indexed = _INDEXED.match(spec)
    return indexed.group(1) if indexed else spec


def _lookup(record: dict, spec: str) -> tuple[bool, Any]:
    """(found, value) of a column spec in one record: 'input', 'output[1]', or '' (absent: the value is "")."""
    if spec == "":
        return True, ""
    indexed = _INDEXED.match(spec)
    if indexed is None:
        return (spec in record), record.get(spec)
    items = record.get(indexed.group(1))
    i = int(indexed.group(2))
    if isinstance(items, list) and i < len(items):
        return True, items[i]
    return False, None


def _matches(record: Any, keep: dict) -> bool:
    """Whether a record passes an entry's "where" ({column: value or [values]}); non-objects pass (to be refused)."""
    if not isinstance(record, dict):
        return True
    return all(record.get(col) in (want if isinstance(want, list) else [want]) for col, want in keep.items())


def _course_row(record: dict, wanted: list, format: str, tags: dict[str, str]) -> dict:
    """One record under the course's column names (format's columns first, then the dataset's other columns)."""
    renamed = {}
    for _, spec, default, _, required in wanted:
        found, value = _lookup(record, spec)
        if found and (spec != "" or required):
            renamed[default] = value
    used = {_base(spec) for _, spec, _, _, _ in wanted}
    renamed.update((k, v) for k, v in record.items() if k not in used)
    if format == "conversation" and tags != _DEFAULT_TAGS and isinstance(renamed.get("conversation"), list):
        renamed["conversation"] = [{"human": t.get(tags["user"]), "assistant": t.get(tags["assistant"])}
                                   if isinstance(t, dict) else t for t in renamed["conversation"]]
    return renamed


def _validate(path: Path | str, records: list[tuple[int, Any]], format: str, columns: dict[str, str],
              tags: dict[str, str], unit: str = "line") -> list[dict]:
    """Check every record; return them with the format's default column names."""
    if not records:
        raise DataFormatError(path, 1, None, "the file holds no records" if unit == "line" else "no rows", unit)
    if format == "text":
        out = []
        for line, value in records:
            if not isinstance(value, str):  # a text column of a Hub dataset
                raise DataFormatError(path, line, "text", f"expected a string, found {_json_type(value)}", unit)
            if not value.strip():
                raise DataFormatError(path, line, "text", "empty line (every line is one document)", unit)
            out.append({"text": value})
        return out
    wanted = _wanted(format, columns)
    expected = [spec for _, spec, _, _, required in wanted if required and spec != ""]
    first_keys: list[str] | None = None
    first_line = 0
    out = []
    for line, record in records:
        if not isinstance(record, dict):
            raise DataFormatError(path, line, None, f"expected a JSON object with columns "
                                                    f"{', '.join(expected)}; found {_json_type(record)}", unit)
        for _, spec, _, _, required in wanted:
            if not required or spec == "":
                continue
            column = _base(spec)
            if column not in record:
                close = difflib.get_close_matches(column, [k for k in record if k not in expected], n=1)
                hint = f" (is '{close[0]}' meant to be '{column}'?)" if close else ""
                raise DataFormatError(path, line, column, f"missing column{hint}; expected columns: "
                                      f"{', '.join(expected)}; found: {', '.join(record) or 'none'}", unit)
            if not _lookup(record, spec)[0]:
                i = int(_INDEXED.match(spec).group(2))
                raise DataFormatError(path, line, spec, f"expected an array of at least {i + 1} items in "
                                      f"'{column}', found {_json_type(record[column])}"
                                      + (f" of {len(record[column])}" if isinstance(record[column], list) else ""),
                                      unit)
        if first_keys is None:
            first_keys, first_line = list(record), line
        elif set(record) != set(first_keys):
            extra = [k for k in record if k not in first_keys]
            lacking = [k for k in first_keys if k not in record]
            field = (extra or lacking)[0]
            raise DataFormatError(path, line, field, f"every record must have the same columns as the "
                                  f"first one ({unit} {first_line}: {', '.join(first_keys)}); "
                                  f"found: {', '.join(record)}", unit)
        for _, spec, _, kind, _ in wanted:
            found, value = _lookup(record, spec)
            if spec != "" and found:
                _check_value(path, line, spec, kind, value, tags, unit)
        renamed = _course_row(record, wanted, format, tags)
        if format == "promptcblue":
            target_col, choices_col = columns.get("response", "target"), columns.get("choices", "answer_choices")
            if renamed["target"] not in renamed["answer_choices"]:
                raise DataFormatError(path, line, target_col, f"{renamed['target']!r} is not one of "
                                      f"{choices_col} ({', '.join(renamed['answer_choices'])})", unit)
        out.append(renamed)
    return out


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def _looks_like_path(name: str) -> bool:
    return ("/" in name or os.sep in name or Path(name).suffix.lower() in (".json", ".jsonl", ".txt")
            or Path(name).exists())


class _Resolved(NamedTuple):
    label: str                    # the registered name, or the path as given
    files: dict[str, Path] | None  # split -> file; None for a real dataset that is not a file here
    format: str
    columns: dict[str, str]
    tags: dict[str, str]
    where: dict                   # the entry's row filter ({} keeps every row)
    info: dict | None             # the registry entry (None for a file passed by path)
    own: bool                     # registered in USER_REGISTRY (its missing files are not the course's)


def _resolve(name: str | os.PathLike, format: str | None, columns: dict | None) -> _Resolved:
    registry, base, yours = _registries()
    if isinstance(name, str) and name in registry:
        info = registry[name]
        if format is not None and format != info["format"]:
            raise ValueError(f"dataset '{name}' has format '{info['format']}', not '{format}'")
        files = info.get("file_name")
        if files is not None:
            files = {"train": files} if isinstance(files, str) else files
            files = {split: base[name] / Path(rel).expanduser() for split, rel in files.items()}
        return _Resolved(name, files, info["format"], {**info.get("columns", {}), **(columns or {})},
                         {**_DEFAULT_TAGS, **info.get("tags", {})}, info.get("where", {}), info,
                         name in yours)
    if not isinstance(name, os.PathLike) and not _looks_like_path(name):
        raise _unknown(name, registry)
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
    return _Resolved(str(path), {"train": path}, format, dict(columns or {}), dict(_DEFAULT_TAGS), {}, None, False)


def _load_from_hub(repo_id: str, *, subset: str | None = None, split: str = "train"):
    """The one call that reaches the Hugging Face Hub (or its local cache): 🤗 datasets' own loader.

    Tests replace it with a loader that reads a small file laid out like the Hub dataset."""
    import datasets

    return datasets.load_dataset(repo_id, subset, split=split)


def _standin_hint(info: dict) -> str:
    standin = info.get("standin")
    return f'use its local stand-in instead: load_dataset("{standin}")' if standin else \
        f"the datasets that load here: {', '.join(dataset_names())}"


def _load_real(r: _Resolved, split: str, check_rows: int | None):
    """A real dataset from the Hub: loaded with 🤗 datasets, its first `check_rows` rows (None: all) checked like a
    file, then every row given the course's column names. Refused, naming the stand-in, where it cannot be had."""
    info = r.info
    repo = info.get("hf_hub_url")
    if repo is None:  # not on the Hub: downloaded by hand, then named in USER_REGISTRY
        kept = f", keeping the rows where {r.where}" if r.where else ""
        raise RealDataUnavailable(
            f"'{r.label}' is not on the Hugging Face Hub, so it cannot be loaded by name yet: download it by hand "
            f"({info.get('download', 'see its source')}), then name the file in {_shown(USER_REGISTRY)} as "
            f'{{"{r.label}": {{"file_name": "<path>"}}}}; load_dataset("{r.label}") then reads it with this '
            f"entry's format ({r.format}) and columns ({json.dumps(r.columns, ensure_ascii=False)}){kept}. "
            f"Here, {_standin_hint(info)}.")
    splits = info.get("splits", ["train"])
    if split.split("[")[0] not in splits:  # "train[:1000]" is a slice of train
        raise ValueError(f"dataset '{r.label}' has no split '{split}'; it has: {', '.join(splits)}")
    try:
        ds = _load_from_hub(repo, subset=info.get("subset"), split=split)
    except OSError as error:  # ConnectionError, OfflineModeIsEnabled, a missing repository or file, ...
        why = ("HF_HUB_OFFLINE=1: the Hugging Face Hub is out of reach and it is not in the local cache"
               if offline() else f"the Hugging Face Hub is out of reach or refused ({type(error).__name__}: {error})")
        raise RealDataUnavailable(f"'{r.label}' (the Hub dataset {repo}) cannot be loaded: {why}. "
                                  f"Here, {_standin_hint(info)}.") from error
    source = f"hf://datasets/{repo}" + (f" ({split})" if split != "train" else "")
    if r.where:
        ds = ds.filter(lambda row: _matches(row, r.where), desc=f"keeping the rows where {r.where}")
    if len(ds) == 0:
        raise DataFormatError(source, 1, None, "no rows" + (f" where {r.where}" if r.where else ""), "row")
    text_column = r.columns.get("text", "text")
    if r.format == "text" and text_column not in ds.column_names:
        raise DataFormatError(source, 1, text_column, f"missing column; found: {', '.join(ds.column_names)}", "row")
    checked = len(ds) if check_rows is None else min(check_rows, len(ds))
    for start in range(0, checked, 10_000):  # in slices, so that checking every row needs little memory
        rows = ds.select(range(start, min(start + 10_000, checked))).to_list()
        if r.format == "text":
            rows = [row[text_column] for row in rows]
        _validate(source, list(enumerate(rows, start + 1)), r.format, r.columns, r.tags, unit="row")
    if r.format == "text":
        ds = ds.select_columns([text_column])
        return ds.rename_column(text_column, "text") if text_column != "text" else ds
    wanted = _wanted(r.format, r.columns)
    if any(spec != default for _, spec, default, _, _ in wanted) or r.tags != _DEFAULT_TAGS:
        ds = ds.map(lambda row: _course_row(row, wanted, r.format, r.tags), remove_columns=ds.column_names,
                    desc=f"{r.label}: the course's column names")
    course = [default for _, _, default, _, _ in wanted if default in ds.column_names]
    return ds.select_columns(course + [c for c in ds.column_names if c not in course])


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
                 seed: int = 42, format: str | None = None, columns: dict[str, str] | None = None,
                 check_rows: int | None = HUB_CHECK_ROWS):
    """Load one or more datasets as a 🤗 `datasets.Dataset`, after checking every record.

    names: a registered name ('alpaca_zh'), several joined by commas ('alpaca_zh,alpaca_en') or
        a list; datasets of the same format are concatenated in order. A path to your own file
        works too, with `format=` (and `columns=` {role: column} if its column names differ).
        A real dataset's name ('alpaca_gpt4_zh', see `real_dataset_names()`) loads it from the
        Hugging Face Hub (or its local cache) with 🤗 datasets.
    split: 'train', or for datasets that have them 'dev' / 'test'.
    dev_ratio: if given, return a `DatasetDict` with 'train' and 'dev', split off with
        `train_test_split(test_size=dev_ratio, seed=seed)`.
    check_rows: for a dataset from the Hub, how many of its first rows are checked like a file's
        records before all of them get the course's column names (default 1,000; None: every row).

    Columns come back under the format's standard names (see the module docstring). Raises
    DataFormatError (file, line, field; for the Hub: address, row, field) for a bad record, ValueError
    for unknown names, mixed formats or a missing split, FileNotFoundError (with the command that
    regenerates the course data) for a missing file, and RealDataUnavailable (an OSError naming the
    local stand-in) for a real dataset that cannot be had here. Taught in notebooks/00_setup_and_tour.ipynb.
    """
    import datasets  # deferred: importing helpers.data stays cheap and side-effect free

    if dev_ratio is not None and not 0 < dev_ratio < 1:
        raise ValueError(f"dev_ratio must be between 0 and 1 (exclusive), got {dev_ratio}")
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown format '{format}'; known formats: {', '.join(FORMATS)}")
    if check_rows is not None and (not isinstance(check_rows, int) or isinstance(check_rows, bool) or check_rows < 1):
        raise ValueError(f"check_rows must be a whole number of rows (at least 1) or None for all, got {check_rows!r}")
    resolved = [_resolve(name, format, columns) for name in _names(names)]
    formats = {r.format for r in resolved}
    if len(formats) > 1:
        listing = ", ".join(f"{r.label} ({r.format})" for r in resolved)
        raise ValueError(f"cannot combine datasets of different formats: {listing}")
    parts = []
    for r in resolved:
        if r.files is None:
            parts.append(_load_real(r, split, check_rows))
            continue
        if split not in r.files:
            raise ValueError(f"dataset '{r.label}' has no split '{split}'; it has: {', '.join(r.files)}")
        path = r.files[split]
        if not path.exists():
            if r.own:
                raise FileNotFoundError(f"{path} not found (the file_name of '{r.label}' in {_shown(USER_REGISTRY)})")
            raise FileNotFoundError(f"{_shown(path)} not found; regenerate the course data with: {REGENERATE}")
        records = read_records(path, r.format)
        if r.where:
            kept = [(line, record) for line, record in records if _matches(record, r.where)]
            if records and not kept:
                raise DataFormatError(path, 1, None, f"no record where {r.where}")
            records = kept
        rows = _validate(path, records, r.format, r.columns, r.tags)
        try:
            parts.append(datasets.Dataset.from_list(rows))
        except Exception as e:  # e.g. an extra column whose type changes from row to row
            raise ValueError(f"{_shown(path)}: 🤗 datasets could not build a table: {e}") from e
    try:
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    except ValueError as e:
        labels = ", ".join(r.label for r in resolved)
        raise ValueError(f"cannot concatenate {labels}: their columns differ ({e})") from e
    if dev_ratio is None:
        return ds
    parted = ds.train_test_split(test_size=dev_ratio, seed=seed)
    return datasets.DatasetDict({"train": parted["train"], "dev": parted["test"]})
