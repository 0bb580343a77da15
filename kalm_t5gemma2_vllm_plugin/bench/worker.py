# SPDX-License-Identifier: Apache-2.0
"""One benchmark engine in its own process (so its memory is its own).

Run by ``kalm-vllm-bench``: ``python -m kalm_t5gemma2_vllm_plugin.bench.worker
'<json config>'``; prints one ``BENCH-RESULT <json>`` line.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from kalm_t5gemma2_vllm_plugin.bench.workload import Workload, qwen3_reranker_prompt

RESULT_PREFIX = "BENCH-RESULT "


def _measure(
    rank: Callable[[str, list[str]], Any],
    workload: Workload,
    documents: Callable[[int, int], list[str]],
) -> dict[str, Any]:
    """Time every rank call; pairs/s per repeat."""
    rates, latencies = [], []
    for repeat in range(workload.repeats):
        total = 0.0
        for index in range(workload.queries):
            query, docs = workload.query(repeat, index), documents(repeat, index)
            started = time.perf_counter()
            rank(query, docs)
            elapsed = time.perf_counter() - started
            latencies.append(elapsed)
            total += elapsed
        rates.append(workload.pairs_per_repeat / total)
    return {
        "pairs_per_s": _summary(rates),
        "rank_latency_s": _summary(latencies),
        "pairs_per_s_each_repeat": rates,
    }


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _kalm_tokens(
    tokenizer: Any, workload: Workload, chunk_size: int | None
) -> dict[str, float]:
    from kalm_t5gemma2_vllm_plugin.mep import pooled_length
    from kalm_t5gemma2_vllm_plugin.prompt import decoder_prompt_ids, encode_document

    query = workload.query(0, 0)
    doc = workload.document_set(0)[0]
    encoder = len(encode_document(tokenizer, doc, 1_000_000).ids)
    return {
        "decoder_tokens": len(
            decoder_prompt_ids(tokenizer, query, query_max_length=512)
        ),
        "encoder_tokens": encoder,
        "pooled": pooled_length(encoder, chunk_size),
    }


def run_reference(config: dict[str, Any], workload: Workload) -> dict[str, Any]:
    from kalm_t5gemma2_vllm_plugin.rerankers.reference import KaLMReranker

    reranker = KaLMReranker(
        config["checkpoint"], dtype=config["dtype"], chunk_size=config["chunk_size"]
    )
    reranker.rank(workload.query(-1, 0), workload.document_set(-1))  # warm-up
    result = _measure(reranker.rank, workload, lambda r, i: workload.document_set(0))
    result["tokens"] = _kalm_tokens(reranker.tokenizer, workload, config["chunk_size"])
    result["batch_size"] = reranker.batch_size
    return result


def run_vllm(
    config: dict[str, Any], workload: Workload, *, warm: bool
) -> dict[str, Any]:
    from kalm_t5gemma2_vllm_plugin.rerankers.vllm import KaLMVLLMReranker

    reranker = KaLMVLLMReranker(
        config["checkpoint"],
        dtype=config["dtype"],
        encoder_chunk_size=config["chunk_size"],
    )
    if warm:  # encode the documents once; the timed calls reuse them
        reranker.rank(workload.query(-1, 0), workload.document_set(0))
        documents = lambda r, i: workload.document_set(0)  # noqa: E731
    else:
        reranker.rank(workload.query(-1, 0), workload.document_set(-1))
        documents = workload.cold_set
    return _measure_vllm(reranker, reranker.rank, workload, documents, config)


def _measure_vllm(
    reranker: Any, rank: Any, workload: Workload, documents: Any, config: dict[str, Any]
) -> dict[str, Any]:
    """``_measure`` plus what the engine counted during the timed calls; closes it."""
    before = reranker.stats()
    result = _measure(rank, workload, documents)
    after = reranker.stats()
    result["engine_counters"] = {k: after[k] - before[k] for k in after}
    result["tokens"] = _kalm_tokens(reranker.tokenizer, workload, config["chunk_size"])
    result["batch_size"] = reranker.batch_size
    reranker.close()
    return result


def _store_ids(workload: Workload) -> list[str]:
    return [f"doc-{i}" for i in range(workload.documents)]


def run_store_encode(config: dict[str, Any], workload: Workload) -> dict[str, Any]:
    """Build the passage store with kalm-vllm-encode's code (its own process)."""
    import shutil
    from pathlib import Path

    from kalm_t5gemma2_vllm_plugin.store.encoder import PassageEncoder, encode_corpus
    from kalm_t5gemma2_vllm_plugin.store.format import StoreIdentity

    store = Path(config["store"])
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    corpus = store.parent / (store.name + ".jsonl")
    # The benchmark documents plus three more sets, for a steadier rate.
    texts = workload.document_set(0) + [
        doc for i in range(3) for doc in workload.cold_set(0, i)
    ]
    ids = _store_ids(workload) + [
        f"extra-{i}" for i in range(len(texts) - workload.documents)
    ]
    corpus.write_text(
        "".join(
            json.dumps({"id": i, "text": t}) + "\n"
            for i, t in zip(ids, texts, strict=True)
        )
    )
    identity = StoreIdentity.for_engine(
        config["checkpoint"], config["chunk_size"], 1024, config["dtype"]
    )
    encoder = PassageEncoder(
        config["checkpoint"],
        chunk_size=config["chunk_size"],
        document_max_length=1024,
        dtype=config["dtype"],
    )
    started = time.perf_counter()
    counts = encode_corpus(encoder, corpus, store, identity=identity, batch_size=16)
    seconds = time.perf_counter() - started
    shards = sum(p.stat().st_size for p in (store / "shards").iterdir())
    index = (store / "index.sqlite").stat().st_size
    return {
        "passages": counts["encoded"],
        "encode_seconds": seconds,
        "passages_per_s": counts["encoded"] / seconds,
        "bytes_per_passage": (shards + index) / counts["encoded"],
        "state_bytes_per_passage": shards / counts["encoded"],
    }


