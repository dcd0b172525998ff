"""GGUF metadata for a model whose source is a Hugging Face directory: architecture keys from
config.json, the tokenizer from tokenizer.json, special tokens and chat template.

What llama.cpp needs, per the GGUF spec and llama.cpp's loader: `general.architecture`, the
architecture's hyperparameter keys, and for a byte-level BPE tokenizer ("gpt2") the token list,
token types, merges and a pre-tokenizer name. llama.cpp picks its pre-tokenizer (the regex that
splits text before BPE) by that name; like llama.cpp's own converter, lowbit identifies it by
hashing the token ids the tokenizer gives a fixed probe text, so a tokenizer that splits text
differently is refused instead of silently mis-tokenized.

SentencePiece-style BPE (Llama 2, Mistral, TinyLlama: a tokenizer.json whose BPE model falls
back to byte tokens <0x00>..<0xFF> and writes spaces as "▁") becomes llama.cpp's "llama"
tokenizer: tokens, token types (byte, control, unknown, user-defined), and scores. llama.cpp
merges the adjacent pair whose joined token scores highest, so a token's score is minus the
rank of the merge that makes it, which replays tokenizer.json's merge order. Whether a space is
prefixed to the text comes from tokenizer.json's normalizer or Metaspace pre-tokenizer.
SentencePiece unigram models, a tokenizer without tokenizer.json, and rope scaling (Llama
3.1+) are not written yet; each is refused by name.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFWriter, RopeScalingType, SpecialVocab, TokenType
from tokenizers import Tokenizer

from lowbit.errors import FormatError

# Hugging Face model_type -> llama.cpp architecture (Mistral runs on llama's graph)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}
# llama.cpp's gemma3 graph: every sixth layer attends globally, the others in a sliding window
GEMMA3_PATTERN = 6

# The probe text of llama.cpp's converter (convert_hf_to_gguf.py, get_vocab_base_pre): its token
# ids, hashed, identify a BPE pre-tokenizer.
PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 "
    "33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# sha256 of str(ids) -> llama.cpp's pre-tokenizer name, for the tokenizers of the supported families
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5, Qwen2, Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


@dataclass(frozen=True)
class Shape:
    """What the exporter needs besides the keys: names and q/k row permutation."""

    arch: str
    blocks: int
    heads: int
    kv_heads: int


def hf_shape(config) -> Shape:
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise FormatError(
            f"writing GGUF metadata for architecture {config.model_type!r} is not supported; lowbit writes "
            f"{', '.join(sorted(ARCHITECTURES))} (or export a model whose source is a .gguf file)"
        )
    heads = config.num_attention_heads
    return Shape(arch, config.num_hidden_layers, heads, getattr(config, "num_key_value_heads", None) or heads)


def hf_metadata(source: Path) -> tuple[Shape, Callable[[GGUFWriter], None]]:
    """The shape of the Hugging Face model in `source`, and a writer of every key llama.cpp reads
    for it; whatever cannot be written is refused here, before any tensor is packed."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    shape = hf_shape(config)
    # transformers >= 5 keeps rope settings in rope_parameters (per layer type for Gemma 3); older
    # releases in rope_theta/rope_scaling
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    local = rope.pop("sliding_attention", None)
    rope = rope.pop("full_attention", None) or rope
    theta = rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    kind = rope.get("rope_type") or rope.get("type")
    linear = shape.arch == "gemma3" and kind == "linear"  # Gemma 3 4B-27B: global layers' positions scaled
    if kind not in (None, "default") and not linear:
        raise FormatError(f"{source}: rope scaling {kind!r} is not written to GGUF yet; models without it export")
    if shape.arch == "gemma3":
        _check_gemma3(config, local, source)
    if not (source / "tokenizer.json").is_file():
        raise FormatError(
            f"{source} has no tokenizer.json, which lowbit reads the vocabulary from; write one with "
            "transformers (AutoTokenizer.from_pretrained(SOURCE).save_pretrained(SOURCE), which converts a "
            "SentencePiece tokenizer.model) and export again"
        )
    # tokenizer.json itself, as llama.cpp will reproduce it (transformers 5 may substitute a
    # model-specific pre-tokenizer for some model types)
    spec = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    spm = _sentencepiece_style(spec, source)
    pre = None if spm is not None else _pre_tokenizer(tokenizer, source)

    def write(writer: GGUFWriter) -> None:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // shape.heads
        writer.add_name(source.name)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(shape.blocks)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(shape.heads)
        writer.add_head_count_kv(shape.kv_heads)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_freq_base(float(theta))
        writer.add_vocab_size(config.vocab_size)
        if head_dim * shape.heads != config.hidden_size:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        if shape.arch == "llama":
            writer.add_rope_dimension_count(head_dim)
        if shape.arch == "gemma3":
            writer.add_sliding_window(config.sliding_window)
            writer.add_rope_freq_base_swa(float((local or {}).get("rope_theta") or 10000.0))
            if linear:
                writer.add_rope_scaling_type(RopeScalingType.LINEAR)
                writer.add_rope_scaling_factor(float(rope["factor"]))
        if spm is not None:
            _write_spm_tokenizer(writer, source, config.vocab_size, tokenizer, spec, spm)
        else:
            _write_tokenizer(writer, source, config.vocab_size, tokenizer, pre)

    return shape, write


