# SPDX-License-Identifier: Apache-2.0
"""kalm-vllm-eval's inputs without an engine: run files in both formats, the
depth cut and its tie order, the BM25 first stage, the journal, and bad input
(an error naming the file and line, exit code 2, no traceback)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kalm_t5gemma2_vllm_plugin.cli.eval import main
from kalm_t5gemma2_vllm_plugin.errors import KaLMInputError
from kalm_t5gemma2_vllm_plugin.evaluation import (
    bm25_run,
    document_text,
    format_trec,
    prepare,
    read_corpus,
    read_qrels,
    read_queries,
    read_run,
    top_candidates,
)
from kalm_t5gemma2_vllm_plugin.evaluation.journal import JOURNAL_NAME, Journal
from kalm_t5gemma2_vllm_plugin.evaluation.report import depth_notes

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "beir-fixture"
QUERIES = {"q1", "q2"}


# --- the fixture ---------------------------------------------------------------
def test_fixture_is_a_labelled_beir_dataset() -> None:
    corpus = read_corpus(FIXTURE / "corpus.jsonl")
    queries = read_queries(FIXTURE / "queries.jsonl")
    qrels = read_qrels(FIXTURE / "qrels" / "test.tsv", queries)
    assert len(corpus) == 120 and len(queries) == 32 and len(qrels) == 30
    assert {g for docs in qrels.values() for g in docs.values()} == {0, 1, 2}
    assert all(any(g > 0 for g in docs.values()) for docs in qrels.values())
    assert corpus["doc001"] == "Photosynthesis\n" + (
        "Green plants capture sunlight with chlorophyll and use its energy to join "
        "carbon dioxide and water into glucose, releasing oxygen as a by-product."
    )
    assert corpus["doc003"].startswith("Autumn leaves")  # empty title: text alone
    run = read_run(FIXTURE / "run.dice.trec", queries).scores
    assert set(run) <= set(queries) and len(run) == 31


def test_document_text_joins_title_and_text_with_a_newline() -> None:
    assert document_text("T", "body") == "T\nbody"
    assert document_text("", "body") == "body"


# --- run files -------------------------------------------------------------------
TREC = "q1 Q0 d1 1 2.5 bm25\nq1 Q0 d2 2 1.25 bm25\n\nq2 Q0 d3 1 -0.5 bm25\n"
JSON_RUN = {"q1": {"d1": 2.5, "d2": 1.25}, "q2": {"d3": -0.5}}


def test_trec_and_json_runs_read_the_same(tmp_path: Path) -> None:
    trec = tmp_path / "run.trec"
    trec.write_text(TREC)
    beir = tmp_path / "run.json"
    beir.write_text(json.dumps(JSON_RUN, indent=2))
    assert read_run(trec, QUERIES).scores == JSON_RUN
    assert read_run(beir, QUERIES).scores == JSON_RUN


def test_run_format_is_told_by_content_not_name(tmp_path: Path) -> None:
    path = tmp_path / "looks-like.trec"
    path.write_text("\n  " + json.dumps(JSON_RUN))
    assert read_run(path, QUERIES).scores == JSON_RUN


def test_depth_cut_keeps_the_best_and_breaks_ties_by_document_id() -> None:
    run = {"q1": {"b": 1.0, "a": 1.0, "c": 2.0, "d": 0.5}, "q0": {"z": 1.0}}
    assert top_candidates(run, 3) == {
        "q0": [("z", 1.0)],
        "q1": [("c", 2.0), ("a", 1.0), ("b", 1.0)],
    }
    assert top_candidates(run, 1)["q1"] == [("c", 2.0)]


def test_trec_output_is_deterministic_and_repr_exact(tmp_path: Path) -> None:
    score = 0.1 + 0.2  # 0.30000000000000004: str() and %g would round it
    lines = list(format_trec({"q2": {"b": score, "a": score}, "q1": {"x": 1.0}}, "t"))
    assert lines == [
        "q1 Q0 x 1 1.0 t\n",
        "q2 Q0 a 1 0.30000000000000004 t\n",
        "q2 Q0 b 2 0.30000000000000004 t\n",
    ]
    path = tmp_path / "round-trip.trec"
    path.write_text("".join(lines))
    assert read_run(path, {"q1", "q2"}).scores["q2"]["a"] == score


# --- BM25 --------------------------------------------------------------------------
def test_bm25_first_stage_is_deterministic_on_the_fixture() -> None:
    corpus = read_corpus(FIXTURE / "corpus.jsonl")
    queries = read_queries(FIXTURE / "queries.jsonl")
    qrels = read_qrels(FIXTURE / "qrels" / "test.tsv")
    first = bm25_run(corpus, queries, 100)
    shuffled = dict(reversed(list(corpus.items())))  # another index order
    assert bm25_run(shuffled, queries, 100) == first
    assert list(format_trec(first, "bm25")) == list(format_trec(first, "bm25"))
    # plumbing, not quality: the query's own topic comes first for most queries
    hits = sum(
        qrels[q].get(next(iter(top_candidates(first, 1)[q]))[0], 0) > 0 for q in qrels
    )
    assert hits >= 20, hits
    assert all(0 < len(docs) <= 100 for docs in first.values())
    assert all(s > 0 for docs in first.values() for s in docs.values())
    assert {len(docs) for docs in bm25_run(corpus, queries, 3).values()} == {3}


# --- the journal ----------------------------------------------------------------
HEADER = {"arguments": {"depth": 100}, "engine": {"model": "m"}}


def test_journal_resumes_and_drops_a_torn_last_line(tmp_path: Path) -> None:
    with Journal(tmp_path, HEADER) as journal:
        journal.append("q1", {"reranked": {"d1": 0.25}})
        journal.append("q2", {"reranked": {"d2": 0.5}})
    path = tmp_path / JOURNAL_NAME
    with open(path, "a") as f:
        f.write('{"qid": "q3", "scores": {"rer')  # killed mid-write
    with Journal(tmp_path, HEADER) as journal:
        assert journal.done == {
            "q1": {"reranked": {"d1": 0.25}},
            "q2": {"reranked": {"d2": 0.5}},
        }
        journal.append("q3", {"reranked": {"d3": 0.75}})
    assert len(path.read_text().splitlines()) == 4
    with Journal(tmp_path, HEADER, restart=True) as journal:
        assert journal.done == {}


def test_journal_with_other_settings_names_the_difference(tmp_path: Path) -> None:
    Journal(tmp_path, HEADER).close()
    other = {"arguments": {"depth": 50}, "engine": {"model": "m"}}
    message = (
        f"{tmp_path / JOURNAL_NAME} was written by a run with other settings: "
        "arguments.depth: 100 (journal) vs 50 (now). Rerun with the same arguments "
        "to resume it, or pass --restart to start over."
    )
    with pytest.raises(KaLMInputError, match=re.escape(message)):
        Journal(tmp_path, other)
    with pytest.raises(KaLMInputError, match=re.escape("arguments.depth")):
        Journal.check_section(tmp_path, "arguments", other["arguments"])


def test_cli_refuses_to_resume_with_other_arguments_before_any_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    run = str(FIXTURE / "run.dice.trec")
    plan = prepare(FIXTURE, out, run=run, depth=20)
    Journal(out, {"arguments": plan.arguments, "engine": {}}).close()
    assert (
        main([str(FIXTURE), "--output", str(out), "--run", run, "--depth", "10"]) == 2
    )
    err = capsys.readouterr().err
    assert "arguments.depth: 20 (journal) vs 10 (now)" in err
    assert "--restart" in err and "Traceback" not in err


def test_depth_note_names_the_recalls_equal_by_construction() -> None:
    assert "Recall@100 of the reranked run equals" in depth_notes(100)[0]
    assert "Recall@10 and Recall@100" in depth_notes(10)[0]
    assert depth_notes(101) == []


# --- bad input: file and line, exit code 2, no traceback --------------------------
def _dataset(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(FIXTURE, root)
    return root


def _edit(path: Path, line: int, text: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[line - 1] = text
    path.write_text("".join(lines))


BAD_INPUTS = [
    ("queries.jsonl", 3, '{"_id": "q03", "text": \n', "queries.jsonl:3: invalid JSON"),
    (
        "corpus.jsonl",
        2,
        '{"_id": "doc002", "title": "t"}\n',
        "corpus.jsonl:2: field 'text' must be a string",
    ),
    (
        "corpus.jsonl",
        5,
        '["doc005"]\n',
        "corpus.jsonl:5: a record must be a JSON object",
    ),
    (
        "qrels/test.tsv",
        4,
        "q01\tdoc004\n",
        "test.tsv:4: expected 3 tab-separated fields (query-id, corpus-id, score), got 2",
    ),
    (
        "qrels/test.tsv",
        2,
        "q01\tdoc001\thigh\n",
        "test.tsv:2: score 'high' is not an integer relevance label",
    ),
    (
        "qrels/test.tsv",
        3,
        "q99\tdoc001\t1\n",
        "test.tsv:3: query 'q99' is not in queries.jsonl",
    ),
    (
        "run.dice.trec",
        2,
        "q01 Q0 doc063 2 0.2353\n",
        "run.dice.trec:2: a TREC run line has 6 fields (qid Q0 docid rank score tag), got 5",
    ),
    (
        "run.dice.trec",
        4,
        "q77 Q0 doc063 4 0.1 dice\n",
        "run.dice.trec:4: query 'q77' is not in queries.jsonl",
    ),
    (
        "run.dice.trec",
        3,
        "q01 Q0 doc001 3 0.1 dice\n",
        "run.dice.trec:3: query 'q01' lists document 'doc001' again (first on line 1)",
    ),
    (
        "run.dice.trec",
        2,
        "q01 Q0 doc999 2 0.2353 dice\n",
        "run.dice.trec:2: 1 candidate document(s) are not in",
    ),
    ("run.dice.trec", 1, "q01 Q0 doc001 1 nan dice\n", "run.dice.trec:1: score 'nan'"),
]


@pytest.mark.parametrize(
    ("name", "line", "text", "message"),
    BAD_INPUTS,
    ids=[
        "queries-bad-json",
        "corpus-no-text",
        "corpus-not-object",
        "qrels-two-fields",
        "qrels-bad-label",
        "qrels-unknown-query",
        "run-five-fields",
        "run-unknown-query",
        "run-duplicate",
        "run-unknown-document",
        "run-nan-score",
    ],
)
def test_bad_input_names_file_and_line_and_exits_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    line: int,
    text: str,
    message: str,
) -> None:
    root = _dataset(tmp_path)
    _edit(root / name, line, text)
    argv = [str(root), "--output", str(tmp_path / "out"), "--run"]
    assert main([*argv, str(root / "run.dice.trec")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kalm-vllm-eval: error: ") and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / JOURNAL_NAME).exists()


def test_json_run_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    path.write_text('{\n  "q1": {"d1": 1.0},\n  "q2": {"d2": "high"}\n}\n')
    with pytest.raises(KaLMInputError, match=re.escape(f"{path}:3: query 'q2'")):
        read_run(path, QUERIES)
    path.write_text('{\n  "q1": {"d1": 1.0,}\n}\n')
    with pytest.raises(KaLMInputError, match=re.escape(f"{path}:2: invalid JSON")):
        read_run(path, QUERIES)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--split", "dev2"], "qrels/dev2.tsv: no such file (splits here: dev, test)"),
        (["--run", "missing.trec"], "missing.trec: no such file (the first-stage run)"),
        (["--chunk-size-sweep", "4", "6"], "--chunk-size-sweep must be one of"),
        # a valid sweep (any order) passes, and the run file is what fails
        (["--chunk-size-sweep", "8", "4", "2", "--run", "no.trec"], "no.trec: no such"),
        (["--long-document", "max", "--depth", "0"], "--depth must be >= 1"),
        (["--decoder-only"], "--decoder-only needs --passage-store"),
    ],
    ids=["missing-split", "missing-run", "sweep-size", "sweep-ok", "depth", "decoder"],
)
def test_cli_option_errors(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    try:
        code = main([str(FIXTURE), "--output", str(tmp_path / "out"), *argv])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


def test_missing_dataset_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")]) == 2
    assert "nowhere: no such directory (the BEIR dataset)" in capsys.readouterr().err


def test_evaluation_imports_no_engine_and_no_numba() -> None:
    code = (
        "import sys\n"
        "import kalm_t5gemma2_vllm_plugin.evaluation, kalm_t5gemma2_vllm_plugin.cli.eval\n"
        "heavy = {'torch', 'vllm', 'numba', 'ranx', 'bm25s', 'matplotlib'}\n"
        "assert not heavy & set(sys.modules), heavy & set(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
