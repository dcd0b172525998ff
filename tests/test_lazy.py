"""Lazy, block-by-block weights: the same model and the same artifacts as loading it whole,
with one float block in memory at a time."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TINY_CONFIGS, make_tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import lowbit
from lowbit.activations import Activations, Offload
from lowbit.allocate.size import fixed_bytes
from lowbit.errors import LowbitError, ModelLoadError, NonFiniteWeightError
from lowbit.eval import build_reference
from lowbit.models.adapters import decoder_blocks, get_adapter, quantizable_linears
from lowbit.models.lazy import lazy_weights
from lowbit.models.loading import _lazy_model, resolve_model_source
from lowbit.recipe import GPTQSettings

WINDOWS = torch.randint(2, 256, (8, 64), generator=torch.Generator().manual_seed(0))
SETTINGS = GPTQSettings(batch_size=4)


@pytest.fixture
def sharded_dir(tmp_path, tiny_tokenizer):
    """A tiny Llama of 3 blocks saved in several safetensors shards with an index."""
    path = tmp_path / "sharded"
    make_tiny_model("llama", layers=3).save_pretrained(path, max_shard_size="40KB")
    tiny_tokenizer.save_pretrained(path)
    assert len(list(path.glob("*.safetensors"))) > 2
    return path


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}


def test_a_lazy_model_holds_only_tables_and_loads_blocks_bit_exact(sharded_dir):
    eager = lowbit.load_model(sharded_dir).model
    lazy = lowbit.load_model(sharded_dir, lazy=True).model
    meta = [n for n, p in lazy.named_parameters() if p.is_meta]
    assert meta and all(n.startswith("model.layers.") for n in meta)
    assert not lazy.model.embed_tokens.weight.is_meta and not lazy.model.norm.weight.is_meta
    weights = lazy_weights(lazy)
    weights.load(lazy, "model.layers.1.")
    assert not any(p.is_meta for p in lazy.model.layers[1].parameters())
    assert all(p.is_meta for p in lazy.model.layers[2].parameters())
    weights.release(lazy, "model.layers.1.")
    assert all(p.is_meta for p in lazy.model.layers[1].parameters())
    weights.load(lazy)
    a, b = _state(eager), _state(lazy)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tied = [m.lm_head.weight is m.model.embed_tokens.weight for m in (eager, lazy)]
    assert tied[0] == tied[1]


def _quantize_file(model_dir, lazy: bool, **options):
    model = lowbit.load_model(model_dir, lazy=lazy).model
    options = {"bits": 4, "group_size": 32, "calib": WINDOWS, "progress": False, **options}
    if options.get("method", "gptq") == "gptq":
        options.setdefault("gptq", SETTINGS)
    return lowbit.quantize(model, **options)


@pytest.mark.parametrize(
    "options",
    [{"method": "rtn"}, {}, {"budget_bpw": 5.0}, {"gptq": GPTQSettings(batch_size=4, awq=True)}],
    ids=["rtn", "gptq", "budget", "gptq-awq"],
)
def test_lazy_and_whole_loading_write_byte_identical_artifacts(tmp_path, sharded_dir, options, monkeypatch):
    """Whole, lazy, and lazy with every finished block spilled to disk (nothing packed or float
    left in memory but what the save reads back): the same bytes. The lazy runs read every
    matrix a slice of rows at a time, as they do large tables."""
    monkeypatch.setattr("lowbit.models.lazy._ROWS_BYTES", 1000)
    files = []
    for lazy, spill in ((False, False), (True, False), (True, True)):
        spill_dir = tmp_path / f"spill-{lazy}" if spill else None
        model = _quantize_file(sharded_dir, lazy, spill_dir=spill_dir, **options)
        assert lazy_weights(model) is not None if lazy else lazy_weights(model) is None
        if spill:
            on_disk = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
            packed = [n for n in model.state_dict() if n.endswith(".qweight")]
            assert packed and set(packed) <= set(on_disk)
            assert "model.embed_tokens.weight" in on_disk and "model.norm.weight" in on_disk
            assert len(list(spill_dir.glob("*.safetensors"))) == 3  # one file per block
        out = lowbit.save(model, tmp_path / f"art-{lazy}-{spill}")
        files.append((out / "model.safetensors").read_bytes())
    assert files[0] == files[1] == files[2]


@pytest.mark.parametrize("options", [{}, {"budget_bpw": 5.0}], ids=["gptq", "budget"])
def test_activations_offloaded_to_cpu_or_disk_give_the_same_artifact(tmp_path, sharded_dir, options, monkeypatch):
    """Where the activations between blocks wait changes no byte: GPTQ's pass (with its output
    correction) and a budget's measurement pass, with the batches in memory-mapped files."""
    to_file = Activations._to_file
    written = []
    monkeypatch.setattr(Activations, "_to_file", lambda self, x: written.append(x.shape) or to_file(self, x))
    files = []
    for offload in (None, "disk") if options else (None, "cpu", "disk"):  # on a CPU, cpu is where they are
        work = tmp_path / f"work-{offload}"
        model = _quantize_file(sharded_dir, True, offload_activations=offload, checkpoint_dir=work, **options)
        files.append((lowbit.save(model, tmp_path / f"art-{offload}") / "model.safetensors").read_bytes())
    assert all(f == files[0] for f in files)
    assert len(written) >= 3 * 2  # every block's outputs of both batches went to files
    assert not any((tmp_path / "work-disk" / "activations").iterdir())  # every mapped file was unlinked


