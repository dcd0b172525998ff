import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model

import lowbit
from lowbit.eval import build_reference, cached_reference, evaluate_windows
from lowbit.eval.reference import ReferenceCache, reference_cache_path


def _windows(n=6, seqlen=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, seqlen), generator=g)


def test_perplexity_matches_direct_computation():
    model = make_tiny_model("llama")
    w = _windows()
    res = evaluate_windows(model, w, batch_size=4, progress=False)
    with torch.no_grad():
        logits = model(w).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
    assert res["perplexity"] == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert res["tokens_scored"] == 6 * 31


def test_model_against_itself_has_zero_kld_and_full_agreement():
    model = make_tiny_model("gemma2")  # with logit soft-capping
    w = _windows()
    ref = build_reference(model, w, batch_size=4, progress=False)
    res = evaluate_windows(model, w, ref, batch_size=3, progress=False)
    assert abs(res["kld"]) < 1e-5
    assert res["top1_agreement"] == 1.0


def test_kld_matches_direct_computation_for_quantized_model():
    model = make_tiny_model("qwen2")
    w = _windows()
    with torch.no_grad():
        ref_logp = F.log_softmax(model(w).logits[:, :-1], -1)
    ref = build_reference(model, w, progress=False)
    lowbit.quantize(model, bits=3, method="rtn", group_size=32, progress=False)
    res = evaluate_windows(model, w, ref, batch_size=4, progress=False)
    with torch.no_grad():
        q_logp = F.log_softmax(model(w).logits[:, :-1], -1)
    kld = (ref_logp.exp() * (ref_logp - q_logp)).sum(-1).mean().item()
    agree = (ref_logp.argmax(-1) == q_logp.argmax(-1)).float().mean().item()
    assert res["kld"] == pytest.approx(kld, rel=1e-4)
    assert res["kld"] > 1e-4
    assert res["top1_agreement"] == pytest.approx(agree)


def test_reference_cache_on_disk_is_reused_and_exact(tmp_path):
    model = make_tiny_model("llama")
    w = _windows()
    calls = []

    def loader():
        calls.append(1)
        return model

    a = cached_reference("tiny-llama|v1", w, loader, progress=False)
    b = cached_reference("tiny-llama|v1", w, loader, progress=False)
    assert len(calls) == 1  # second time from disk
    assert reference_cache_path("tiny-llama|v1", w).is_file()
    assert torch.equal(a.logits(slice(0, 6)), b.logits(slice(0, 6)))
    with torch.no_grad():
        assert torch.allclose(b.logits(slice(0, 6)), model(w).logits, atol=1e-5)
    cached_reference("tiny-llama|v2", w, loader, progress=False)
    assert len(calls) == 2  # another model fingerprint is another entry


def test_damaged_reference_cache_is_recomputed():
    model = make_tiny_model("llama")
    w = _windows()
    path = reference_cache_path("fp", w)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage")
    ref = cached_reference("fp", w, lambda: model, progress=False)
    assert isinstance(ref, ReferenceCache) and ref.num_windows == 6


def test_evaluate_api_end_to_end(tiny_tokenizer, text_file):
    model = make_tiny_model("llama")
    res = lowbit.evaluate(model, tiny_tokenizer, reference=model, data=str(text_file), seqlen=64, progress=False)
    assert res["windows"] >= 1 and abs(res["kld"]) < 1e-5 and res["perplexity"] > 1


def test_reference_perplexity_from_cache_equals_direct_evaluation():
    from lowbit.eval import reference_perplexity

    model = make_tiny_model("opt")
    w = _windows()
    direct = evaluate_windows(model, w, progress=False)["perplexity"]
    assert reference_perplexity(build_reference(model, w, progress=False), w) == pytest.approx(direct, rel=1e-5)
