# SPDX-License-Identifier: Apache-2.0
"""The passage store: its format (``format``, which verifies what it reads), the
corpus encoder that writes it (``encoder``) and the whole-store check
(``verify``, behind ``kalm-vllm-store verify``)."""
