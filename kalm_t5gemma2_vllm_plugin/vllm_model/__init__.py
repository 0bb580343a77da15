# SPDX-License-Identifier: Apache-2.0
"""What vLLM imports in its own processes: the registered model, the "passage"
processor, the pooler, the score template and the model's configuration.

Nothing here imports the caller's side (``engine/``, ``rerankers/``, ``server/``).
"""
