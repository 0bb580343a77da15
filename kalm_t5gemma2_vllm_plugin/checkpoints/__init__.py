# SPDX-License-Identifier: Apache-2.0
"""Checkpoints: resolving a model name (``hub``), synthetic KaLM checkpoints
with the real layout for offline tests and benchmarks (``synthetic``), and the
cross-encoder peer of the benchmark (``qwen3_peer``)."""