def test_an_unknown_or_unwritable_activation_offload_is_refused_before_any_work(tmp_path, sharded_dir):
    from lowbit.job import quantize_to_artifact
    from lowbit.recipe import Recipe

    recipe = Recipe.build(bits=4, group_size=32, calib=WINDOWS)
    with pytest.raises(LowbitError, match="unknown activation offload 'gpu'; choose one of cpu, disk"):
        quantize_to_artifact(sharded_dir, recipe, tmp_path / "a", offload_activations="gpu", progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(LowbitError, match="cannot write activations to .*file.*pick a writable directory"):
        Offload("disk", tmp_path / "file" / "sub").check()
    assert not (tmp_path / "a").exists()


def test_a_run_without_evaluation_spills_its_blocks_and_its_model_reads_the_artifact(tmp_path, sharded_dir):
    from lowbit.job import quantize_to_artifact
    from lowbit.recipe import Recipe

    # RTN never runs the model: the tables stay on disk as well as the blocks
    assert all(p.is_meta for p in lowbit.load_model(sharded_dir, lazy=True, tables_on_disk=True).model.parameters())
    recipe = Recipe.build(bits=4, group_size=32, method="rtn")
    done = quantize_to_artifact(sharded_dir, recipe, tmp_path / "art", progress=False)
    assert done._model is None  # the blocks went to disk as they finished
    assert done.manifest["stats"]["compute"] == {"device": "cpu", "dtype": "float32", "lazy": True}
    eager = _quantize_file(sharded_dir, False, method="rtn")
    reference = lowbit.save(eager, tmp_path / "eager")
    assert (done.out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    with torch.no_grad():
        torch.testing.assert_close(done.model(WINDOWS[:2]).logits, eager(WINDOWS[:2]).logits)


def test_a_size_budget_counts_a_lazy_models_blocks_and_writes_the_same_artifact(tmp_path, sharded_dir):
    """The float tensors still on disk (every block's norms) count toward the file: all meta
    tensors share data_ptr 0, and telling them apart by it once counted only one of them."""
    eager, lazy = (lowbit.load_model(sharded_dir, lazy=flag).model for flag in (False, True))
    quantized = {n for n, _ in quantizable_linears(eager, get_adapter("llama"))}
    assert fixed_bytes(lazy, quantized, torch.float16) == fixed_bytes(eager, quantized, torch.float16)
    size = sum(f.stat().st_size for f in sharded_dir.glob("*.safetensors")) // 3  # float32 file: ~1/3 packs it
    files = []
    for flag in (False, True):
        model = _quantize_file(sharded_dir, flag, size_bytes=size)
        files.append((lowbit.save(model, tmp_path / f"size-{flag}") / "model.safetensors").read_bytes())
    assert files[0] == files[1] and len(files[0]) <= size


def test_a_lazy_gptq_run_interrupted_resumes_to_the_same_weights(tmp_path, sharded_dir):
    class Crash(Exception):
        pass

    def crash_after_1(i: int) -> None:
        if i == 1:
            raise Crash

    full = _quantize_file(sharded_dir, lazy=True, checkpoint_dir=tmp_path / "full")
    with pytest.raises(Crash):
        _quantize_file(sharded_dir, lazy=True, checkpoint_dir=tmp_path / "ckpt", on_block_done=crash_after_1)
    resumed = _quantize_file(sharded_dir, lazy=True, checkpoint_dir=tmp_path / "ckpt", resume=True)
    assert resumed.lowbit_info.stats["pipeline"]["resumed_blocks"] == 2
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_in_a_lazy_block_is_named_when_the_block_is_read(tmp_path, sharded_dir):
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    name = "model.layers.2.mlp.up_proj.weight"
    shard = sharded_dir / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(NonFiniteWeightError, match=name):
        _quantize_file(sharded_dir, lazy=True, method="rtn")


def test_a_missing_shard_is_named(sharded_dir):
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (sharded_dir / shard).unlink()
    with pytest.raises(ModelLoadError, match=f"shard {shard} listed in"):
        lowbit.load_model(sharded_dir, lazy=True)


def test_an_index_entry_no_shard_holds_is_named_before_any_work(sharded_dir):
    path = sharded_dir / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    name = "model.layers.1.self_attn.q_proj.weight"
    holder = index["weight_map"][name]
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != holder)
    index["weight_map"][name] = other
    path.write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=f"tensor {name} in {other}, which does not hold it"):
        lowbit.load_model(sharded_dir, lazy=True)


