"""Shared fixtures: tiny random models of every supported family, a tiny tokenizer,
and data/cache directories pointed at test locations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

# the data sets: where LOWBIT_DATA_DIR points, else ../shared/data beside the checkout
SHARED_DATA = (
    Path(os.environ.get("LOWBIT_DATA_DIR") or Path(__file__).parents[2] / "shared" / "data").expanduser().resolve()
)
VOCAB = 256
if SHARED_DATA.is_dir():  # module-scoped fixtures need it too, so set it at import
    os.environ["LOWBIT_DATA_DIR"] = str(SHARED_DATA)

_COMMON = {"vocab_size": VOCAB, "num_hidden_layers": 2, "bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0}
_LLAMA_LIKE = {
    **_COMMON,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
TINY_CONFIGS: dict[str, dict] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": {**_LLAMA_LIKE, "head_dim": 16},
    "gemma": {**_LLAMA_LIKE, "head_dim": 16},
    "gemma2": {**_LLAMA_LIKE, "head_dim": 16, "final_logit_softcapping": 30.0},
    "gemma3_text": {**_LLAMA_LIKE, "head_dim": 16},
    "phi3": _LLAMA_LIKE,
    "opt": {
        **_COMMON,
        "hidden_size": 64,
        "ffn_dim": 96,
        "num_attention_heads": 4,
        "word_embed_proj_dim": 64,
        "max_position_embeddings": 256,
    },
    "gpt2": {**_COMMON, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256},
}


def make_tiny_model(arch: str, seed: int = 0, layers: int | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    options = dict(TINY_CONFIGS[arch])
    if layers is not None:
        options["n_layer" if arch == "gpt2" else "num_hidden_layers"] = layers
    config = AutoConfig.for_model(arch, **options)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random init is too smooth to exercise grids; widen the weights
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def logits_before_and_after_reload(model: torch.nn.Module, path: Path, x: torch.Tensor):
    """The quantized model's logits on `x`, and those of the artifact it saves to `path`, loaded back."""
    import lowbit

    with torch.no_grad():
        before = model(x).logits
    lowbit.save(model, path)
    loaded = lowbit.load(path)
    with torch.no_grad():
        return before, loaded(x).logits, loaded


def kl_judge(reference: torch.nn.Module, windows: torch.Tensor):
    """KL(reference || model) per token on `windows`, as a function of the model: how the tests
    judge quality (never by weight error)."""
    with torch.no_grad():
        ref = reference(windows).logits.log_softmax(-1)

    def kld(model: torch.nn.Module) -> float:
        with torch.no_grad():
            out = model(windows).logits.log_softmax(-1)
        return (ref.exp() * (ref - out)).sum(-1).mean().item()

    return kld


TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step. "
    "Quantization maps many values to few; the error it leaves is what we measure. "
) * 40


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>"], show_progress=False)
    tok.train_from_iterator([TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer) -> Path:
    """A Hugging Face model directory (tiny Llama with tokenizer) as a user would have."""
    path = tmp_path / "tiny-llama"
    make_tiny_model("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TQDM_DISABLE", "1")
