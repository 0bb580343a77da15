# SPDX-License-Identifier: Apache-2.0
import importlib.metadata
import subprocess
import sys

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
    } <= names


def test_light_modules_import_without_torch_or_vllm() -> None:
    code = (
        "import sys\n"
        "import kalm_t5gemma2_vllm_plugin, kalm_t5gemma2_vllm_plugin.constants\n"
        "import kalm_t5gemma2_vllm_plugin.errors, kalm_t5gemma2_vllm_plugin.prompting\n"
        "import kalm_t5gemma2_vllm_plugin.validation, kalm_t5gemma2_vllm_plugin.scores\n"
        "import kalm_t5gemma2_vllm_plugin.settings, kalm_t5gemma2_vllm_plugin.cli\n"
        "import kalm_t5gemma2_vllm_plugin.client, kalm_t5gemma2_vllm_plugin.pooling\n"
        "import kalm_t5gemma2_vllm_plugin.engine_prompts\n"
        "import kalm_t5gemma2_vllm_plugin.server.schemas\n"
        "heavy = {'torch', 'vllm', 'transformers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_register_is_idempotent_and_lazy() -> None:
    from vllm import ModelRegistry

    plugin.register()
    plugin.register()
    assert plugin.ARCHITECTURE in ModelRegistry.get_supported_archs()
    assert "T5Gemma2ForConditionalGeneration" != plugin.ARCHITECTURE


def test_public_names() -> None:
    assert plugin.KaLMVLLMReranker.__name__ == "KaLMVLLMReranker"
    assert plugin.KaLMVLLMOfflineReranker is plugin.KaLMVLLMReranker
    assert plugin.KaLMReranker.__module__ == "kalm_t5gemma2_vllm_plugin.reference"
    assert set(plugin.__all__) >= {"KaLMVLLMReranker", "KaLMReranker", "register"}
