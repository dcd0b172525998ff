import json

import pytest
import torch
from conftest import SHARED_DATA

from lowbit.data import calibration_windows, eval_windows, load_text, tokenize
from lowbit.errors import DataError

needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason="no data sets: set LOWBIT_DATA_DIR (e.g. ../shared/data)"
)


@needs_shared
def test_wikitext_prepared_as_protocol_says():
    raw = (SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    lines = [line for line in raw.replace("\r\n", "\n").split("\n") if line.strip()]
    text = load_text("wikitext2")
    assert text == "\n\n".join(lines)
    assert "\r" not in text and text.startswith(" = Robert Boulter = ")


@needs_shared
def test_c4_documents_joined():
    text = load_text("c4")
    assert len(text.split("\n\n")) == 584


def test_eval_windows_cut_from_start_and_drop_tail():
    tokens = torch.arange(1300)
    w = eval_windows(tokens, seqlen=512)
    assert w.shape == (2, 512)
    assert torch.equal(w[1], torch.arange(512, 1024))
    assert eval_windows(torch.arange(512 * 70), 512, limit=64).shape == (64, 512)


def test_calibration_windows_follow_protocol():
    tokens = torch.arange(5000)
    w = calibration_windows(tokens, nsamples=8, seqlen=512, seed=0)
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 5000 - 512, (8,), generator=g)
    assert w.shape == (8, 512)
    assert torch.equal(w[:, 0], starts)
    assert torch.equal(w, calibration_windows(tokens, nsamples=8, seqlen=512, seed=0))


def test_text_shorter_than_a_window_is_refused():
    with pytest.raises(DataError, match="fewer than one window"):
        eval_windows(torch.arange(100), seqlen=512)
    with pytest.raises(DataError, match="fewer than one window"):
        calibration_windows(torch.arange(512), nsamples=4, seqlen=512)


def test_local_text_and_jsonl_sources(tmp_path, tiny_tokenizer):
    txt = tmp_path / "a.txt"
    txt.write_text("hello world")
    assert load_text(str(txt)) == "hello world"
    jl = tmp_path / "b.jsonl"
    jl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_text(str(jl)) == "one\n\ntwo"
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"content": 1}\n')
    with pytest.raises(DataError, match="c.jsonl:1"):
        load_text(str(bad))
    assert tokenize(tiny_tokenizer, "hello world").dtype == torch.long


def test_missing_data_set_and_bad_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="LOWBIT_DATA_DIR=.*not a directory"):
        load_text("wikitext2")
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="not found at .*wiki.test.raw"):
        load_text("wikitext2")
    with pytest.raises(DataError, match="neither a named data set"):
        load_text("no-such-data")


def test_no_data_dir_and_no_hub_library_says_what_to_do(monkeypatch):
    import builtins

    monkeypatch.delenv("LOWBIT_DATA_DIR", raising=False)
    real_import = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError, match="set LOWBIT_DATA_DIR"):
        load_text("c4")
