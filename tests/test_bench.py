# SPDX-License-Identifier: Apache-2.0
"""``kalm-vllm-bench`` end to end on the tiny preset: every field, no timing checks."""

import json
from pathlib import Path

import pytest

from kalm_t5gemma2_vllm_plugin.bench import ENGINES
from kalm_t5gemma2_vllm_plugin.cli.bench import main

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.bench]

ENGINE_FIELDS = {
    "pairs_per_s",
    "rank_latency_s",
    "peak_rss_mb",
    "flops_per_pair",
    "achieved_gflops",
    "fraction_of_peak",
    "tokens",
    "process_seconds",
}


def test_bench_runs_every_engine_and_reports_every_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "--preset",
                "tiny",
                "--dtype",
                "float32",
                "--queries",
                "2",
                "--documents",
                "3",
                "--doc-tokens",
                "24",
                "--repeats",
                "2",
                "--workdir",
                str(tmp_path / "work"),
                "--json",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert {"machine", "workload", "runs", "threads", "chunk_size"} <= set(report)
    assert report["machine"]["cores"] >= 1 and report["machine"]["vllm"]
    run = report["runs"]["float32"]
    assert run["matmul_gflops"] > 0 and set(run["matmul_all_dtypes"]) == {
        "float32",
        "bfloat16",
    }
    assert set(run["engines"]) == set(ENGINES)
    for name, result in run["engines"].items():
        assert ENGINE_FIELDS <= set(result), name
        assert set(result["pairs_per_s"]) == {"median", "min", "max"}
        assert len(result["pairs_per_s_each_repeat"]) == 2
    engines = run["engines"]
    # what each engine computes, by construction
    assert "encoder" not in engines["vllm-warm"]["flops_per_pair"]
    assert engines["vllm-warm"]["engine_counters"]["passages_encoded"] == 0
    assert engines["vllm-cold"]["engine_counters"]["passages_encoded"] == 2 * 2 * 3
    assert engines["vllm-store"]["engine_counters"]["passages_encoded"] == 0
    # stored states pass through vLLM's encoder cache too: after the warm-up
    # call every timed request finds its passage there
    assert engines["vllm-store"]["engine_counters"]["requests_scored"] == 2 * 2 * 3
    assert (
        engines["reference"]["flops_per_pair"]["lm_head"]
        > engines["vllm-cold"]["flops_per_pair"]["lm_head"]
    )
    build = run["store_build"]
    assert build["passages"] == 4 * 3 and build["passages_per_s"] > 0
    assert build["bytes_per_passage"] > build["state_bytes_per_passage"] > 0
    table = capsys.readouterr().out
    assert "| vllm-warm |" in table and "% of peak" in table


def test_sweep_reports_the_shared_pool_workload(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--sweep` on a tiny pool: every section, the hit rate at its ceiling."""
    out = tmp_path / "sweep.json"
    args = ["--sweep", "--preset", "tiny", "--dtype", "float32"]
    args += ["--engines", "reference", "vllm-cold", "vllm-warm", "vllm-store"]
    args += ["--queries", "3", "--doc-tokens", "24", "--query-tokens", "6"]
    args += ["--pool", "8", "--sweep-documents", "4", "--peer-documents", "4"]
    args += ["--peer-pairs", "5", "--warm-pairs", "8", "--http-documents", "4"]
    args += ["--clients", "3", "--long-doc-tokens", "40", "--long-documents", "3"]
    args += ["--long-peer-pairs", "2", "--workdir", str(tmp_path / "work")]
    assert main([*args, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["dtype"] == "float32" and report["shape"]["pool"] == 8
    short, long = report["sections"]["24"], report["sections"]["40"]
    assert short["store_build"]["passages"] == 8
    row = short["by_documents"]["4"]
    assert {"plugin", "store", "cold", "reference"} <= set(row)
    assert "cross-encoder" not in row  # not asked for
    first, warm = row["plugin"]["first_pass"], row["plugin"]["warm_pass"]
    assert first["pairs"] == 3 * 4 and warm["pairs"] == 2 * 4
    # a cache that never evicts reaches the ceiling exactly, and encodes each
    # distinct passage once; the warm pass encodes nothing
    assert first["hit_rate"] == pytest.approx(row["hit_ceiling"])
    distinct = round((1 - row["hit_ceiling"]) * 12)
    assert first["engine_counters"]["passages_encoded"] == distinct
    assert warm["engine_counters"]["passages_encoded"] == 0
    assert row["store"]["store_pass"]["engine_counters"]["passages_encoded"] == 0
    assert row["cold"]["subset_pass"]["engine_counters"]["passages_encoded"] == 5
    assert row["reference"]["subset_pass"]["pairs"] == 5
    assert set(row["break_even"]) >= {"uses_for_90pct_of_warm", "store_pays_after_uses"}
    assert set(row["warm_over"]) == {"reference"}
    http = short["http"]
    assert http["first_pass"]["pairs"] == 12 and http["clients"] == 3
    assert http["server_peak_rss_mb"] > 100  # the engine, not the client
    assert set(http["over_offline"]) == {"first_pass", "warm_pass"}
    # the server's own counters agree: each passage encoded once (+ 4 warm-up)
    assert http["health_after_first"]["passage_cache"]["misses"] == distinct + 4
    long_row = long["by_documents"]["3"]
    assert long_row["plugin"]["first_pass"]["hit_rate"] == 0  # cold once
    assert long_row["plugin"]["warm_pass"]["engine_counters"]["passages_encoded"] == 0
    assert long_row["break_even"] is not None
    assert set(report["wall_s"]) >= {"L=24 store build", "L=24 D=4", "total"}
    table = capsys.readouterr().out
    assert "| 24 | 4 | 3 |" in table and "HTTP (`kalm-vllm-serve`" in table


def test_long_documents_and_compression_sections(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "long.json"
    args = ["--preset", "tiny", "--dtype", "float32", "--queries", "2"]
    args += ["--long-docs", "--long-docs-documents", "2", "--long-docs-length", "300"]
    args += ["--window-tokens", "64", "--compression", "--compression-documents", "3"]
    args += ["--doc-tokens", "40", "--workdir", str(tmp_path / "work")]
    assert main([*args, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    long = report["long"]
    # the first query encodes every window; the second finds them cached
    assert long["cold"]["windows_encoded"] == long["cold"]["windows"] > 2
    assert [p["windows_encoded"] for p in long["warm"]] == [0]
    assert long["peak_rss_long_document_mb"] > 0
    sizes = report["compression"]["sizes"]
    assert list(sizes) == ["4", "8", "16", "32"]
    assert sizes["4"]["max_abs_margin_diff_vs_base"] == 0.0
    for row in sizes.values():  # fp32: re-pooling is exact up to rounding
        assert row["max_abs_margin_diff_vs_engine_at_size"] <= 1e-4
    assert sizes["32"]["max_abs_margin_diff_vs_base"] > 1e-4
    printed = capsys.readouterr().out
    assert "### Long documents" in printed and "### Compression" in printed
