# SPDX-License-Identifier: Apache-2.0
"""The passage store: its format (``format``) and the corpus encoder that
writes it (``encoder``)."""
