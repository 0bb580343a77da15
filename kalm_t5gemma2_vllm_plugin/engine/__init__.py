# SPDX-License-Identifier: Apache-2.0
"""The caller's side of one vLLM engine, shared by the offline reranker and the
HTTP service: the session, the requests it builds, and the vLLM-version shims."""
