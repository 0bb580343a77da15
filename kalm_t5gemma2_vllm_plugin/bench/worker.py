# SPDX-License-Identifier: Apache-2.0
"""One benchmark engine in its own process (so its memory is its own).

Run by ``kalm-vllm-bench``: ``python -m kalm_t5gemma2_vllm_plugin.bench.worker
'<json config>'``; prints one ``BENCH-RESULT <json>`` line.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from kalm_t5gemma2_vllm_plugin.bench.workload import (
    SharedPool,
    Workload,
    qwen3_reranker_prompt,
)
from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import synthetic_text

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
    reranker = _plugin(config)
    if warm:  # encode the documents once; the timed calls reuse them
        reranker.rank(workload.query(-1, 0), workload.document_set(0))
        documents = lambda r, i: workload.document_set(0)  # noqa: E731
    else:
        reranker.rank(workload.query(-1, 0), workload.document_set(-1))
        documents = workload.cold_set
    return _measure_vllm(reranker, reranker.rank, workload, documents, config)


def _plugin(config: dict[str, Any], **kwargs: Any) -> Any:
    """KaLMVLLMReranker with the run's checkpoint, dtype and chunk size."""
    from kalm_t5gemma2_vllm_plugin.rerankers.vllm import KaLMVLLMReranker

    return KaLMVLLMReranker(
        config["checkpoint"],
        dtype=config["dtype"],
        encoder_chunk_size=config["chunk_size"],
        **kwargs,
    )


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


def _build_store(config: dict[str, Any], rows: list[tuple[str, str]]) -> dict[str, Any]:
    """Encode ``(id, text)`` rows into a fresh store at ``config["store"]`` with
    kalm-vllm-encode's code; the rate and the bytes per passage."""
    import shutil
    from pathlib import Path

    from kalm_t5gemma2_vllm_plugin.store.encoder import PassageEncoder, encode_corpus
    from kalm_t5gemma2_vllm_plugin.store.format import StoreIdentity

    store = Path(config["store"])
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    corpus = store.parent / (store.name + ".jsonl")
    corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in rows))
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


def run_store_encode(config: dict[str, Any], workload: Workload) -> dict[str, Any]:
    """Build the passage store: the benchmark documents plus three more sets,
    for a steadier rate."""
    texts = workload.document_set(0) + [
        doc for i in range(3) for doc in workload.cold_set(0, i)
    ]
    ids = _store_ids(workload) + [
        f"extra-{i}" for i in range(len(texts) - workload.documents)
    ]
    return _build_store(config, list(zip(ids, texts, strict=True)))


def run_vllm_store(config: dict[str, Any], workload: Workload) -> dict[str, Any]:
    """Rank stored passages by id on a decoder-only engine (no encoder loaded)."""
    reranker = _plugin(config, passage_store=config["store"], decoder_only=True)
    ids = _store_ids(workload)
    reranker.rank(workload.query(-1, 0), document_ids=ids)  # warm-up

    def rank(query: str, docs: list[str]) -> Any:
        return reranker.rank(query, document_ids=docs)

    return _measure_vllm(reranker, rank, workload, lambda r, i: ids, config)


def _cross_encoder(checkpoint: str, dtype: str) -> Any:
    """The Qwen3-Reranker-shaped peer on vLLM's own yes/no sequence classifier."""
    from vllm import LLM

    return LLM(
        model=checkpoint,
        runner="pooling",
        dtype=dtype,
        enforce_eager=True,
        max_model_len=4096,
        kv_cache_memory_bytes=2 << 30,
        hf_overrides={
            "architectures": ["Qwen3ForSequenceClassification"],
            "classifier_from_token": ["no", "yes"],
            "is_original_qwen3_reranker": True,
        },
    )


def run_cross_encoder(config: dict[str, Any], workload: Workload) -> dict[str, Any]:
    llm = _cross_encoder(config["checkpoint"], config["dtype"])

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


# --- the shared-pool workload (``kalm-vllm-bench --sweep``) ----------------------
# Config: {"engine": "pool-<name>", "pool": SharedPool fields, "dtype",
# "chunk_size", "checkpoint", "warm_queries", "peer_pairs", "store", ...}.


