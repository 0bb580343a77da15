# SPDX-License-Identifier: Apache-2.0
"""The rerankers: the product (``vllm.KaLMVLLMReranker``), the fidelity oracle
(``reference.KaLMReranker``) and the contract both honour (``base``)."""
