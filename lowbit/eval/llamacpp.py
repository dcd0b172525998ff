"""Scoring a GGUF file with llama.cpp itself (through xllamacpp, a prebuilt CPU build).

llama.cpp's server answers one next-token distribution per request, which for 64 windows of
512 tokens would take hours. Its embedding endpoint instead returns, for every position of a
window in one pass, the final hidden state (after the output norm): everything llama.cpp
computes except the output head. lowbit applies the head itself, in float32, with the file's
own head weights dequantized exactly (gguf.quants). So the whole body is llama.cpp's
arithmetic (its kernels, its 8-bit rounding of activations in quantized dot products), and
only the last matrix product is not; the gap that leaves is measured in the tests and in
BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from lowbit.errors import LowbitError, ModelLoadError

SOURCE_KEY = "lowbit.source"  # written by lowbit's GGUF export: the float model it came from


def read_gguf(path: str | os.PathLike) -> GGUFReader:
    """The file's reader, or a one-line refusal for a file that is not a whole GGUF."""
    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({exc}); re-export or re-download it") from exc


def gguf_source(reader: GGUFReader) -> str | None:
    field = reader.fields.get(SOURCE_KEY)
    return None if field is None else str(field.contents())


def _head(reader: GGUFReader) -> torch.Tensor:
    tensors = {t.name: t for t in reader.tensors}
    t = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if t is None:
        raise ModelLoadError("the GGUF file has neither output.weight nor token_embd.weight")
    return torch.from_numpy(np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32))


@contextlib.contextmanager
def _quiet_stderr(enabled: bool):
    """llama.cpp logs every request on stderr (file descriptor 2); hide it unless asked."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class LlamaCppModel:
    """A GGUF file behind llama.cpp's server, called like a causal LM for `evaluate_windows`:
    `model(batch).logits` ([windows, seqlen, vocab], float32)."""

    def __init__(self, path: str | os.PathLike, context: int = 512, threads: int | None = None, quiet: bool = True):
        try:
            import xllamacpp
        except ImportError as exc:
            raise LowbitError("--engine llama.cpp needs the xllamacpp package: pip install xllamacpp") from exc
        self.path = Path(path)
        reader = read_gguf(self.path)
        self.head = _head(reader)
        cap = reader.fields.get(f"{reader.fields['general.architecture'].contents()}.final_logit_softcapping")
        self.softcap = None if cap is None else float(cap.contents())
        params = xllamacpp.CommonParams()
        params.model.path = str(self.path)
        params.n_ctx = context
        params.n_batch = params.n_ubatch = context
        params.n_parallel = 1
        params.cpuparams.n_threads = threads or os.cpu_count() or 1
        params.cpuparams_batch.n_threads = params.cpuparams.n_threads
        params.embedding = True
        params.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_NONE
        self.quiet = quiet
        with _quiet_stderr(quiet):
            self.server = xllamacpp.Server(params)
        self.address = self.server.listening_address.rstrip("/")

    def _post(self, endpoint: str, body: dict):
        request = urllib.request.Request(
            self.address + endpoint, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with _quiet_stderr(self.quiet), urllib.request.urlopen(request, timeout=3600) as response:
            return json.loads(response.read())

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's token ids for `text`: special tokens in it recognised, none added."""
        return self._post("/tokenize", {"content": text, "add_special": False, "parse_special": True})["tokens"]

    def hidden(self, ids: list[int]) -> torch.Tensor:
        """llama.cpp's final hidden states (after the output norm) for one window, [seqlen, d]."""
        answer = self._post("/embedding", {"content": ids})
        if not isinstance(answer, list) or "embedding" not in answer[0]:
            raise LowbitError(f"llama.cpp did not return hidden states: {str(answer)[:200]}")
        return torch.tensor(answer[0]["embedding"], dtype=torch.float32)

    def close(self) -> None:
        """Stop the server (quietly: it logs its shutdown)."""
        with _quiet_stderr(self.quiet):
            self.server = None

    def __call__(self, batch: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        logits = torch.stack([self.hidden(row.tolist()) @ self.head.T for row in batch])
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return SimpleNamespace(logits=logits)


def open_gguf(path: str | os.PathLike, seqlen: int = 512) -> tuple[LlamaCppModel, object, str | None]:
    """The file behind llama.cpp, its tokenizer (read from the file by transformers) and the float
    model lowbit exported it from, when the file names one."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist; check the path")
    reader = read_gguf(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a file it cannot read
        raise ModelLoadError(f"could not read the tokenizer of {path} ({type(exc).__name__}: {exc})") from exc
    return LlamaCppModel(path, context=2 * seqlen), tokenizer, gguf_source(reader)
