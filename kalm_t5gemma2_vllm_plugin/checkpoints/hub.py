# SPDX-License-Identifier: Apache-2.0
"""A model name (local directory or Hugging Face Hub id) to a local directory,
and the fingerprint that identifies a checkpoint's weights."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from kalm_t5gemma2_vllm_plugin.errors import KaLMConfigError

__all__ = ["model_fingerprint", "resolve_model"]

# What a KaLM checkpoint needs; the repos also hold ST modules and remote code.
_CHECKPOINT_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]


def resolve_model(model: str | os.PathLike[str]) -> str:
    """Return a local directory holding the checkpoint named by ``model``.

    A directory is used as is; anything else is taken as a Hub repo id and
    fetched (or found in the local Hub cache). Failure is one clear sentence.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise KaLMConfigError(f"Model directory {str(path)!r} has no config.json.")
        return str(path)
    repo_id = str(model)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return snapshot_download(repo_id, allow_patterns=_CHECKPOINT_FILES)
    except HFValidationError as exc:
        raise KaLMConfigError(
            f"Model {repo_id!r} is neither a local directory nor a valid Hugging Face "
            f"repo id."
        ) from exc
    except Exception as exc:  # network, offline mode, missing or gated repo
        raise KaLMConfigError(
            f"Model {repo_id!r} is not a local directory and could not be fetched "
            f"from the Hugging Face Hub ({type(exc).__name__}); check the network "
            f"(HF_HUB_OFFLINE is {os.environ.get('HF_HUB_OFFLINE', 'unset')}) or "
            f"pass a local checkpoint directory."
        ) from exc


def model_fingerprint(model_path: str | os.PathLike[str]) -> str:
    """A hash of the checkpoint's config and weights, cheap even for large files.

    Per weights file: name, size, the safetensors header (every tensor's name,
    dtype, shape and offsets) and 16 evenly spaced 64 KiB samples of the data.
    """
    root = Path(model_path)
    digest = hashlib.sha256((root / "config.json").read_bytes())
    for path in sorted(root.glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(f.read(header_len))
            for i in range(16):
                f.seek(size * i // 16)
                digest.update(f.read(65536))
    return digest.hexdigest()[:32]
