# SPDX-License-Identifier: Apache-2.0
"""Every route of ``kalm-vllm-serve`` over real HTTP, against the in-process reranker."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kalm_t5gemma2_vllm_plugin import KaLMVLLMReranker
from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import synthetic_text
from kalm_t5gemma2_vllm_plugin.scores import score_from_margin
from kalm_t5gemma2_vllm_plugin.server import schemas as S
from tests.helpers import MARGIN_ATOL, QUERY, corpus_docs
from tests.server.conftest import RunningServer

pytestmark = pytest.mark.server

DOCS = [
    "The capital of China is Beijing.",
    "Gravity attracts bodies toward one another.",
    "",
    "北京是中国的首都",
    synthetic_text(60, seed=8),
]
INSTRUCTION = "Given a web search query, retrieve passages that answer the query."


def _expected(
    engine: KaLMVLLMReranker,
    query: str,
    docs: list[str],
    instruction: str | None = None,
) -> list[float]:
    return engine.margins([(query, d) for d in docs], instruction=instruction)


def test_health_reports_settings(http: httpx.Client) -> None:
    body = http.get("/health").json()
    assert body["status"] == "ok" and body["dtype"] == "float32"
    assert body["encoder_chunk_size"] == 4 and body["document_max_length"] == 1024
    assert body["limits"]["max_documents"] >= 1000
    # /health needs no key: it names the model, never a path of this machine
    assert "/" not in body["model"] and body["model"].startswith("kalm-tiny")
    assert all("/" not in name for name in body["served_model_names"])
    assert "/" not in repr(body["passage_store"])


def test_rerank_matches_the_offline_reranker(
    http: httpx.Client, engine: KaLMVLLMReranker
) -> None:
    response = http.post(
        "/rerank", json={"query": QUERY, "documents": DOCS, "return_margin": True}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "rerank"
    expected = _expected(engine, QUERY, DOCS)
    margins = [r["margin"] for r in body["results"]]
    assert margins == sorted(margins, reverse=True)
    assert sorted(r["index"] for r in body["results"]) == list(range(len(DOCS)))
    for result in body["results"]:
        assert abs(result["margin"] - expected[result["index"]]) <= MARGIN_ATOL
        assert result["relevance_score"] == result["score"]
        assert "document" not in result
    assert body["meta"]["truncated"] == [] and body["usage"]["prompt_tokens"] > 0


def test_rerank_accepts_cohere_and_jina_fields(
    http: httpx.Client, engine: KaLMVLLMReranker
) -> None:
    payload = {
        "model": "tiny",
        "query": QUERY,
        "top_n": 2,
        "return_documents": True,
        "documents": [{"text": d, "meta": "ignored"} for d in DOCS[:3]],
        "instruction": INSTRUCTION,
    }
    body = http.post("/rerank", json=payload).json()
    expected = _expected(engine, QUERY, DOCS[:3], INSTRUCTION)
    best = sorted(range(3), key=lambda i: -expected[i])[:2]
    assert [r["index"] for r in body["results"]] == best
    assert [r["document"]["text"] for r in body["results"]] == [DOCS[i] for i in best]
    assert "margin" not in body["results"][0]
    assert (
        http.post("/rerank", json={**payload, "top_n": None, "top_k": 0}).json()[
            "results"
        ]
        == []
    )
    assert (
        len(http.post("/rerank", json={**payload, "top_n": 50}).json()["results"]) == 3
    )


def test_score_keeps_input_order_and_echoes_ids(
    http: httpx.Client, engine: KaLMVLLMReranker
) -> None:
    pairs = [
        {"query": QUERY, "document": DOCS[0], "id": "positive"},
        {"query": "other query", "document": DOCS[1]},
        {"query": QUERY, "document": DOCS[3], "id": 42},
    ]
    body = http.post("/score", json={"pairs": pairs, "return_margin": True}).json()
    assert body["object"] == "score"
    assert [r["index"] for r in body["results"]] == [0, 1, 2]
    assert [r.get("id") for r in body["results"]] == ["positive", None, 42]
    expected = engine.margins([(p["query"], p["document"]) for p in pairs])
    for result, margin in zip(body["results"], expected, strict=True):
        assert abs(result["margin"] - margin) <= MARGIN_ATOL


def test_jina_route(http: httpx.Client, engine: KaLMVLLMReranker) -> None:
    body = http.post(
        "/v1/rerank",
        json={"model": "tiny", "query": QUERY, "documents": DOCS[:3], "top_n": 2},
    ).json()
    expected = _expected(engine, QUERY, DOCS[:3])
    assert [r["index"] for r in body["results"]] == sorted(
        range(3), key=lambda i: -expected[i]
    )[:2]
    assert body["results"][0]["document"]["text"] == DOCS[body["results"][0]["index"]]
    assert set(body) >= {"model", "usage", "results"}


def test_cohere_sdk_works_unchanged(
    server: RunningServer, engine: KaLMVLLMReranker
) -> None:
    import cohere

    client = cohere.ClientV2(
        api_key="unused",
        base_url=server.url,
        httpx_client=httpx.Client(trust_env=False, timeout=120),
    )
    response = client.rerank(
        model="tiny", query=QUERY, documents=DOCS[:3], top_n=3, max_tokens_per_doc=4096
    )
    expected = [score_from_margin(m) for m in _expected(engine, QUERY, DOCS[:3])]
    assert [r.index for r in response.results] == sorted(
        range(3), key=lambda i: -expected[i]
    )
    for result in response.results:
        assert result.relevance_score == pytest.approx(expected[result.index], abs=1e-6)
    assert response.meta is not None and response.meta.tokens.input_tokens > 0


def test_long_documents_are_truncated_and_reported(http: httpx.Client) -> None:
    docs = ["short", synthetic_text(1500, seed=3), "also short"]
    body = http.post("/rerank", json={"query": QUERY, "documents": docs}).json()
    assert body["meta"]["truncated"] == [1]
    assert "truncated" in body["meta"]["warnings"][0]
    cut = http.post(
        "/v2/rerank", json={"query": QUERY, "documents": docs, "max_tokens_per_doc": 3}
    ).json()
    assert cut["meta"]["truncated"] == [0, 1, 2]


@pytest.mark.parametrize(
    "route,payload,status,field",
    [
        ("/rerank", b"{not json", 400, None),
        ("/rerank", [1, 2], 400, None),
        ("/rerank", {"documents": ["a"]}, 422, "query"),
        ("/rerank", {"query": "q", "documents": []}, 422, "documents"),
        ("/rerank", {"query": "q", "documents": ["a", 3]}, 422, "documents.1"),
        ("/rerank", {"query": "q", "documents": [{"txt": "a"}]}, 422, "documents.0"),
        ("/rerank", {"query": 5, "documents": ["a"]}, 422, "query"),
        ("/rerank", {"query": "q", "documents": ["a"], "top_k": -1}, 422, "top_k"),
        ("/rerank", {"query": "q", "documents": ["a"], "top_k": "2"}, 422, "top_k"),
        (
            "/rerank",
            {"query": "q", "documents": ["a"], "top_k": 1, "top_n": 2},
            400,
            "top_n",
        ),
        ("/rerank", {"query": "q", "documents": ["a"], "model": "gpt-4"}, 404, "model"),
        (
            "/rerank",
            {"query": "q", "documents": ["a"], "instruction": 7},
            422,
            "instruction",
        ),
        ("/v2/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, 422, "top_n"),
        ("/v2/rerank", {"query": "q", "documents": "a"}, 422, "documents"),
        ("/score", {"pairs": []}, 422, "pairs"),
        ("/score", {"pairs": [{"query": "q"}]}, 422, "pairs.0"),
        (
            "/score",
            {"pairs": [{"query": "q", "document": 5}]},
            422,
            "pairs.0.document",
        ),
    ],
    ids=[
        "bad-json",
        "not-object",
        "no-query",
        "no-documents",
        "int-document",
        "doc-without-text",
        "int-query",
        "negative-top-k",
        "string-top-k",
        "top-k-top-n-disagree",
        "unknown-model",
        "int-instruction",
        "cohere-top-n-0",
        "documents-not-list",
        "no-pairs",
        "pair-without-document",
        "null-document",
    ],
)
def test_bad_input_gets_a_4xx_naming_the_field(
    http: httpx.Client, route: str, payload: object, status: int, field: str | None
) -> None:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    response = http.post(
        route, content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    assert error.get("field") == field
    # and the server still answers the next good request
    assert (
        http.post("/rerank", json={"query": "q", "documents": ["a"]}).status_code == 200
    )


def test_metrics_count_requests_pairs_and_passage_reuse(http: httpx.Client) -> None:
    docs = [synthetic_text(30, seed=700 + i) for i in range(6)]

    def scrape() -> dict[str, float]:
        values = {}
        for line in http.get("/metrics").text.splitlines():
            if line.startswith("kalm_") and " " in line:
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    before = scrape()
    http.post("/rerank", json={"query": "first", "documents": docs})
    http.post("/rerank", json={"query": "second", "documents": docs})
    after = scrape()
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert delta["kalm_passages_encoded_total"] == 6
    assert delta["kalm_passages_reused_total"] == 6
    assert delta["kalm_pairs_scored_total"] == 12
    assert delta['kalm_http_requests_total{code="200",route="/rerank"}'] == 2
    assert (
        'kalm_http_request_duration_seconds_bucket{le="0.005",route="/rerank"}' in after
    )


def test_documents_by_id_mix_with_text_on_every_route(
    http: httpx.Client, engine: KaLMVLLMReranker
) -> None:
    docs = corpus_docs()
    expected = engine.margins(
        [
            (QUERY, docs["doc-1"]),
            (QUERY, "fresh text"),
            (QUERY, docs["doc-2"]),
            (QUERY, ""),
        ]
    )
    body = http.post(
        "/rerank",
        json={
            "query": QUERY,
            "documents": [docs["doc-1"], "fresh text"],
            "document_ids": ["doc-2", "empty"],
            "return_margin": True,
            "return_documents": True,
        },
    ).json()
    for result in body["results"]:
        assert abs(result["margin"] - expected[result["index"]]) <= MARGIN_ATOL
        assert result.get("document_id") == {2: "doc-2", 3: "empty"}.get(
            result["index"]
        )
        assert ("document" in result) == (result["index"] < 2)
    for route in ("/v1/rerank", "/v2/rerank"):
        results = http.post(
            route, json={"query": QUERY, "document_ids": ["doc-2", "empty"]}
        ).json()["results"]
        assert {r["document_id"] for r in results} == {"doc-2", "empty"}
        for result in results:
            margin = expected[2 + result["index"]]
            assert result["relevance_score"] == pytest.approx(
                score_from_margin(margin), abs=1e-5
            )
    scored = http.post(
        "/score",
        json={
            "return_margin": True,
            "pairs": [
                {"query": QUERY, "document_id": "doc-2", "id": "stored"},
                {"query": QUERY, "document": docs["doc-1"]},
            ],
        },
    ).json()["results"]
    assert [r.get("id") for r in scored] == ["stored", None]
    assert abs(scored[0]["margin"] - expected[2]) <= MARGIN_ATOL
    assert abs(scored[1]["margin"] - expected[0]) <= MARGIN_ATOL


def test_unknown_document_ids_are_a_404_naming_them(http: httpx.Client) -> None:
    for route, payload, field in (
        (
            "/rerank",
            {"query": "q", "document_ids": ["doc-1", "nope", "gone"]},
            "document_ids.1",
        ),
        (
            "/score",
            {
                "pairs": [
                    {"query": "q", "document": "text"},
                    {"query": "q", "document_id": "nope"},
                    {"query": "q", "document_id": "gone"},
                ]
            },
            "pairs.1.document_id",
        ),
    ):
        response = http.post(route, json=payload)
        assert response.status_code == 404, response.text
        error = response.json()["error"]
        # the first unknown id by its JSON path (F12)
        assert error["type"] == "document_not_found" and error["field"] == field
        assert "'nope'" in error["message"] and "'gone'" in error["message"]
        assert "/" not in error["message"]  # the store by name, not by path (F14)
    both = http.post(
        "/score",
        json={"pairs": [{"query": "q", "document": "t", "document_id": "doc-1"}]},
    )
    assert (
        both.status_code == 422 and "exactly one of" in both.json()["error"]["message"]
    )


def test_openapi_docs_are_served(http: httpx.Client) -> None:
    assert http.get("/docs").status_code == 200
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/rerank", "/score", "/v1/rerank", "/v2/rerank", "/health"} <= set(paths)


def test_concurrent_clients_are_batched_and_none_is_lost(
    server: RunningServer, engine: KaLMVLLMReranker
) -> None:
    """32 clients x 10 requests; reports the concurrent and sequential wall times."""
    requests = [
        (f"query {c} {r}", [DOCS[(c + r) % 5], synthetic_text(20, seed=c)])
        for c in range(32)
        for r in range(10)
    ]
    expected = {q: _expected(engine, q, docs) for q, docs in requests}

    def send(client: httpx.Client, item: tuple[str, list[str]]) -> tuple[str, dict]:
        query, docs = item
        response = client.post(
            "/rerank", json={"query": query, "documents": docs, "return_margin": True}
        )
        assert response.status_code == 200, response.text
        return query, response.json()

    with httpx.Client(
        base_url=server.url,
        trust_env=False,
        timeout=300,
        limits=httpx.Limits(max_connections=32),
    ) as client:
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            results = list(pool.map(lambda item: send(client, item), requests))
        concurrent_seconds = time.perf_counter() - started
        started = time.perf_counter()
        for item in requests:
            send(client, item)
        sequential_seconds = time.perf_counter() - started
    assert len(results) == 320
    for query, body in results:
        for result in body["results"]:
            assert (
                abs(result["margin"] - expected[query][result["index"]]) <= MARGIN_ATOL
            )
    print(
        f"\n320 requests: concurrent (32 clients) {concurrent_seconds:.2f}s, "
        f"sequential {sequential_seconds:.2f}s"
    )


# --- kalm-vllm-client against the same server -------------------------------------
def _client(
    server: RunningServer, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    from kalm_t5gemma2_vllm_plugin.cli import client

    code = client.main(["--base-url", server.url, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_client_health_and_demo_payloads(
    server: RunningServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Requests go to the given host only: proxy variables are ignored.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    code, out, _ = _client(server, capsys, "--health")
    assert code == 0 and json.loads(out)["status"] == "ok"
    code, out, _ = _client(server, capsys, "--return-margin", "--top-k", "1")
    results = json.loads(out)["results"]
    assert code == 0 and len(results) == 1 and "margin" in results[0]
    code, out, _ = _client(server, capsys, "--endpoint", "score")
    assert code == 0
    assert [r["id"] for r in json.loads(out)["results"]] == ["positive", "negative"]


def test_client_sends_the_example_files(
    server: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_examples import ROOT

    code, out, _ = _client(
        server, capsys, "--json-file", str(ROOT / "examples" / "rerank_request.json")
    )
    assert code == 0 and len(json.loads(out)["results"]) == 2
    code, out, _ = _client(
        server,
        capsys,
        "--endpoint",
        "score",
        "--json-file",
        str(ROOT / "examples" / "score_request.json"),
    )
    assert code == 0 and json.loads(out)["results"][0]["id"] == "positive"


def test_client_exits_non_zero_with_the_server_message(
    server: RunningServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"query": "q", "documents": []}))
    code, out, err = _client(server, capsys, "--json-file", str(bad))
    assert code == 1 and out == ""
    assert "HTTP 422" in err and "documents: give at least one document" in err
    code, _, err = _client(
        server,
        capsys,
        "--api-key",
        "x",
        "--timeout",
        "5",
        "--endpoint",
        "score",
        "--json-file",
        str(bad),
    )
    assert code == 1 and "HTTP 422" in err and "pairs" in err


# --- text that is not Unicode: every string field of every route -------------------
#: A request per route that the server answers 200, with every string-typed
#: field of its schema present (lists hold two items, so indices show up).
VALID_REQUESTS = {
    "/rerank": {
        "model": "tiny",
        "query": "q",
        "documents": ["a", {"text": "b", "title": "ignored"}],
        "document_ids": ["doc-1", "doc-2"],
        "instruction": "i",
        "long_document": "truncate",
    },
    "/score": {
        "model": "tiny",
        "pairs": [
            {"query": "q", "document": "a", "id": "x"},
            {"query": "q", "document_id": "doc-1"},
        ],
        "instruction": "i",
        "long_document": "truncate",
    },
}
VALID_REQUESTS["/v1/rerank"] = VALID_REQUESTS["/v2/rerank"] = VALID_REQUESTS["/rerank"]
REQUEST_MODELS = {
    "/rerank": S.RerankRequest,
    "/v1/rerank": S.JinaRerankRequest,
    "/v2/rerank": S.CohereRerankRequest,
    "/score": S.ScoreRequest,
}


def _branches(schema: dict, defs: dict) -> list[dict]:
    schema = defs[schema["$ref"].rsplit("/", 1)[1]] if "$ref" in schema else schema
    if "anyOf" in schema:
        return [b for s in schema["anyOf"] for b in _branches(s, defs)]
    return [schema]


def _string_fields(
    schema: dict, defs: dict, value: object, path: tuple = ()
) -> Iterator[tuple]:
    """Paths in ``value`` where the JSON schema takes a string (no ``type``,
    as for ``Any``, takes one too), and the same paths with ``*`` for indices."""
    for branch in _branches(schema, defs):
        kind = branch.get("type")
        if isinstance(value, str) and kind in ("string", None):
            yield path
        elif isinstance(value, list) and kind == "array":
            for i, item in enumerate(value):
                yield from _string_fields(branch["items"], defs, item, (*path, i))
        elif isinstance(value, dict) and kind == "object":
            for key, item in value.items():
                if key in branch.get("properties", {}):
                    sub = branch["properties"][key]
                    yield from _string_fields(sub, defs, item, (*path, key))


def _schema_string_fields(schema: dict, defs: dict, path: str = "") -> set[str]:
    """Every field of the schema that takes a string, indices as ``*``."""
    found = set()
    for branch in _branches(schema, defs):
        kind = branch.get("type")
        if kind in ("string", None) and path:
            found.add(path)
        elif kind == "array":
            found |= _schema_string_fields(branch["items"], defs, f"{path}.*")
        elif kind == "object":
            for key, sub in branch.get("properties", {}).items():
                found |= _schema_string_fields(sub, defs, f"{path}.{key}")
    return {p.lstrip(".") for p in found}


def _with(value: object, path: tuple, new: object) -> object:
    value = json.loads(json.dumps(value))
    target = value
    for key in path[:-1]:
        target = target[key]  # type: ignore[index]
    target[path[-1]] = new  # type: ignore[index]
    return value


def _surrogate_cases() -> list[tuple[str, tuple]]:
    cases = []
    for route, model in REQUEST_MODELS.items():
        schema = model.model_json_schema()
        defs = schema.get("$defs", {})
        paths = list(_string_fields(schema, defs, VALID_REQUESTS[route]))
        cases += [(route, path) for path in paths]
    return cases


SURROGATE_CASES = _surrogate_cases()


@pytest.mark.parametrize("route", list(REQUEST_MODELS))
def test_the_surrogate_cases_cover_every_string_field_of_the_schema(
    http: httpx.Client, route: str
) -> None:
    schema = REQUEST_MODELS[route].model_json_schema()
    covered = {
        ".".join("*" if isinstance(p, int) else p for p in path)
        for r, path in SURROGATE_CASES
        if r == route
    }
    assert covered == _schema_string_fields(schema, schema.get("$defs", {}))
    response = http.post(route, json=VALID_REQUESTS[route])
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("encoding", ["json-escape", "cesu-8"])
@pytest.mark.parametrize(
    "route,path",
    SURROGATE_CASES,
    ids=[f"{r}:{'.'.join(map(str, p))}" for r, p in SURROGATE_CASES],
)
def test_a_lone_surrogate_in_any_string_field_is_a_422_naming_it(
    http: httpx.Client, route: str, path: tuple, encoding: str
) -> None:
    payload = _with(VALID_REQUESTS[route], path, "ok \ud800 then")
    if encoding == "json-escape":  # "\ud800" in the JSON text
        body = json.dumps(payload).encode()
    else:  # the bytes ED A0 80, which Python's JSON reader decodes to U+D800
        text = json.dumps(payload, ensure_ascii=False)
        body = text.encode("utf-8", "surrogatepass")
        assert b"\xed\xa0\x80" in body
    response = http.post(
        route, content=body, headers={"content-type": "application/json"}
    )
    field = ".".join(map(str, path))
    assert response.status_code == 422, response.text
    message = f"{field}: must be valid Unicode text; found a lone surrogate U+D800 at character 3"
    assert response.json() == {
        "error": {"type": "invalid_request", "field": field, "message": message},
        "detail": message,
    }


@pytest.mark.parametrize(
    "value,where",
    [
        ({"k": ["ok", "\udfff"]}, " (at k.1)"),
        ([1, {"\udfff": 2}], " (in a key at 1)"),
        ("\udfff", ""),
    ],
    ids=["nested-string", "nested-key", "string"],
)
def test_a_lone_surrogate_anywhere_in_a_score_id_is_a_422(
    http: httpx.Client, value: object, where: str
) -> None:
    payload = {"pairs": [{"query": "q", "document": "a", "id": value}]}
    body = json.dumps(payload).encode()  # "\\udfff" as a JSON escape
    response = http.post(
        "/score", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "pairs.0.id"
    assert error["message"] == (
        "pairs.0.id: must be valid Unicode text; found a lone surrogate U+DFFF "
        f"at character 0{where}"
    )


def test_valid_surrogate_pairs_and_odd_characters_still_score(
    http: httpx.Client,
) -> None:
    text = "emoji \U0001f600, NUL \u0000, BOM \ufeff, non-character \uffff"
    payload = {"pairs": [{"query": text, "document": text, "id": {text: [text]}}]}
    body = json.dumps(payload).encode()  # ASCII: the emoji as "\\ud83d\\ude00"
    assert b"\\ud83d\\ude00" in body
    response = http.post(
        "/score", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["id"] == {text: [text]}
