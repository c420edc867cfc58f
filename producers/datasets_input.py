"""Hugging Face datasets as prompt input, and the column mapping every prompt file may use.

Inputs read through `datasets` (it must be importable; a clear error says so otherwise):
- a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
- any other folder of data files (Parquet, JSON lines, CSV, Arrow), as `load_dataset(folder)` reads it;
- a single `.arrow` file (a dataset's cache or shard file).
Parquet, JSON lines and CSV files keep the plain readers of producers/prompt_files.py,
which report bad rows by their line numbers (`datasets` would lose them).

Column mapping: `prompt`, `answer` and `messages` name the columns that hold the plain
prompt, the reference answer and the chat turns. With a mapping, columns that are
neither mapped nor a prompt-file field are kept in the request's metadata (as text)
instead of failing the row: a dataset's extra columns (ids, sources) are common, and
kept they are not lost. Without a mapping, unknown columns stay an error, as before.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

# The prompt-file fields (producers/prompt_files.py) and their aliases -> the field.
_FIELDS = {
    f: f
    for f in (
        "messages",
        "text",
        "reference",
        "task",
        "grammar",
        "grammar_kind",
        "grammar_spec",
        "session_id",
        "turn_index",
        "group_size",
        "metadata",
    )
} | {"prompt": "text", "answer": "reference", "verifier": "task"}


class ColumnMap(msgspec.Struct, frozen=True, kw_only=True):
    """Which dataset column feeds which prompt field (None: the field's own name)."""

    prompt: str | None = None
    answer: str | None = None
    messages: str | None = None
    prompt_as_chat: bool = False  # the prompt column becomes one user turn (the chat template applies)

    @property
    def empty(self) -> bool:
        """No column is mapped."""
        return self.prompt is None and self.answer is None and self.messages is None


class Preset(msgspec.Struct, frozen=True):
    """A known dataset shape: its columns and the reward function that scores it."""

    columns: ColumnMap
    task: str


# GSM8K: `question`, and `answer` = worked solution ending in `#### N` (the math reward reads N).
# The question is a user turn: sent as plain text, SmolLM2-Instruct answered both demo questions
# with end-of-sequence at once (1 token, finish "stop"; the issue-21 demo in the stop-18 note).
PRESETS: dict[str, Preset] = {
    "gsm8k": Preset(ColumnMap(prompt="question", answer="answer", prompt_as_chat=True), task="math")
}


def apply_columns(raw: dict[str, Any], columns: ColumnMap) -> dict[str, Any]:
    """`raw` with the mapped columns renamed to prompt fields and unknown columns moved to metadata."""
    if columns.empty:
        return raw
    renames = {
        src: dst
        for src, dst in (
            (columns.prompt, "text"),
            (columns.answer, "reference"),
            (columns.messages, "messages"),
        )
        if src is not None
    }
    missing = [src for src in renames if src not in raw]
    if missing:
        raise ValueError(f"column(s) {missing} not in the row (it has {sorted(raw)})")
    row: dict[str, Any] = {}
    extra: dict[str, str] = {}
    for key, value in raw.items():
        if key in renames and renames[key] == "text" and columns.prompt_as_chat:
            row["messages"] = [{"role": "user", "content": _text(value)}]
        elif key in renames:
            row[renames[key]] = _text(value) if renames[key] in ("text", "reference") else value
        elif key in _FIELDS and _FIELDS[key] not in renames.values():
            row[key] = value  # a prompt field no mapped column replaces
        elif value is not None:
            extra[key] = value if isinstance(value, str) else json.dumps(value, default=str)
    if extra:
        row["metadata"] = {**extra, **(row.get("metadata") or {})}
    return row


def _text(value: Any) -> Any:
    """Numbers as text (a GSM8K-like answer column may be typed int); other types stay for validation."""
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


def reads_through_datasets(path: Path) -> bool:
    """Whether `path` is an input only `datasets` reads (a folder or an .arrow file)."""
    return path.is_dir() or path.suffix.lower() == ".arrow"


def iter_dataset_rows(path: Path, split: str | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number from 1, row) of a dataset folder or .arrow file, through `datasets`."""
    # Local inputs only: a publish never downloads (and must not hang on an unreachable hub).
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError as err:
        raise ValueError(
            f"{path} is read through Hugging Face `datasets`, which is not installed: "
            "`pip install datasets` (or publish a .parquet/.jsonl/.csv file)"
        ) from err
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(str(path))
    elif path.is_dir():
        loaded = datasets.load_dataset(str(path), split=split)
        split = None  # load_dataset applied it (slices such as train[:100] included)
    else:
        loaded = datasets.Dataset.from_file(str(path))
    ds = _pick_split(loaded, split, path)
    for n, row in enumerate(ds, 1):
        yield n, dict(row)


def _pick_split(loaded: Any, split: str | None, path: Path) -> Any:
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        names = sorted(loaded)
        if split is None:
            if len(names) == 1:
                return loaded[names[0]]
            if "train" in loaded:
                return loaded["train"]
            raise ValueError(f"{path} has splits {names}: choose one with --split")
        if split not in loaded:
            raise ValueError(f"{path} has no split {split!r} (it has {names})")
        return loaded[split]
    if split is not None and getattr(loaded, "split", None) not in (None, split):
        raise ValueError(f"{path} is the single split {loaded.split!r}, not {split!r}")
    return loaded
