# SPDX-License-Identifier: Apache-2.0
"""``evaluate``: a BEIR-layout dataset, a first stage, the reranker, the metrics.

Steps: read and check every input (before any engine starts, so bad input
fails at once), cut the first stage to ``depth`` per query, rerank what the
journal has not finished, write the runs from the journal, then the metrics,
the reports and the plot.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kalm_t5gemma2_vllm_plugin.constants import MODEL_ID
from kalm_t5gemma2_vllm_plugin.errors import KaLMInputError
from kalm_t5gemma2_vllm_plugin.evaluation.beir import (
    BeirDataset,
    Qrels,
    read_corpus,
    read_qrels,
    read_queries,
)
from kalm_t5gemma2_vllm_plugin.evaluation.first_stage import (
    BM25_SETTINGS,
    bm25_run_file,
)
from kalm_t5gemma2_vllm_plugin.evaluation.journal import Journal
from kalm_t5gemma2_vllm_plugin.evaluation.rerank import (
    RerankStats,
    rerank_queries,
    run_name,
)
from kalm_t5gemma2_vllm_plugin.evaluation.runs import (
    Candidates,
    Run,
    RunFile,
    read_run,
    top_candidates,
)
from kalm_t5gemma2_vllm_plugin.validation import (
    check_positive_int,
    check_request_chunk_size,
    parse_chunk_size,
)
from kalm_t5gemma2_vllm_plugin.windows import (
    check_long_document,
)

if TYPE_CHECKING:
    from kalm_t5gemma2_vllm_plugin.rerankers.vllm import KaLMVLLMReranker

__all__ = [
    "EvalPlan",
    "engine_identity",
    "evaluate",
    "prepare",
    "rerank_and_report",
]


@dataclass
class EvalPlan:
    """Everything read and checked before an engine starts."""

    dataset: BeirDataset
    output: Path
    queries: dict[str, str]
    qrels: Qrels
    #: Document id to text; ``None`` when documents go by id (passage store).
    corpus: dict[str, str] | None
    candidates: Candidates
    first_stage: dict[str, Any]
    depth: int
    long_document: str | None
    chunk_sizes: list[int] | None
    passage_store: str | None
    arguments: dict[str, Any]
    #: Drop the journal instead of resuming it.
    restart: bool = False
    #: ``time.perf_counter()`` when the evaluation began (for the wall time).
    started: float = 0.0


def _first_stage(
    run: str | os.PathLike[str] | None,
    queries: Mapping[str, str],
    evaluated: list[str],
    dataset: BeirDataset,
    depth: int,
) -> tuple[Candidates, dict[str, Any], RunFile | None]:
    if run is None:
        corpus_path = str(dataset.corpus_path)
        scores = bm25_run_file(corpus_path, {q: queries[q] for q in evaluated}, depth)
        info = {"source": "bm25", "run_file": None, "settings": dict(BM25_SETTINGS)}
        run_file = None
    else:
        run_file = read_run(run, queries)
        scores = run_file.scores
        info = {"source": "run", "run_file": str(run), "settings": None}
    candidates = top_candidates({q: scores.get(q, {}) for q in evaluated}, depth)
    return candidates, info, run_file


def _check_known(
    candidates: Candidates,
    known: Collection[str],
    where: str,
    run_file: RunFile | None,
) -> None:
    """Every candidate must be a document the reranker can read."""
    missing = sorted({d for docs in candidates.values() for d, _ in docs} - set(known))
    if not missing:
        return
    first = next(
        (q, d) for q in sorted(candidates) for d, _ in candidates[q] if d in missing
    )
    at = f"{run_file.where(*first)}: " if run_file is not None else ""
    shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
    raise KaLMInputError(
        f"{at}{len(missing)} candidate document(s) are not in {where}: {shown} "
        f"(first: {first[1]!r} for query {first[0]!r})",
        field="document_ids" if "store" in where else "run",
    )


def _store_ids(uri: str) -> list[str]:
    from kalm_t5gemma2_vllm_plugin.store.uri import open_store

    store = open_store(uri)
    try:
        return store.ids()
    finally:
        store.close()


def _inputs_digest(
    queries: Mapping[str, str], candidates: Candidates, corpus: Mapping[str, str] | None
) -> str:
    """What the reranker reads, in order: a changed query, candidate list or
    document text is a different evaluation (moving the files is not)."""
    digest = hashlib.sha256()
    for query_id in sorted(candidates):
        docs = [
            [d, None if corpus is None else corpus[d]] for d, _ in candidates[query_id]
        ]
        digest.update(json.dumps([query_id, queries[query_id], docs]).encode())
    return digest.hexdigest()


def _chunk_sizes(sweep: Sequence[int] | None) -> list[int] | None:
    if sweep is None:
        return None
    sizes = sorted({parse_chunk_size(n, "chunk_size_sweep") or 1 for n in sweep})
    for n in sizes:
        check_request_chunk_size(n, sizes[0], "chunk_size_sweep")
    return sizes


def prepare(
    data_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    run: str | os.PathLike[str] | None = None,
    depth: int = 100,
    split: str = "test",
    passage_store: str | os.PathLike[str] | None = None,
    long_document: str | None = None,
    chunk_size_sweep: Sequence[int] | None = None,
    restart: bool = False,
) -> EvalPlan:
    """Read and check the inputs and the journal's arguments; start nothing.

    The arguments are those of ``evaluate``; ``rerank_and_report`` runs the plan.
    """
    started = time.perf_counter()
    depth = check_positive_int(depth, "depth")
    if long_document is not None:
        long_document = check_long_document(long_document)
    chunk_sizes = _chunk_sizes(chunk_size_sweep)
    dataset = BeirDataset(Path(data_dir), split)
    dataset.check_layout()
    queries = read_queries(dataset.queries_path)
    qrels = read_qrels(dataset.qrels_path, queries)
    evaluated = sorted(qrels)
    store = None if passage_store is None else os.fspath(passage_store)
    needs_text = store is None or run is None
    corpus = read_corpus(dataset.corpus_path) if needs_text else None
    candidates, first_stage, run_file = _first_stage(
        run, queries, evaluated, dataset, depth
    )
    if store is not None:
        _check_known(candidates, _store_ids(store), f"the passage store {store}", None)
        corpus = None  # documents go by id
    else:
        assert corpus is not None
        _check_known(candidates, corpus, str(dataset.corpus_path), run_file)
    arguments = {
        "split": split,
        "depth": depth,
        "first_stage": first_stage["source"],
        "documents_by_id": store is not None,
        "long_document": long_document,
        "chunk_size_sweep": chunk_sizes,
        "inputs_sha256": _inputs_digest(queries, candidates, corpus),
    }
    output = Path(output_dir)
    if not restart:
        Journal.check_section(output, "arguments", arguments)
    first_stage["depth"] = depth
    return EvalPlan(
        dataset, output, queries, qrels, corpus, candidates, first_stage, depth,
        long_document, chunk_sizes, store, arguments, restart, started,
    )  # fmt: skip


def _rank_runs(plan: EvalPlan) -> dict[str, dict[str, Any]]:
    """Reranked run name to its extra ``rank`` keywords."""
    base = {} if plan.long_document is None else {"long_document": plan.long_document}
    if plan.chunk_sizes is None:
        return {run_name(None): base}
    finest = plan.chunk_sizes[0]
    return {
        run_name(n): base if n == finest else {**base, "encoder_chunk_size": n}
        for n in plan.chunk_sizes
    }


def engine_identity(reranker: KaLMVLLMReranker) -> dict[str, Any]:
    """What the scores depend on, of a started reranker (the journal's
    ``engine`` section and the report's)."""
    from kalm_t5gemma2_vllm_plugin import __version__
    from kalm_t5gemma2_vllm_plugin.checkpoints.hub import model_fingerprint

    settings = reranker.settings
    return {
        "model": reranker.model,
        "model_fingerprint": model_fingerprint(reranker.model_path),
        "dtype": reranker.dtype,
        "encoder_chunk_size": settings.chunk_size,
        "document_max_length": settings.document_max_length,
        "query_max_length": settings.query_max_length,
        "instruction": reranker.instruction,
        "system_instruction": reranker.options.system_instruction,
        "decoder_only": settings.decoder_only,
        "passage_cache_mb": settings.passage_cache_mb,
        "passage_store": reranker.options.passage_store,
        "plugin_version": __version__,
    }


def evaluate(
    data_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    run: str | os.PathLike[str] | None = None,
    depth: int = 100,
    split: str = "test",
    reranker: KaLMVLLMReranker | None = None,
    model: str = MODEL_ID,
    passage_store: str | os.PathLike[str] | None = None,
    long_document: str | None = None,
    chunk_size_sweep: Sequence[int] | None = None,
    restart: bool = False,
    progress: bool | None = None,
    plot: bool = True,
    **reranker_kwargs: Any,
) -> dict[str, Any]:
    """Rerank a first stage on a BEIR-layout dataset and report the metrics.

    Args:
        data_dir: ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``.
        output_dir: where the runs, ``report.json``/``report.md``, the plot and
            the resume journal go; a rerun with the same arguments resumes.
        run: first-stage run (TREC or BEIR-style JSON); ``None``: BM25.
        depth: candidates reranked per query (the first stage's best).
        split: the qrels file; only its queries are evaluated.
        reranker: a started ``KaLMVLLMReranker`` to use (not closed here);
            ``None``: one is started from ``model`` and ``reranker_kwargs``
            (``passage_cache_mb`` defaults to 0 here: each query is scored from
            a fresh state, so a resumed run writes the same bytes).
        passage_store: documents go by id from this store instead of as text
            (a new reranker loads it; a given one must have been started with
            it). Without it documents go as text, whatever the reranker holds.
        long_document: ``"truncate"``, ``"max"`` or ``"mean"``, passed to
            ``rank`` (only when set).
        chunk_size_sweep: chunk sizes to compare in one run: one engine at the
            finest, coarser ones by per-request compression.
        restart: drop the journal instead of resuming it.
        progress: tqdm bar on stderr; ``None``: when stderr is a terminal.
        plot: write the PNG (needs matplotlib).

    Returns:
        The ``report.json`` dict.

    Example:
        >>> report = evaluate("tests/data/beir-fixture", "out", model=checkpoint,
        ...                   dtype="float32", depth=20)
        >>> report["metrics"]["reranked"]["ndcg@10"], report["queries_evaluated"]
        (0.41..., 30)
    """
    if reranker is not None and passage_store is not None:
        _check_same_store(reranker, os.fspath(passage_store))
    plan = prepare(
        data_dir, output_dir, run=run, depth=depth, split=split,
        passage_store=passage_store, long_document=long_document,
        chunk_size_sweep=chunk_size_sweep, restart=restart,
    )  # fmt: skip
    return rerank_and_report(
        plan, reranker=reranker, model=model, progress=progress, plot=plot,
        **reranker_kwargs,
    )  # fmt: skip


def rerank_and_report(
    plan: EvalPlan,
    *,
    reranker: KaLMVLLMReranker | None = None,
    model: str = MODEL_ID,
    progress: bool | None = None,
    plot: bool = True,
    **reranker_kwargs: Any,
) -> dict[str, Any]:
    """Run a ``prepare``d plan: start an engine unless ``reranker`` is given,
    rerank what the journal lacks, write every output; the report dict."""
    runs = _rank_runs(plan)
    if reranker is not None:
        _check_engine_chunk_size(plan, reranker)
        return _report(plan, _rerank(plan, reranker, runs, progress), plot)
    from kalm_t5gemma2_vllm_plugin.rerankers.vllm import KaLMVLLMReranker

    if plan.chunk_sizes is not None:
        reranker_kwargs["encoder_chunk_size"] = plan.chunk_sizes[0]
    # Off by default here: each query is then scored from a fresh state, and a
    # resumed run is byte-identical to an uninterrupted one (see rerank.py).
    reranker_kwargs.setdefault("passage_cache_mb", 0.0)
    engine_started = time.perf_counter()
    with KaLMVLLMReranker(
        model, passage_store=plan.passage_store, **reranker_kwargs
    ) as own:
        startup = time.perf_counter() - engine_started
        reranked = _rerank(plan, own, runs, progress)
    # The engine is closed first: its threads would compete with the metrics.
    reranked.startup = startup
    return _report(plan, reranked, plot)


def _check_same_store(reranker: KaLMVLLMReranker, path: str) -> None:
    held = reranker.options.passage_store
    if held is None or _location(held) != _location(path):
        held = "no passage store" if held is None else f"the store {held}"
        raise KaLMInputError(
            f"passage_store {path}: the reranker given was started with {held}; "
            f"start it with KaLMVLLMReranker(..., passage_store={str(path)!r}).",
            field="passage_store",
        )


def _location(uri: str) -> str:
    """A store's location, local paths resolved (URIs as given)."""
    return uri if "://" in uri else os.path.realpath(uri)


def _check_engine_chunk_size(plan: EvalPlan, reranker: KaLMVLLMReranker) -> None:
    engine = reranker.settings.chunk_size or 1
    if plan.chunk_sizes is not None and plan.chunk_sizes[0] != engine:
        raise KaLMInputError(
            f"chunk_size_sweep {plan.chunk_sizes} needs an engine at its finest "
            f"size {plan.chunk_sizes[0]}; this reranker's encoder chunk size is "
            f"{engine}.",
            field="chunk_size_sweep",
        )


@dataclass
class _Reranked:
    """What the reranking step hands to the outputs."""

    engine: dict[str, Any]
    runs: dict[str, Run]
    stats: RerankStats
    resumed: int
    startup: float = 0.0


def _rerank(
    plan: EvalPlan,
    reranker: KaLMVLLMReranker,
    runs: dict[str, dict[str, Any]],
    progress: bool | None,
) -> _Reranked:
    engine = engine_identity(reranker)
    header = {"arguments": plan.arguments, "engine": engine}
    with Journal(plan.output, header, restart=plan.restart) as journal:
        resumed = len(journal.done)
        stats = rerank_queries(
            reranker,
            plan.queries,
            plan.candidates,
            plan.corpus,
            journal,
            runs,
            progress=progress,
        )
        done = journal.done
    reranked = {
        name: {q: done[q][name] for q in plan.candidates if q in done} for name in runs
    }
    engine["long_document"] = plan.long_document or "truncate (default)"
    return _Reranked(engine, reranked, stats, resumed)


def _report(plan: EvalPlan, reranked: _Reranked, plot: bool) -> dict[str, Any]:
    from kalm_t5gemma2_vllm_plugin.evaluation.output import write_outputs

    return write_outputs(
        plan,
        reranked.engine,
        reranked.runs,
        reranked.stats,
        resumed=reranked.resumed,
        plot=plot,
        timings={"started": plan.started, "engine_start": reranked.startup},
    )