def _check_gemma3(config, local: dict | None, source: Path) -> None:
    """Refuse a Gemma 3 that llama.cpp's gemma3 graph would compute differently: it scales
    queries by 1/sqrt(head_dim), puts every sixth layer in full attention and rotates the
    sliding layers' positions without scaling."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    scalar = getattr(config, "query_pre_attn_scalar", head_dim)
    if scalar != head_dim:
        raise FormatError(
            f"{source}: query_pre_attn_scalar {scalar} differs from head_dim {head_dim} (Gemma 3 27B); llama.cpp "
            "decides that scale by model size, which lowbit does not write yet"
        )
    types = list(getattr(config, "layer_types", None) or [])
    pattern = ["full_attention" if (i + 1) % GEMMA3_PATTERN == 0 else "sliding_attention" for i in range(len(types))]
    if types != pattern:
        raise FormatError(
            f"{source}: layer_types is not Gemma 3's five sliding layers to one global one, which llama.cpp assumes"
        )
    if local is not None and (local.get("rope_type") or "default") != "default":
        raise FormatError(f"{source}: rope scaling on the sliding layers is not written to GGUF yet")


def _pre_tokenizer(tokenizer: Tokenizer, source: Path) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer, from the probe's ids."""
    digest = hashlib.sha256(str(tokenizer.encode(PROBE).ids).encode()).hexdigest()
    pre = PRE_TOKENIZERS.get(digest)
    if pre is None:
        raise FormatError(
            f"{source}'s tokenizer splits text in a way lowbit cannot name for llama.cpp (probe hash {digest[:12]}); "
            f"known: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}"
        )
    return pre


def _sentencepiece_style(spec: dict, source: Path) -> bool | None:
    """For a SentencePiece-style tokenizer.json, whether a space is prefixed to the text;
    None for a byte-level BPE one. Refuses SentencePiece variants llama.cpp's "llama"
    tokenizer would split differently."""
    model = spec.get("model") or {}
    if model.get("type") == "Unigram":
        raise FormatError(f"{source}: SentencePiece unigram tokenizers are not written to GGUF yet")
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return None
    parts = _flatten(spec.get("normalizer")) + _flatten(spec.get("pre_tokenizer"))
    prefix = any(p.get("type") == "Prepend" and p.get("prepend") == "▁" for p in parts)
    for p in parts:
        if p.get("type") == "Metaspace":
            prefix = prefix or p.get("prepend_scheme", "always") != "never" and p.get("add_prefix_space", True)
        elif p.get("type") not in ("Prepend", "Replace"):
            raise FormatError(
                f"{source}: a SentencePiece-style tokenizer with a {p.get('type')} step is not written to GGUF "
                "yet (llama.cpp's llama tokenizer would split text differently)"
            )
    return bool(prefix)


def _flatten(step: dict | None) -> list[dict]:
    """A normalizer or pre-tokenizer as its list of steps (a Sequence opened up)."""
    if step is None:
        return []
    if step.get("type") == "Sequence":
        inner = step.get("normalizers") or step.get("pretokenizers") or []
        return [x for s in inner for x in _flatten(s)]
    return [step]


def _write_spm_tokenizer(
    writer: GGUFWriter, source: Path, vocab_size: int, tokenizer: Tokenizer, spec: dict, space_prefix: bool
) -> None:
    model = spec["model"]
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
    rank = {}
    for r, (a, b) in enumerate(merges):
        rank.setdefault(a + b, r)
    by_id = {i: t for t, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    added = tokenizer.get_added_tokens_decoder()
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:  # embedding rows past the tokenizer's vocabulary
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(TokenType.UNUSED)
            continue
        tokens.append(text)
        scores.append(-float(rank[text]) if text in rank else 0.0)
        if re.fullmatch(r"<0x[0-9A-F]{2}>", text):
            types.append(TokenType.BYTE)
        elif text == model.get("unk_token"):
            types.append(TokenType.UNKNOWN)
        elif i in added:
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(space_prefix)
    SpecialVocab(source, load_merges=False, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _write_tokenizer(writer: GGUFWriter, source: Path, vocab_size: int, tokenizer: Tokenizer, pre: str) -> None:
    by_id = {i: t for t, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    added = tokenizer.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows past the tokenizer's vocabulary
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    SpecialVocab(source, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