def test_a_tensor_missing_from_the_checkpoint_is_named(sharded_dir):
    path = sharded_dir / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    name = "model.layers.2.self_attn.o_proj.weight"
    shard = sharded_dir / index["weight_map"].pop(name)
    path.write_text(json.dumps(index))
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=f"holds no tensor {name}"):
        lowbit.load_model(sharded_dir, lazy=True)


def test_a_checkpoint_named_otherwise_loads_whole_through_transformers(tmp_path, tiny_tokenizer):
    """Names lazy loading cannot map at all (here: a base model's, without the "model." prefix)
    are left to transformers' own loading, which maps them."""
    path = tmp_path / "base"
    make_tiny_model("llama").model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    assert not any(k.startswith("model.") for k in load_file(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    loaded = lowbit.load_model(path, lazy=True)
    assert lazy_weights(loaded.model) is None
    assert torch.equal(
        loaded.model.model.layers[0].mlp.up_proj.weight,
        load_file(path / "model.safetensors")["layers.0.mlp.up_proj.weight"],
    )


_PEAK = """
import json, resource, sys, torch, lowbit
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = lowbit.load_model(sys.argv[1], lazy=True).model
lowbit.quantize(model, method="rtn", bits=4, group_size=128, progress=False)
lowbit.save(model, sys.argv[2])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_mb": before / 1024, "peak_mb": peak / 1024}))
"""


def test_a_model_larger_than_its_peak_memory_quantizes(tmp_path, tiny_tokenizer):
    """A 4-block model of ~320 MB in bfloat16 (640 MB in float32 compute) is quantized lazily with
    its peak resident memory growing by less than half the file: one float block at a time."""
    config = AutoConfig.for_model(
        "llama",
        vocab_size=256,
        hidden_size=1536,
        intermediate_size=8192,
        num_hidden_layers=4,
        num_attention_heads=12,
        num_key_value_heads=12,
        tie_word_embeddings=True,
    )
    model_dir = tmp_path / "big"
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = {
        name: (torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.02).to(torch.bfloat16)
        for i, (name, p) in enumerate(skeleton.state_dict().items())
        if name != "lm_head.weight"
    }
    model_dir.mkdir()
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    del tensors
    config.torch_dtype = torch.bfloat16
    config.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    size_mb = (model_dir / "model.safetensors").stat().st_size / 2**20
    assert size_mb > 300
    code = textwrap.dedent(_PEAK)
    out = subprocess.run(
        [sys.executable, "-c", code, str(model_dir), str(tmp_path / "art")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    assert rss["peak_mb"] - rss["before_mb"] < 0.5 * size_mb, (rss, size_mb)
    assert (tmp_path / "art" / "model.safetensors").stat().st_size < 0.4 * size_mb * 2**20


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_every_family_loads_lazily_and_its_reference_is_computed_block_by_block_bit_exact(tmp_path, arch):
    path = tmp_path / arch
    make_tiny_model(arch, layers=3).save_pretrained(path)
    eager = AutoModelForCausalLM.from_pretrained(path).eval()
    source = resolve_model_source(path)
    lazy = _lazy_model(source, AutoConfig.from_pretrained(path), torch.float32, trust_remote_code=False)
    assert lazy is not None and any(p.is_meta for p in lazy.parameters())
    a = build_reference(eager, WINDOWS, batch_size=4, progress=False)
    b = build_reference(lazy, WINDOWS, batch_size=4, progress=False)
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.head_weight, b.head_weight)
    # the activations between blocks in memory-mapped files: the same reference
    c = build_reference(lazy, WINDOWS, batch_size=4, progress=False, offload=Offload("disk", tmp_path).check())
    assert torch.equal(a.hidden, c.hidden)
    assert all(p.is_meta for p in decoder_blocks(lazy, get_adapter(lazy.config.model_type)).parameters())
    lazy_weights(lazy).load(lazy)
    sa, sb = eager.state_dict(), lazy.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
