# SPDX-License-Identifier: Apache-2.0
"""``kalm-vllm-bench`` end to end on the tiny preset: every field, no timing checks."""

import json
from pathlib import Path

import pytest

from kalm_t5gemma2_vllm_plugin.bench import ENGINES
from kalm_t5gemma2_vllm_plugin.cli.bench import main

pytestmark = [pytest.mark.engine, pytest.mark.slow]

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
