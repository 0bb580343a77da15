# SPDX-License-Identifier: Apache-2.0
"""Every console script: ``kalm_t5gemma2_vllm_plugin.cli.<name>:main``."""
