"""Prompt files (JSONL, Parquet, CSV, Hugging Face datasets) -> validated rows -> PromptRequest messages.

One row is one prompt (one GRPO group once fanned out). Accepted fields:

    messages      chat turns: a list of {"role", "content"} (in CSV: that list as JSON text)
    prompt|text   a plain prompt instead of `messages` (exactly one of the two)
    reference|answer  the reference answer the verifier compares against
    task|verifier the reward function's name (default: the file-wide --task)
    grammar       {"kind": ..., "spec": ...} (in CSV: JSON text), or the two columns
                  grammar_kind / grammar_spec
    session_id    multi-turn session (routing key: its turns share an engine)
    turn_index    the turn within the session
    group_size    per-row override of the file-wide fan-out
    metadata      {str: str}, kept on the request

Unknown fields are an error (a typo in a column name must not silently drop data),
unless columns are mapped (producers/datasets_input.py: `--prompt-column` etc.).
Dataset folders and .arrow files are read through `datasets`.
Every bad row is reported with its line (JSONL, CSV) or row number (Parquet).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from producers.datasets_input import ColumnMap, apply_columns, iter_dataset_rows, reads_through_datasets
from schemas import ChatMessage, Grammar, GrammarKind, PromptRequest, SamplingParams


class RowError(msgspec.Struct, frozen=True):
    """A row that failed validation: where it is and why."""

    line: int
    reason: str


class PromptRow(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One row of a prompt file, after renaming aliases (see the module doc)."""

    messages: list[ChatMessage] | None = None
    text: str | None = None
    reference: str | None = None
    task: str | None = None
    grammar: Grammar | None = None
    session_id: str | None = None
    turn_index: int = 0
    group_size: int | None = None
    metadata: dict[str, str] = {}


class FileDefaults(msgspec.Struct, frozen=True, kw_only=True):
    """What every row gets unless it says otherwise."""

    run_id: str
    task: str = "none"
    group_size: int = 1
    sampling: SamplingParams = SamplingParams()
    grammar: Grammar | None = None
    system_prompt: str | None = None


_ALIASES = {"prompt": "text", "answer": "reference", "verifier": "task"}
# CSV cells are text: these hold JSON there.
_JSON_CELLS = ("messages", "grammar", "metadata")


def _normalise(raw: dict[str, Any], from_text_cells: bool) -> dict[str, Any]:
    """Aliases renamed, empty cells dropped, JSON cells parsed, grammar columns merged."""
    row: dict[str, Any] = {}
    for key, value in raw.items():
        if value is None or (from_text_cells and value == ""):
            continue
        name = _ALIASES.get(key, key)
        if name in row:
            raise ValueError(f"field {key!r} given twice (as {name!r})")
        if from_text_cells and name in _JSON_CELLS and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise ValueError(f"column {key!r} is not valid JSON: {err.msg}") from err
        if from_text_cells and name in ("turn_index", "group_size") and isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ValueError(f"column {key!r} must be an integer, got {value!r}") from None
        row[name] = value
    kind, spec = row.pop("grammar_kind", None), row.pop("grammar_spec", None)
    if kind is not None:
        if "grammar" in row:
            raise ValueError("both `grammar` and `grammar_kind` given")
        row["grammar"] = {"kind": kind, "spec": spec or ""}
    elif spec is not None:
        raise ValueError("`grammar_spec` without `grammar_kind`")
    return row


