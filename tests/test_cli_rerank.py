# SPDX-License-Identifier: Apache-2.0
"""``kalm-vllm-rerank`` end to end (real in-process engine on the tiny checkpoint)."""

import io
import json
from pathlib import Path

import pytest

from kalm_t5gemma2_vllm_plugin.cli import rerank as cli
from kalm_t5gemma2_vllm_plugin.constants import SAMPLE_DOCUMENTS, SAMPLE_QUERY
from kalm_t5gemma2_vllm_plugin.rerankers.reference import KaLMReranker
from tests.helpers import MARGIN_ATOL

pytestmark = pytest.mark.engine


def _rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
        encoding="utf-8",
    )
    return path


def test_without_input_ranks_the_sample(
    tiny_checkpoint: Path, reference: KaLMReranker, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        cli.main(
            ["--model", str(tiny_checkpoint), "--dtype", "float32", "--return-margin"]
        )
        == 0
    )
    rows = _rows(capsys.readouterr().out)
    expected = reference.rank(SAMPLE_QUERY, list(SAMPLE_DOCUMENTS), return_margin=True)
    assert [r["corpus_id"] for r in rows] == [e["corpus_id"] for e in expected]
    assert [r["rank"] for r in rows] == [1, 2]
    for row, want in zip(rows, expected, strict=True):
        assert row["document"] == SAMPLE_DOCUMENTS[want["corpus_id"]]
        assert abs(row["margin"] - want["margin"]) <= MARGIN_ATOL


def test_default_model_falls_back_offline_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cli.main([]) == 0
    captured = capsys.readouterr()
    assert "could not be fetched from the Hugging Face Hub" in captured.err
    assert "Falling back to a locally generated random test checkpoint" in captured.err
    assert len(_rows(captured.out)) == 2


def test_jsonl_in_input_order_with_ids_instructions_and_margins(
    tmp_path: Path, tiny_checkpoint: Path, reference: KaLMReranker
) -> None:
    instruction = "Given a web search query, retrieve passages that answer the query."
    rows = [
        {"query": "q one", "document": "first doc", "id": "a"},
        {"query": "q two", "document": "", "id": 7},
        {"query": "q one", "document": "third doc", "instruction": instruction},
        {"query": "北京?", "document": "北京是中国的首都"},
    ]
    source = _write_jsonl(tmp_path / "in.jsonl", rows[:2] + [""] + rows[2:])
    target = tmp_path / "nested" / "out.jsonl"
    assert (
        cli.main(
            [
                "--model",
                str(tiny_checkpoint),
                "--dtype",
                "float32",
                "--input-jsonl",
                str(source),
                "--output-jsonl",
                str(target),
                "--return-margin",
            ]
        )
        == 0
    )
    out = _rows(target.read_text(encoding="utf-8"))
    assert [r["id"] for r in out] == ["a", 7, 2, 3]  # row index when no id given
    assert [r["document"] for r in out] == [r["document"] for r in rows]
    assert "instruction" not in out[0] and out[2]["instruction"] == instruction
    expected = reference.margins([(r["query"], r["document"]) for r in rows[:2]])
    expected.append(
        reference.margins([("q one", "third doc")], instruction=instruction)[0]
    )
    expected += reference.margins([(rows[3]["query"], rows[3]["document"])])
    for row, margin in zip(out, expected, strict=True):
        assert abs(row["margin"] - margin) <= MARGIN_ATOL


def test_top_k_keeps_the_best_per_query(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [
        {"query": q, "document": f"document number {i} {q}"}
        for i in range(5)
        for q in ("alpha", "beta")
    ]
    source = _write_jsonl(tmp_path / "in.jsonl", rows)
    assert (
        cli.main(
            [
                "--model",
                str(tiny_checkpoint),
                "--input-jsonl",
                str(source),
                "--top-k",
                "2",
                "--return-margin",
            ]
        )
        == 0
    )
    out = _rows(capsys.readouterr().out)
    assert [r["query"] for r in out] == ["alpha", "alpha", "beta", "beta"]
    for query in ("alpha", "beta"):
        kept = [r["margin"] for r in out if r["query"] == query]
        assert kept == sorted(kept, reverse=True)


def test_malformed_row_stops_with_its_line_number(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"query": "q", "document": "ok"},
            {"query": "q", "document": 3},
            {"query": "q", "document": "after"},
        ],
    )
    assert (
        cli.main(["--model", str(tiny_checkpoint), "--input-jsonl", str(source)]) == 2
    )
    captured = capsys.readouterr()
    assert f"{source}:2: field 'document' must be a string" in captured.err
    assert [r["document"] for r in _rows(captured.out)] == ["ok"]


def test_skip_invalid_reports_and_keeps_every_valid_row(
    tmp_path: Path,
    tiny_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lines = [
        '{"query": "q", "document": "one"}',
        "not json",
        '{"query": "q", "document": "two", "instruction": 5}',
        "[1, 2]",
        '{"query": "q", "document": "three"}',
    ]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert (
        cli.main(
            ["--model", str(tiny_checkpoint), "--input-jsonl", "-", "--skip-invalid"]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert [r["document"] for r in _rows(captured.out)] == ["one", "three"]
    assert [r["id"] for r in _rows(captured.out)] == [0, 4]
    assert "Skipped 3 invalid row(s); first: <stdin>:2: invalid JSON" in captured.err


def test_bad_flags_fail_clearly(
    tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--model", str(tiny_checkpoint), "--encoder-chunk-size", "3"]) == 2
    assert "error: --encoder-chunk-size must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--top-k", "-1"])


def test_long_documents_and_request_chunk_size_flags(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import synthetic_text

    long = synthetic_text(300, seed=5)
    rows = [{"query": "q", "document": long}, {"query": "q", "document": "short"}]
    source = _write_jsonl(tmp_path / "in.jsonl", rows)
    args = ["--model", str(tiny_checkpoint), "--dtype", "float32", "--return-margin"]
    args += ["--input-jsonl", str(source), "--document-max-length", "64"]
    args += ["--long-document", "max", "--window-overlap", "8"]
    assert cli.main([*args, "--request-chunk-size", "16"]) == 0
    out = _rows(capsys.readouterr().out)
    want = KaLMReranker(
        str(tiny_checkpoint), dtype="float32", max_length=64, chunk_size=16
    ).predict(
        [(r["query"], r["document"]) for r in rows],
        long_document="max",
        window_overlap=8,
        return_margin=True,
    )
    assert out[0]["windows"] == want[0]["windows"] > 4 and out[1]["windows"] == 1
    for got, expected in zip(out, want, strict=True):
        assert abs(got["margin"] - expected["margin"]) <= 1e-4
        assert got["best_window"] == expected["best_window"]
    # a finer size than the engine's is one line naming the flag's field
    assert cli.main([*args, "--request-chunk-size", "2"]) == 2
    assert "finer than this engine's chunk size 4" in capsys.readouterr().err