def _pool_pass(
    rank: Callable[[str, int, list[int]], Any],
    pool: SharedPool,
    round_: int,
    calls: list[tuple[int, list[int]]],
    stats: Callable[[], dict[str, int]] | None = None,
) -> dict[str, Any]:
    """Run ``calls`` one after another; pairs/s over the pass, latency per call and
    what the engine counted during it."""
    before = stats() if stats else {}
    latencies = []
    started = time.perf_counter()
    for q, candidates in calls:
        t0 = time.perf_counter()
        rank(pool.query(round_, q), q, candidates)
        latencies.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - started
    pairs = sum(len(c) for _, c in calls)
    result: dict[str, Any] = {
        "pairs": pairs,
        "calls": len(calls),
        "seconds": seconds,
        "pairs_per_s": pairs / seconds,
        "rank_latency_s": _summary(latencies),
    }
    if stats:
        after = stats()
        counted = {k: after[k] - before.get(k, 0) for k in after}
        result["engine_counters"] = counted
        # every pair the encoder did not run for was served from a cache
        result["hit_rate"] = 1 - counted["passages_encoded"] / pairs
    return result


def _calls(pool: SharedPool, queries: int) -> list[tuple[int, list[int]]]:
    return [(q, pool.candidates(q)) for q in range(min(queries, pool.queries))]


def _fresh_texts(pool: SharedPool, count: int, salt: int) -> list[str]:
    """Passages outside the pool (warm-up and the cold engine)."""
    return [
        synthetic_text(pool.doc_tokens, seed=10**9 + salt * 100_003 + i)
        for i in range(count)
    ]


def run_pool_plugin(config: dict[str, Any], pool: SharedPool) -> dict[str, Any]:
    """KaLMVLLMReranker, fresh engine: the first pass over the workload (passages
    encoded on first sight, then served by the caches), then ``warm_queries``
    queries again with new texts over the same candidates (every passage cached)."""
    reranker = _plugin(config)
    texts = [pool.passage(i) for i in range(pool.pool)]
    reranker.rank(pool.query(-1, 0), _fresh_texts(pool, 4, salt=0))  # warm-up

    def rank(query: str, q: int, candidates: list[int]) -> Any:
        return reranker.rank(query, [texts[i] for i in candidates])

    first = _pool_pass(rank, pool, 0, _calls(pool, pool.queries), reranker.stats)
    first["hit_ceiling"] = pool.hit_ceiling()
    warm = _pool_pass(
        rank, pool, 1, _calls(pool, config["warm_queries"]), reranker.stats
    )
    result = {"first_pass": first, "warm_pass": warm, "batch_size": reranker.batch_size}
    reranker.close()
    return result


def run_pool_cold(config: dict[str, Any], pool: SharedPool) -> dict[str, Any]:
    """KaLMVLLMReranker on the peers' subset, every candidate a passage never seen
    (the encoder runs for every pair): the price of a passage's first use."""
    reranker = _plugin(config)
    reranker.rank(pool.query(-1, 0), _fresh_texts(pool, 4, salt=0))
    calls = pool.subset(config["peer_pairs"])
    fresh = iter(_fresh_texts(pool, sum(len(c) for _, c in calls), salt=1))
    unseen = {q: [next(fresh) for _ in c] for q, c in calls}
    result = _pool_pass(
        lambda query, q, c: reranker.rank(query, unseen[q]),
        pool,
        0,
        calls,
        reranker.stats,
    )
    reranker.close()
    return {"subset_pass": result}


def run_pool_store(config: dict[str, Any], pool: SharedPool) -> dict[str, Any]:
    """The pool from a passage store (built by ``pool-store-encode``), by id, on a
    decoder-only engine: the same queries as the warm pass."""
    reranker = _plugin(config, passage_store=config["store"], decoder_only=True)
    ids = [pool.passage_id(i) for i in range(pool.pool)]
    reranker.rank(pool.query(-1, 0), document_ids=ids[-4:])  # warm-up

    def rank(query: str, q: int, candidates: list[int]) -> Any:
        return reranker.rank(query, document_ids=[ids[i] for i in candidates])

    result = _pool_pass(
        rank, pool, 0, _calls(pool, config["warm_queries"]), reranker.stats
    )
    reranker.close()
    return {"store_pass": result}


def run_pool_store_encode(config: dict[str, Any], pool: SharedPool) -> dict[str, Any]:
    """Encode the whole pool into a passage store."""
    rows = [(pool.passage_id(i), pool.passage(i)) for i in range(pool.pool)]
    return _build_store(config, rows)


def run_pool_reference(config: dict[str, Any], pool: SharedPool) -> dict[str, Any]:
    from kalm_t5gemma2_vllm_plugin.rerankers.reference import KaLMReranker

    reranker = KaLMReranker(
        config["checkpoint"], dtype=config["dtype"], chunk_size=config["chunk_size"]
    )
    texts = [pool.passage(i) for i in range(pool.pool)]
    reranker.rank(pool.query(-1, 0), _fresh_texts(pool, 4, salt=0))
    result = _pool_pass(
        lambda query, q, c: reranker.rank(query, [texts[i] for i in c]),
        pool,
        0,
        pool.subset(config["peer_pairs"]),
    )
    return {"subset_pass": result, "batch_size": reranker.batch_size}


