# SPDX-License-Identifier: Apache-2.0
"""The vLLM side of ``mrv2_driver.py``: one MRV2 worker and one engine core.

Only vLLM's classes, driven as ``GPUModelRunner`` and ``EngineCore`` drive
them; nothing here imports the plugin (``Worker.encoded`` reads the model's own
encoder counter). ``Worker`` holds the MRV2 objects a GPU
worker keeps for a pooling multimodal model and runs whole-prompt prefill
steps with them. ``start_scheduler`` starts the v1 scheduler with vLLM's own
``EngineCore._initialize_kv_caches``, over an executor whose one worker answers
as a worker answers for a model without vLLM attention layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import MethodType, SimpleNamespace
from typing import Any

import numpy as np
import torch
from vllm import PoolingParams
from vllm.v1.engine.core import EngineCore
from vllm.v1.executor.abstract import Executor
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.worker.gpu.async_utils import AsyncPoolingOutput
from vllm.v1.worker.gpu.mm.encoder_cache import EncoderCache
from vllm.v1.worker.gpu.model_states import init_model_state
from vllm.v1.worker.gpu.pool.pooling_runner import PoolingRunner

__all__ = [
    "Worker",
    "WorkerlessExecutor",
    "engine_step",
    "runner_output",
    "start_scheduler",
]


class Worker:
    """The MRV2 objects one GPU worker keeps for a pooling multimodal model."""

    def __init__(self, vc: Any, model: torch.nn.Module) -> None:
        self.model = model
        self.device = torch.device("cpu")
        self.encoder_cache = EncoderCache()
        self.model_state = init_model_state(vc, model, self.encoder_cache, self.device)
        self.pooling = PoolingRunner(model, vc)
        self.slots: dict[str, int] = {}
        self.prompts: dict[str, list[int]] = {}

    def add(self, req_id: str, new_req: Any, params: PoolingParams) -> None:
        """As ``GPUModelRunner.add_requests`` registers a new request."""
        # A slot no live request holds; MRV2's RequestState reuses freed ones.
        used = set(self.slots.values())
        slot = next(i for i in range(len(used) + 1) if i not in used)
        self.slots[req_id] = slot
        self.prompts[req_id] = list(new_req.prompt_token_ids)
        self.pooling.add_request(req_id, slot, params, new_req.prompt_token_ids)
        self.encoder_cache.add_request(req_id, new_req.mm_features)
        self.model_state.add_request(slot, new_req)

    def remove(self, req_id: str) -> None:
        self.pooling.remove_request(self.slots.pop(req_id))
        self.encoder_cache.remove_request(req_id)
        self.model_state.remove_request(req_id)

    def encoded(self) -> int:
        return int(self.model.counters.snapshot()["passages_encoded"])

    @torch.inference_mode()
    def step(
        self, req_ids: list[str], scheduled_encoder_inputs: dict[str, list[int]]
    ) -> tuple[list[torch.Tensor], list[bool]]:
        """One prefill step over whole prompts: encoder, embeds, forward, pool."""
        prompts = [self.prompts[r] for r in req_ids]
        lens = np.array([len(p) for p in prompts], dtype=np.int32)
        query_start = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        num_tokens = int(lens.sum())
        batch = SimpleNamespace(
            req_ids=req_ids,
            num_reqs=len(req_ids),
            num_tokens=num_tokens,
            num_tokens_after_padding=num_tokens,  # eager: no padding
            idx_mapping_np=np.array([self.slots[r] for r in req_ids], dtype=np.int32),
            input_ids=torch.tensor(sum(prompts, []), dtype=torch.int32),
            positions=torch.cat([torch.arange(n) for n in lens]),
            num_scheduled_tokens=lens,
            query_start_loc=torch.from_numpy(query_start),
            query_start_loc_np=query_start,
            prefill_len_np=lens,
            num_computed_tokens_np=np.zeros_like(lens),
            seq_lens_cpu_upper_bound=torch.from_numpy(lens),
        )
        # RequestState is indexed by slot, as MRV2's persistent state is.
        prompt_len = np.zeros(max(self.slots.values()) + 1, dtype=np.int32)
        prompt_len[batch.idx_mapping_np] = lens
        req_states = SimpleNamespace(prompt_len=SimpleNamespace(np=prompt_len))
        embeds = self.model_state.prepare_inputs_embeds(
            scheduled_encoder_inputs, batch, req_states
        )
        hidden = self.model(
            input_ids=None, positions=batch.positions, inputs_embeds=embeds
        )
        return self.pooling.pool(hidden, batch, req_states)


class WorkerlessExecutor(Executor):
    """vLLM's executor logic over one in-process 'worker' that answers as a GPU
    worker answers for this model: it has no vLLM attention layers, so an empty
    KV-cache spec, no attention backend, and nothing to allocate, profile,
    warm up or offload."""

    def _init_executor(self) -> None:
        from vllm.v1.worker.worker_base import WorkerBase

        # WorkerBase's own code records the layout the engine core resolves.
        self._worker = SimpleNamespace(vllm_config=self.vllm_config)
        self._set_layout = MethodType(WorkerBase.set_kv_cache_layout, self._worker)

    def collective_rpc(  # type: ignore[override]
        self,
        method: Any,
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict | None = None,
        non_block: bool = False,
    ) -> list[Any]:
        from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts

        # One answer per worker, as every executor returns them.
        answers: dict[str, Callable[..., list[Any]]] = {
            "get_kv_cache_spec": lambda: [{}],
            # No backend: a real worker would fall back to the platform's
            # default one, which needs a GPU; layouts of no backend instead.
            "get_supported_kv_cache_layouts": lambda: [
                [layout.name for layout in get_supported_kv_cache_layouts([])]
            ],
            "set_kv_cache_layout": lambda *a: [self._set_layout(*a)],
            "initialize_from_config": lambda *a: [None],
            "compile_or_warm_up_model": lambda: [],  # nothing compiled or timed
            "get_simple_cpu_offload_num_cpu_blocks": lambda: [None],
            "disable_extensible_kv_cache": lambda *a: [None],
        }
        name = method if isinstance(method, str) else method.__name__
        return answers[name](*args, **(kwargs or {}))

    def check_health(self) -> None:
        return None


def start_scheduler(vc: Any) -> tuple[Any, dict]:
    """As ``EngineCore.__init__`` builds the scheduler (vllm/v1/engine/core.py)."""
    from vllm.v1.core.kv_cache_utils import resolve_kv_cache_block_sizes
    from vllm.v1.structured_output import StructuredOutputManager

    chunked_at_config = vc.scheduler_config.enable_chunked_prefill
    executor = WorkerlessExecutor(vc)
    core = SimpleNamespace(
        model_executor=executor,
        collective_rpc=executor.collective_rpc,
        available_gpu_memory_for_kv_cache=-1,
    )
    # The real start-up code; only its executor (the worker side) is ours.
    init_kv_caches = EngineCore._initialize_kv_caches
    kv_cache_config = init_kv_caches(core, vc)  # type: ignore[arg-type]
    if len(kv_cache_config.kv_cache_groups) == 0:  # EngineCore's own rule
        vc.scheduler_config.enable_chunked_prefill = False
    block_size, hash_block_size = resolve_kv_cache_block_sizes(kv_cache_config, vc)
    scheduler_cls = vc.scheduler_config.get_scheduler_cls()
    scheduler = scheduler_cls(
        vllm_config=vc,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vc),
        include_finished_set=vc.parallel_config.data_parallel_size > 1,
        log_stats=False,
        block_size=block_size,
        hash_block_size=hash_block_size,
    )
    return scheduler, {
        "class": scheduler_cls.__name__,
        "kv_cache_groups": len(kv_cache_config.kv_cache_groups),
        "num_blocks": kv_cache_config.num_blocks,
        "chunked_prefill_at_config": chunked_at_config,
        "chunked_prefill": vc.scheduler_config.enable_chunked_prefill,
    }


def engine_step(scheduler: Any, worker: Worker) -> dict:
    so = scheduler.schedule()
    # GPUModelRunner.execute_model's bookkeeping, in its order.
    for req_id in sorted(so.finished_req_ids):
        worker.remove(req_id)
    for mm_hash in so.free_encoder_mm_hashes:
        worker.encoder_cache.free_encoder_cache(mm_hash)
    for new_req in so.scheduled_new_reqs:
        worker.add(new_req.req_id, new_req, new_req.pooling_params)
    # 0.33+ (MRV2): payload updates for features already sent; absent in 0.32.
    for req_id, updates in getattr(so, "encoder_input_updates", {}).items():
        worker.encoder_cache.update_encoder_inputs(req_id, updates)
    req_ids = list(so.num_scheduled_tokens)
    assert all(so.num_scheduled_tokens[r] == len(worker.prompts[r]) for r in req_ids), (
        "a prompt was split (chunked prefill must be off)"
    )
    before = worker.encoded()
    outputs, finished = worker.step(req_ids, so.scheduled_encoder_inputs)
    encoded = worker.encoded() - before
    engine_outputs = scheduler.update_from_output(
        so, runner_output(req_ids, outputs, finished)
    )
    delivered = {
        out.request_id: float(out.pooling_output.reshape(-1)[0])
        for batch in engine_outputs.values()
        for out in batch.outputs
        if out.pooling_output is not None
    }
    return {
        "scheduled": req_ids,
        "encoder_inputs": {r: list(v) for r, v in so.scheduled_encoder_inputs.items()},
        "passages_encoded": encoded,
        "margins": [delivered.get(r) for r in req_ids],
        "finished": [r for r in req_ids if r in delivered],
    }


def runner_output(
    req_ids: list[str], outputs: list[torch.Tensor], finished: list[bool]
) -> Any:
    """What MRV2's ``pool()`` hands the scheduler: an ``AsyncPoolingOutput``
    (host copies of finished requests' outputs), resolved."""
    kwargs: dict[str, Any] = {"req_ids": req_ids}
    fields = {f.name for f in dataclasses.fields(ModelRunnerOutput)}
    if "req_id_to_index" in fields:  # 0.32 and 0.33; dropped in 0.34
        kwargs["req_id_to_index"] = {r: i for i, r in enumerate(req_ids)}
    return AsyncPoolingOutput(
        model_runner_output=ModelRunnerOutput(**kwargs),
        pooler_output=outputs,
        finished_mask=finished,
        main_stream=torch.cuda.current_stream(),  # placeholders (vLLM's shims)
        copy_stream=torch.cuda.Stream(),
    ).get_output()
