"""Datasets in: Hugging Face dataset folders and .arrow files, column mapping, the GSM8K preset, and its scoring."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from plumbing.config import Config
from producers.datasets_input import PRESETS, ColumnMap, apply_columns
from producers.prompt_files import FileDefaults, read_prompt_file
from schemas import PromptRequest
from tests.reward_helpers import make_completion
from verifier_workers.rewards.math import MathReward, reference_answer

GSM8K = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
        "altogether in April and May.\n#### 72",
    },
    {
        "question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
        "How much did she earn?",
        "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned "
        "0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
    },
    {"question": "A farm has 1,000 hens and buys 80 more. How many hens?", "answer": "1000 + 80 = 1080\n#### 1,080"},
]
GSM = PRESETS["gsm8k"]


def _defaults(task: str = GSM.task) -> FileDefaults:
    return FileDefaults(run_id="ds", task=task)


def _question(r: PromptRequest) -> str:
    """The GSM8K question of a request the preset made (its one user turn)."""
    assert r.messages is not None and len(r.messages) == 1
    return r.messages[0].content


def test_gsm8k_parquet_with_the_preset(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "gsm8k.parquet"
    pq.write_table(pa.Table.from_pylist(GSM8K), path)
    reqs, errors = read_prompt_file(path, _defaults(), columns=GSM.columns)
    assert errors == [] and len(reqs) == 3
    assert _question(reqs[0]) == GSM8K[0]["question"] and reqs[0].reference == GSM8K[0]["answer"]
    assert reqs[0].text is None and reqs[0].messages[0].role == "user"  # a user turn: the chat template applies
    assert {r.task for r in reqs} == {"math"}
    # Without the mapping the same file fails row by row (the finding).
    _, errors = read_prompt_file(path, _defaults())
    assert len(errors) == 3


def test_saved_dataset_dict_and_split(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "gsm8k_saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(GSM8K[:2]), "test": datasets.Dataset.from_list(GSM8K[2:])}
    ).save_to_disk(str(folder))
    train, _ = read_prompt_file(folder, _defaults(), columns=GSM.columns)  # two splits: train by default
    assert [r.reference for r in train] == [GSM8K[0]["answer"], GSM8K[1]["answer"]]
    test, _ = read_prompt_file(folder, _defaults(), columns=GSM.columns, split="test")
    assert [_question(r) for r in test] == [GSM8K[2]["question"]]
    with pytest.raises(ValueError, match="no split 'validation'"):
        read_prompt_file(folder, _defaults(), columns=GSM.columns, split="validation")


def test_single_saved_dataset_arrow_file_and_data_folder(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_list(GSM8K)
    ds.save_to_disk(str(tmp_path / "saved"))
    reqs, _ = read_prompt_file(tmp_path / "saved", _defaults(), columns=GSM.columns)
    assert len(reqs) == 3
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    reqs, _ = read_prompt_file(arrow, _defaults(), columns=GSM.columns)
    assert len(reqs) == 3
    # A folder of data files (a hub snapshot's shape), read by load_dataset offline.
    data = tmp_path / "snapshot" / "data"
    data.mkdir(parents=True)
    ds.to_json(str(data / "train.jsonl"))
    reqs, _ = read_prompt_file(tmp_path / "snapshot", _defaults(), columns=GSM.columns, split="train")
    assert [_question(r) for r in reqs] == [g["question"] for g in GSM8K]


def test_messages_column_and_extra_columns_kept_as_metadata(tmp_path: Path) -> None:
    import datasets

    rows = [{"conversation": [{"role": "user", "content": "2+2?"}], "solution": 4, "id": 17, "source": "toy"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "chat"))
    cols = ColumnMap(messages="conversation", answer="solution")
    (req,), errors = read_prompt_file(tmp_path / "chat", _defaults("math"), columns=cols)
    assert errors == []
    assert req.messages is not None and req.messages[0].content == "2+2?"
    assert req.reference == "4"  # an int column becomes the reference text
    assert req.metadata["id"] == "17" and req.metadata["source"] == "toy"


def test_mapping_errors_are_row_errors() -> None:
    with pytest.raises(ValueError, match="not in the row"):
        apply_columns({"q": "x"}, ColumnMap(prompt="question"))
    # A mapped column and a field of the same meaning: the mapped one wins, the other is kept aside.
    row = apply_columns({"question": "q", "prompt": "other"}, ColumnMap(prompt="question"))
    assert row["text"] == "q" and row["metadata"] == {"prompt": "other"}


def test_without_datasets_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "folder").mkdir()
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ValueError, match="`datasets`, which is not installed"):
        read_prompt_file(tmp_path / "folder", _defaults(), columns=GSM.columns)


def test_split_on_a_plain_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="--split applies"):
        read_prompt_file(path, _defaults(), split="train")


@pytest.mark.parametrize(("row", "expected"), [(GSM8K[0], "72"), (GSM8K[1], "10"), (GSM8K[2], "1,080")])
def test_math_reference_takes_the_number_after_the_gsm8k_mark(row: dict[str, str], expected: str) -> None:
    assert reference_answer(row["answer"]) == expected


@pytest.mark.parametrize(
    ("text", "correct"),
    [
        ("In May she sold 24, so altogether \\boxed{72}.", 1.0),
        ("<answer>72</answer>", 1.0),
        ("48 + 24 = 72", 1.0),  # last number
        ("She sold 24 in May.", 0.0),  # 24 appears in the worked solution, not after ####
    ],
)
async def test_gsm8k_reference_is_scored_by_the_math_reward(text: str, correct: float) -> None:
    score = await MathReward().score(make_completion(text, task="math", reference=GSM8K[0]["answer"]))
    assert score.components["correct"] == correct


async def test_gsm8k_thousands_reference() -> None:
    score = await MathReward().score(make_completion("\\boxed{1080}", task="math", reference=GSM8K[2]["answer"]))
    assert score.components["correct"] == 1.0


def test_cli_publishes_a_saved_gsm8k_dataset_and_tail_shows_it(cfg: Config, tmp_path: Path) -> None:
    """Real broker: `primerl publish FOLDER --preset gsm8k`, then `primerl tail rollout.prompts --run-id`."""
    import json
    import os
    import subprocess
    import uuid

    import datasets

    root = Path(__file__).resolve().parents[1]
    folder = tmp_path / "gsm8k"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(GSM8K)}).save_to_disk(str(folder))
    run_id = f"gsm-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": cfg.bootstrap, "REDIS_URL": cfg.redis_url, "PYTHONPATH": str(root)}
    state = ["--state-dir", str(tmp_path / "state")]
    primerl = [sys.executable, "-m", "primerl"]
    pub = [*primerl, "publish", str(folder), "--preset", "gsm8k", "--run-id", run_id, "--group-size", "2", *state]
    out = subprocess.run(pub, cwd=root, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert f"published 3 requests (6 samples) of run {run_id}" in out.stdout
    tail = [*primerl, "tail", "rollout.prompts", "--run-id", run_id, "--from-beginning", "--idle-s", "3", *state]
    out = subprocess.run(tail, cwd=root, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert sorted(ln["value"]["reference"] for ln in lines) == sorted(g["answer"] for g in GSM8K)
    assert {ln["value"]["task"] for ln in lines} == {"math"} and {ln["type"] for ln in lines} == {"PromptRequest"}
    # The question as a user turn (the CLI once rebuilt the preset's columns without it, and
    # SmolLM2-Instruct answered the raw questions with end-of-sequence at once).
    assert sorted(ln["value"]["messages"][0]["content"] for ln in lines) == sorted(g["question"] for g in GSM8K)