def parse_row(raw: dict[str, Any], *, from_text_cells: bool = False) -> PromptRow:
    """Validate one raw row; ValueError says what is wrong."""
    if not isinstance(raw, dict):
        raise ValueError(f"a row must be an object, got {type(raw).__name__}")
    row_dict = _normalise(raw, from_text_cells)
    try:
        row = msgspec.convert(row_dict, type=PromptRow)
    except msgspec.ValidationError as err:
        raise ValueError(str(err)) from err
    if (row.messages is None) == (row.text is None):
        raise ValueError("exactly one of `messages` or `prompt`/`text` is required")
    if row.messages is not None and not row.messages:
        raise ValueError("`messages` is empty")
    if row.group_size is not None and row.group_size < 1:
        raise ValueError("`group_size` must be >= 1")
    if row.grammar is not None and row.grammar.kind is GrammarKind.CHOICE:
        row.grammar.choices()  # raises ValueError for a bad choice list
    return row


def to_request(row: PromptRow, defaults: FileDefaults, source_line: int) -> PromptRequest:
    """The PromptRequest of a validated row (a new id; the group id is the request id)."""
    messages = row.messages
    if messages is not None and defaults.system_prompt and messages[0].role != "system":
        messages = [ChatMessage("system", defaults.system_prompt), *messages]
    return PromptRequest(
        run_id=defaults.run_id,
        messages=messages,
        text=row.text,
        group_size=row.group_size or defaults.group_size,
        session_id=row.session_id,
        turn_index=row.turn_index,
        sampling=defaults.sampling,
        grammar=row.grammar or defaults.grammar,
        task=row.task or defaults.task,
        reference=row.reference,
        metadata={**row.metadata, "source_line": str(source_line)},
    )


def iter_raw_rows(path: Path, split: str | None = None) -> Iterator[tuple[int, dict[str, Any] | Exception, bool]]:
    """(line or row number, raw row or the error reading it, whether cells are text) of a file.

    The format comes from the suffix: .jsonl/.ndjson/.json, .parquet, .csv/.tsv; a folder
    or an .arrow file is a Hugging Face dataset (`split` picks one of its splits).
    """
    suffix = path.suffix.lower()
    if reads_through_datasets(path):
        for n, ds_row in iter_dataset_rows(path, split):
            yield n, ds_row, False
        return
    if split is not None:
        raise ValueError(f"--split applies to a dataset folder or .arrow file, not to {path.name}")
    if suffix in (".jsonl", ".ndjson", ".json"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line), False
                except json.JSONDecodeError as err:
                    yield n, ValueError(f"not valid JSON: {err.msg} (column {err.colno})"), False
    elif suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            for raw in reader:
                if None in raw:  # more cells than header columns
                    yield reader.line_num, ValueError(f"{len(raw[None])} cell(s) beyond the header's columns"), True
                    continue
                yield reader.line_num, dict(raw), True
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for n, raw in enumerate(table.to_pylist(), 1):
            yield n, raw, False
    else:
        raise ValueError(f"unknown prompt file type {suffix!r}: use .jsonl, .parquet or .csv")


def read_prompt_file(
    path: Path,
    defaults: FileDefaults,
    *,
    strict: bool = False,
    columns: ColumnMap | None = None,
    split: str | None = None,
) -> tuple[list[PromptRequest], list[RowError]]:
    """Every valid row's request and every bad row's error; `strict` raises at the first bad row.

    `columns` maps dataset columns onto the prompt fields; `split` picks a dataset's split.
    ValueError (not a row's): the input itself cannot be read.
    """
    requests: list[PromptRequest] = []
    errors: list[RowError] = []
    for line, raw, text_cells in iter_raw_rows(path, split):
        try:
            if isinstance(raw, Exception):
                raise raw
            if columns is not None and isinstance(raw, dict):
                raw = apply_columns(raw, columns)
            requests.append(to_request(parse_row(raw, from_text_cells=text_cells), defaults, line))
        except ValueError as err:
            error = RowError(line=line, reason=str(err))
            if strict:
                raise BadRow(path, error) from err
            errors.append(error)
    return requests, errors


class BadRow(ValueError):
    """`--strict`: the first bad row stops the publish."""

    def __init__(self, path: Path, error: RowError) -> None:
        super().__init__(f"{path}:{error.line}: {error.reason}")
        self.error = error