def run_pool_cross_encoder(config: dict[str, Any], pool: SharedPool) -> dict[str, Any]:
    llm = _cross_encoder(config["checkpoint"], config["dtype"])
    texts = [pool.passage(i) for i in range(pool.pool)]

    def rank(query: str, docs: list[str]) -> list[float]:
        outputs = llm.classify(
            [qwen3_reranker_prompt(query, d) for d in docs], use_tqdm=False
        )
        return sorted((o.outputs.probs[0] for o in outputs), reverse=True)

    rank(pool.query(-1, 0), _fresh_texts(pool, 4, salt=0))
    result = _pool_pass(
        lambda query, q, c: rank(query, [texts[i] for i in c]),
        pool,
        0,
        pool.subset(config["peer_pairs"]),
    )
    return {"subset_pass": result}


def run_pool_http(config: dict[str, Any], pool: SharedPool) -> dict[str, Any]:
    """The plugin's first and warm passes through ``kalm-vllm-serve``, every query
    of a pass in flight at once from ``clients`` concurrent clients."""
    import asyncio

    import httpx

    texts = [pool.passage(i) for i in range(pool.pool)]
    process, url = _serve(config)
    try:

        async def one_pass(round_: int, warm_up: bool = False) -> dict[str, Any]:
            async with httpx.AsyncClient(
                base_url=url, trust_env=False, timeout=3600
            ) as http:
                if warm_up:
                    answer = await http.post(
                        "/rerank",
                        json={
                            "query": pool.query(-1, 0),
                            "documents": _fresh_texts(pool, 4, salt=0),
                        },
                    )
                    answer.raise_for_status()
                pending = list(range(pool.queries))
                latencies: list[float] = []

                async def client() -> None:
                    while pending:
                        q = pending.pop(0)
                        t0 = time.perf_counter()
                        answer = await http.post(
                            "/rerank",
                            json={
                                "query": pool.query(round_, q),
                                "documents": [texts[i] for i in pool.candidates(q)],
                            },
                        )
                        answer.raise_for_status()
                        latencies.append(time.perf_counter() - t0)

                started = time.perf_counter()
                await asyncio.gather(*(client() for _ in range(config["clients"])))
                seconds = time.perf_counter() - started
            pairs = pool.queries * pool.documents
            return {
                "pairs": pairs,
                "calls": pool.queries,
                "seconds": seconds,
                "pairs_per_s": pairs / seconds,
                "rank_latency_s": _summary(latencies),
            }

        result = {
            "first_pass": asyncio.run(one_pass(0, warm_up=True)),
            "health_after_first": httpx.get(url + "/health", trust_env=False).json(),
            "clients": config["clients"],
        }
        if config.get("warm", True):
            result["warm_pass"] = asyncio.run(one_pass(1))
        result["server_peak_rss_mb"] = _tree_peak_rss_mb(process.pid)
        return result
    finally:
        process.terminate()
        process.wait(timeout=120)


def _tree_peak_rss_mb(pid: int) -> float:
    """Sum of the peak RSS of ``pid`` and its descendants (API server, engine
    core, worker): an upper bound of the server's peak, as they peak apart."""
    from pathlib import Path

    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return total


def _serve(config: dict[str, Any]) -> tuple[Any, str]:
    import socket
    import subprocess

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kalm_t5gemma2_vllm_plugin.cli.serve",
            "--model",
            config["checkpoint"],
            "--port",
            str(port),
            "--dtype",
            config["dtype"],
            "--encoder-chunk-size",
            str(config["chunk_size"]),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=sys.stderr,
        stderr=sys.stderr,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"kalm-vllm-serve exited with {process.returncode}")
        try:
            if httpx.get(url + "/health", trust_env=False).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise RuntimeError("kalm-vllm-serve did not become healthy")


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

POOL_RUNNERS: dict[str, Callable[[dict[str, Any], SharedPool], dict[str, Any]]] = {
    "pool-plugin": run_pool_plugin,
    "pool-cold": run_pool_cold,
    "pool-store-encode": run_pool_store_encode,
    "pool-store": run_pool_store,
    "pool-reference": run_pool_reference,
    "pool-cross-encoder": run_pool_cross_encoder,
    "pool-http": run_pool_http,
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
    if "section" in config:  # bench/long_documents.py
        from kalm_t5gemma2_vllm_plugin.bench import long_documents

        result = getattr(long_documents, f"run_{config['section']}")(config)
    elif "pool" in config:
        result = POOL_RUNNERS[config["engine"]](config, SharedPool(**config["pool"]))
    else:
        result = RUNNERS[config["engine"]](config, Workload(**config["workload"]))
    result["peak_rss_mb"] = _peak_rss_mb()
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
