# SPDX-License-Identifier: Apache-2.0
"""Tolerances and inputs shared by the tests."""

from __future__ import annotations

import contextlib
import io
import json
import socket
from dataclasses import dataclass
from pathlib import Path

from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import synthetic_text
from kalm_t5gemma2_vllm_plugin.cli import encode

#: Largest |margin difference| tolerated between any score path and the
#: reference on the same checkpoint, in float32.
MARGIN_ATOL = 1e-4
#: Scores of the same pair computed alone or inside a mixed batch.
BATCH_ATOL = 1e-5

QUERY = "What is the capital of China?"


def fidelity_documents() -> dict[str, str]:
    """Documents covering the edge cases every score path must get right."""
    return {
        "one-token": "x",
        "empty": "",
        "short": "The capital of China is Beijing.",
        "beyond-window": synthetic_text(40, seed=1),
        "many-tokens": synthetic_text(150, seed=2),
        "beyond-max-length": synthetic_text(400, seed=3),
        "unicode": "北京是中国的首都。Ελληνικά, emoji 🙂, naïve café — ok",
    }


def write_corpus(path: Path, docs: dict[str, str]) -> Path:
    path.write_text(
        "".join(
            json.dumps({"id": k, "text": v}, ensure_ascii=False) + "\n"
            for k, v in docs.items()
        ),
        encoding="utf-8",
    )
    return path


@dataclass
class EncodeRun:
    returncode: int
    stdout: str
    stderr: str


def encode_args(checkpoint: Path, corpus: Path, store: Path, *extra: str) -> list[str]:
    """``kalm-vllm-encode`` arguments; the stores are float32 (the tests'
    engines run float32, also on a CUDA host) unless ``extra`` says otherwise."""
    dtype = () if "--dtype" in extra else ("--dtype", "float32")
    model = ["--model", str(checkpoint), "--input", str(corpus)]
    return [*model, "--store", str(store), *dtype, *extra]


def run_encode(
    checkpoint: Path, corpus: Path, store: Path, *extra: str, check: bool = True
) -> EncodeRun:
    """``kalm-vllm-encode`` in this process (its ``main``), output captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = encode.main(encode_args(checkpoint, corpus, store, *extra))
    done = EncodeRun(code, out.getvalue(), err.getvalue())
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def corpus_docs() -> dict[str, str]:
    docs = {f"doc-{i}": synthetic_text(3 + 11 * i, seed=40 + i) for i in range(10)}
    docs["empty"] = ""
    docs["unicode"] = "北京是中国的首都 🙂"
    docs["long"] = synthetic_text(1500, seed=99)  # beyond document_max_length
    return docs


#: The bucket the ``s3`` fixture (moto on 127.0.0.1) creates.
S3_BUCKET = "kalm"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def store_option_flags(options: dict[str, str]) -> list[str]:
    """``--store-option KEY=VALUE`` for each storage option."""
    return [arg for k, v in options.items() for arg in ("--store-option", f"{k}={v}")]