def run_vllm_store(config: dict[str, Any], workload: Workload) -> dict[str, Any]:
    """Rank stored passages by id on a decoder-only engine (no encoder loaded)."""
    from kalm_t5gemma2_vllm_plugin.rerankers.vllm import KaLMVLLMReranker

    reranker = KaLMVLLMReranker(
        config["checkpoint"],
        dtype=config["dtype"],
        encoder_chunk_size=config["chunk_size"],
        passage_store=config["store"],
        decoder_only=True,
    )
    ids = _store_ids(workload)
    reranker.rank(workload.query(-1, 0), document_ids=ids)  # warm-up

    def rank(query: str, docs: list[str]) -> Any:
        return reranker.rank(query, document_ids=docs)

    return _measure_vllm(reranker, rank, workload, lambda r, i: ids, config)


def run_cross_encoder(config: dict[str, Any], workload: Workload) -> dict[str, Any]:
    from vllm import LLM

    llm = LLM(
        model=config["checkpoint"],
        runner="pooling",
        dtype=config["dtype"],
        enforce_eager=True,
        max_model_len=4096,
        kv_cache_memory_bytes=2 << 30,
        hf_overrides={
            "architectures": ["Qwen3ForSequenceClassification"],
            "classifier_from_token": ["no", "yes"],
            "is_original_qwen3_reranker": True,
        },
    )

    def rank(query: str, docs: list[str]) -> list[float]:
        outputs = llm.classify(
            [qwen3_reranker_prompt(query, d) for d in docs], use_tqdm=False
        )
        scores = [o.outputs.probs[0] for o in outputs]
        return sorted(scores, reverse=True)

    rank(workload.query(-1, 0), workload.document_set(-1))
    result = _measure(rank, workload, lambda r, i: workload.document_set(0))
    tokenizer = llm.get_tokenizer()
    prompt = qwen3_reranker_prompt(workload.query(0, 0), workload.document_set(0)[0])
    result["tokens"] = {"prompt_tokens": len(tokenizer(prompt)["input_ids"])}
    return result


# GEMM shapes of the models' linear layers (tokens x in -> out), large enough
# to reach this machine's dense rate.
_GEMM_SHAPES = (
    (2048, 640, 2048),
    (2048, 2048, 640),
    (2048, 1024, 4096),
    (4096, 2048, 2048),
)


def run_matmul(config: dict[str, Any], workload: Workload) -> dict[str, Any]:
    """This machine's dense matmul rate per dtype (GFLOP/s), measured with
    ``F.linear`` (what the models run), best over shapes and repetitions."""
    import torch
    import torch.nn.functional as F

    rates = {}
    for name in ("float32", "bfloat16"):
        dtype = getattr(torch, name)
        best = 0.0
        for m, k, n in _GEMM_SHAPES:
            x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
            F.linear(x, w)
            for _ in range(3):
                started = time.perf_counter()
                F.linear(x, w)
                best = max(best, 2 * m * k * n / (time.perf_counter() - started) / 1e9)
        rates[name] = best
    return {"matmul_gflops": rates, "torch_threads": torch.get_num_threads()}


RUNNERS: dict[str, Callable[[dict[str, Any], Workload], dict[str, Any]]] = {
    "reference": run_reference,
    "vllm-cold": lambda c, w: run_vllm(c, w, warm=False),
    "vllm-warm": lambda c, w: run_vllm(c, w, warm=True),
    "store-encode": run_store_encode,
    "vllm-store": run_vllm_store,
    "cross-encoder": run_cross_encoder,
    "matmul": run_matmul,
}


def _peak_rss_mb() -> float:
    """Peak resident memory of this process, model included.

    VmHWM starts afresh at exec; ru_maxrss would carry over the parent's peak
    (the orchestrator that generated the checkpoints).
    """
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    config = json.loads(sys.argv[1])
    workload = Workload(**config["workload"])
    result = RUNNERS[config["engine"]](config, workload)
    result["peak_rss_mb"] = _peak_rss_mb()
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
