# SPDX-License-Identifier: Apache-2.0
import importlib.metadata
import subprocess
import sys
import textwrap

import kalm_t5gemma2_vllm_plugin as plugin


def test_entry_point_is_visible_to_vllm() -> None:
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    (ep,) = [ep for ep in eps if ep.name == "kalm_t5gemma2"]
    assert ep.value == "kalm_t5gemma2_vllm_plugin:register"


def test_console_scripts_are_declared() -> None:
    names = {ep.name for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert {
        "kalm-vllm-rerank",
        "kalm-vllm-serve",
        "kalm-vllm-client",
        "kalm-vllm-make-checkpoint",
        "kalm-vllm-bench",
        "kalm-vllm-encode",
        "kalm-vllm-store",
        "kalm-vllm-eval",
    } <= names
    # every console script's main lives in cli/
    for ep in importlib.metadata.entry_points(group="console_scripts"):
        if ep.name.startswith("kalm-vllm-"):
            assert ep.value.startswith("kalm_t5gemma2_vllm_plugin.cli."), ep


def _in_a_fresh_interpreter(code: str) -> None:
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True)


def test_light_modules_import_without_torch_or_vllm() -> None:
    _in_a_fresh_interpreter(
        """
        import sys
        import kalm_t5gemma2_vllm_plugin, kalm_t5gemma2_vllm_plugin.constants
        import kalm_t5gemma2_vllm_plugin.errors, kalm_t5gemma2_vllm_plugin.prompt
        import kalm_t5gemma2_vllm_plugin.validation, kalm_t5gemma2_vllm_plugin.scores
        import kalm_t5gemma2_vllm_plugin.vllm_model.config
        import kalm_t5gemma2_vllm_plugin.cli.rerank, kalm_t5gemma2_vllm_plugin.client
        import kalm_t5gemma2_vllm_plugin.mep, kalm_t5gemma2_vllm_plugin.engine.requests
        import kalm_t5gemma2_vllm_plugin.server.schemas
        heavy = {"torch", "vllm", "transformers"} & set(sys.modules)
        assert not heavy, heavy
        """
    )


def test_register_is_idempotent_and_lazy() -> None:
    """Registering imports no model code: vLLM imports it where it needs it."""
    _in_a_fresh_interpreter(
        """
        import sys
        import kalm_t5gemma2_vllm_plugin as plugin
        from vllm import ModelRegistry
        plugin.register()
        plugin.register()
        assert plugin.ARCHITECTURE in ModelRegistry.get_supported_archs()
        prefix = "kalm_t5gemma2_vllm_plugin.vllm_model"
        loaded = [m for m in sys.modules if m.startswith(prefix)]
        assert not loaded, loaded
        """
    )


def test_public_names() -> None:
    assert plugin.KaLMVLLMOfflineReranker is plugin.KaLMVLLMReranker
    assert (
        plugin.KaLMReranker.__module__
        == "kalm_t5gemma2_vllm_plugin.rerankers.reference"
    )
    assert set(plugin.__all__) >= {"KaLMVLLMReranker", "KaLMReranker", "register"}
