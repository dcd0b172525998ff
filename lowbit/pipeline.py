"""Block-by-block calibration and GPTQ quantization, checkpointed after every block.

The model runs one decoder block at a time: the inputs of block 0 are captured
once, then each block accumulates the Hessians of its linears, has them solved
and replaced by quantized layers, and is run again (quantized) to produce the
next block's inputs, so later blocks see and compensate the errors of earlier
ones. Only the calibration activations of one block boundary are kept (twice:
inputs and outputs), plus one block's Hessians.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from lowbit.errors import CheckpointError, LowbitError, NonFiniteActivationError
from lowbit.formats import Format, format_from_dict
from lowbit.models.adapters import ArchAdapter, decoder_blocks, linear_weight
from lowbit.runtime import QuantizedLinear
from lowbit.solvers.gptq import gptq_quantize, relative_output_error

# keyword arguments of a block call that only matter for generation caches
_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past", "use_cache", "output_attentions")


@dataclass
class GPTQSettings:
    """Solver and pipeline options of a GPTQ run (all of them change the result)."""

    percdamp: float = 0.01  # damping as a fraction of mean diag(H)
    block_size: int = 128  # columns per lazy update block
    act_order: bool = True  # columns by decreasing diag(H), static groups (much better on smollm2-135m)
    true_sequential: bool = True  # attention inputs, then o_proj, then MLP: each sees the earlier quantized
    batch_size: int = 8  # calibration windows per block forward
    clip_search: bool = True  # group ranges by a diag(H)-weighted search (solvers.gptq.fit_clipped)
    scale_refit: bool = True  # least-squares scales for the final codes (solvers.gptq.refit_scales)
    # next block's inputs from the last stage's pass plus a linear correction, not a further pass;
    # keeps the last linear's inputs in memory (e.g. 4 bytes x intermediate size x calibration tokens)
    reuse_last_stage: bool = True

    def solver_options(self) -> dict[str, Any]:
        """Keyword arguments of gptq_quantize."""
        return {
            "block_size": self.block_size,
            "percdamp": self.percdamp,
            "act_order": self.act_order,
            "clip_search": self.clip_search,
            "scale_refit": self.scale_refit,
        }


@dataclass
class PipelineStats:
    """Where the quantization wall time went, in seconds."""

    capture: float = 0.0  # embedding + recording every block's call arguments
    forward: float = 0.0  # block forwards (Hessian passes and output passes), Hessian work excluded
    hessian: float = 0.0  # accumulating XᵀX in the hooks
    solve: float = 0.0  # GPTQ solves and layer replacement
    checkpoint: float = 0.0  # writing (or reading) the resume state
    total: float = 0.0
    calibration_tokens: int = 0
    resumed_blocks: int = 0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once what was needed has been recorded."""


@dataclass
class BlockCalls:
    """What each decoder block is called with, per calibration batch."""

    first_inputs: list[torch.Tensor]  # hidden states entering block 0, one tensor per batch
    args: list[list[tuple]]  # [block][batch] extra positional arguments
    kwargs: list[list[dict[str, Any]]]  # [block][batch] keyword arguments (masks, rotary tables ...)
    returns_tuple: bool  # whether a block returns (hidden, ...) rather than hidden


class _Recorder(nn.Module):
    """Stands in for a decoder block during capture: records its call, passes the hidden states on."""

    def __init__(self, block: nn.Module, index: int, last: int, calls: BlockCalls) -> None:
        super().__init__()
        self.block = block
        self.index = index
        self.last = last
        self.calls = calls

    def __getattr__(self, name: str):  # model code may read attributes of its layers
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        extra = tuple(args[1:])
        kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
        self.calls.args[self.index].append(extra)
        self.calls.kwargs[self.index].append(kwargs)
        if self.index == 0:
            self.calls.first_inputs.append(hidden.detach())
            if len(self.calls.first_inputs) == 1:  # learn the block's return convention once
                self.calls.returns_tuple = isinstance(self.block(hidden, *extra, **kwargs), tuple)
        if self.index == self.last:
            raise _StopForward
        return (hidden,) if self.calls.returns_tuple else hidden


@torch.no_grad()
def capture_block_calls(model: nn.Module, adapter: ArchAdapter, windows: torch.Tensor, batch_size: int) -> BlockCalls:
    """Run the model with every block replaced by a recorder: costs the embedding, not the blocks.

    Recording every block (not only the first) keeps per-layer arguments right, e.g.
    Gemma's sliding-window and global layers get different masks and rotary tables.
    """
    blocks = decoder_blocks(model, adapter)
    n = len(blocks)
    calls = BlockCalls([], [[] for _ in range(n)], [[] for _ in range(n)], False)
    originals = list(blocks)
    device = next(model.parameters()).device
    try:
        for i, block in enumerate(originals):
            blocks[i] = _Recorder(block, i, n - 1, calls)
        for start in range(0, windows.shape[0], batch_size):
            try:
                model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return calls


class _HessianAccumulator:
    """Sum of XᵀX over the inputs of one linear (shared by the linears that read the same input).

    Wide inputs accumulate only the block upper triangle (4 row blocks: 10/16 of the products,
    ~0.66x the time measured for 1536 columns); `hessian()` mirrors it. Plain torch matmuls on
    purpose: a BLAS symmetric rank-k update (scipy's ssyrk) computes half the products, but its
    idle OpenBLAS threads then spin against torch's and slowed the block forwards by ~30 % on a
    2-core CPU, more than the Hessians gained.

    With `keep_inputs`, the inputs are also kept (one tensor per batch) for the output
    correction of the block's last stage (see `_corrected_outputs`)."""

    _TRIANGLE_MIN = 512  # narrower inputs: one full matmul is as fast
    _ROW_BLOCKS = 4

    def __init__(
        self, name: str, block_index: int, stop: bool, stats: PipelineStats, keep_inputs: bool = False
    ) -> None:
        self.name, self.block_index, self.stop, self.stats = name, block_index, stop, stats
        self.xtx: torch.Tensor | None = None
        self.rows = 0
        self.inputs: list[torch.Tensor] | None = [] if keep_inputs else None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        t0 = time.perf_counter()
        x = args[0].detach()
        if self.inputs is not None:
            self.inputs.append(x)
        x = x.reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(x).all():
            raise NonFiniteActivationError(
                f"NaN or Inf in the calibration inputs of {self.name} (block {self.block_index}); "
                "the model overflows on this data: compute in float32 or check the calibration text"
            )
        d = x.shape[1]
        if self.xtx is None:
            self.xtx = torch.zeros(d, d, dtype=torch.float32, device=x.device)
        if d < self._TRIANGLE_MIN:
            self.xtx.addmm_(x.t(), x)
        else:
            step = -(-d // self._ROW_BLOCKS)
            for a in range(0, d, step):
                self.xtx[a : a + step, a:].addmm_(x[:, a : a + step].t(), x[:, a:])
        self.rows += x.shape[0]
        self.stats.hessian += time.perf_counter() - t0
        if self.stop:
            raise _StopForward

    @property
    def called(self) -> bool:
        return self.rows > 0

    def hessian(self) -> torch.Tensor:
        """H = 2XᵀX/n, the Hessian of the layer's squared output error."""
        xtx = self.xtx
        if xtx.shape[0] >= self._TRIANGLE_MIN:
            xtx = torch.triu(xtx) + torch.triu(xtx, 1).t()
        return xtx * (2.0 / self.rows)


def _run_block(
    block: nn.Module, inputs: list[torch.Tensor], calls: BlockCalls, index: int
) -> list[torch.Tensor] | None:
    """Run `block` on every batch; None when hooks stopped the passes early."""
    outs: list[torch.Tensor] | None = []
    for b, x in enumerate(inputs):
        try:
            y = block(x, *calls.args[index][b], **calls.kwargs[index][b])
        except _StopForward:
            outs = None
            continue
        if outs is not None:
            outs.append(y[0] if isinstance(y, tuple) else y)
    return outs


def _corrected_outputs(
    block: nn.Module,
    inputs: list[torch.Tensor],
    calls: BlockCalls,
    index: int,
    float_outputs: list[torch.Tensor],
    layer_inputs: list[torch.Tensor],
    delta: torch.Tensor,
) -> list[torch.Tensor]:
    """The block's outputs after its last linear changed by `delta` ([out, in]), without a pass.

    Where that linear's output is added straight to the residual stream (Llama, Qwen, GPT-2 ...)
    the new output is the old one plus X·deltaᵀ. Whether that holds is checked, not assumed: the
    first batch is run for real and compared; where the correction misses (e.g. a norm after the
    MLP, as in Gemma 2) every batch is run for real."""
    actual = _run_block(block, inputs[:1], calls, index)[0]
    outs = [actual]
    for b in range(len(inputs)):
        x = layer_inputs[b]
        fix = (x.reshape(-1, x.shape[-1]).to(delta.dtype) @ delta.t()).reshape(float_outputs[b].shape)
        guess = float_outputs[b] + fix.to(float_outputs[b].dtype)
        if b == 0:
            miss = (guess - actual).float().norm()
            if miss > 1e-2 * fix.float().norm() + 1e-5 * actual.float().norm():
                return outs + _run_block(block, inputs[1:], calls, index)
            continue
        outs.append(guess)
    return outs


def _replace(block: nn.Module, rel_name: str, new: nn.Module) -> None:
    parent, _, child = rel_name.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, child, new)


class Checkpoint:
    """Resume state of a run: quantized blocks, the inputs of the next block, and a manifest.

    Each file is written under a temporary name and renamed; `state.json` is written
    last and is the commit point, so a crash at any moment leaves a consistent state.
    """

    def __init__(self, path: str | os.PathLike, key: str) -> None:
        self.path = Path(path)
        self.key = key

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    def exists(self) -> bool:
        return self.state_file.is_file()

    def read_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"resume state {self.state_file} is unreadable ({exc}); delete {self.path}") from exc
        if state.get("key") != self.key:
            raise CheckpointError(
                f"the checkpoint in {self.path} was made from another model, calibration set or settings; "
                f"rerun with the same ones, or delete {self.path} to start over"
            )
        return state

    def _atomic(self, target: Path, write: Callable[[Path], None]) -> None:
        tmp = target.with_name(f".{target.name}.tmp")
        write(tmp)
        os.replace(tmp, target)

    def save(self, index: int, block: nn.Module, block_prefix: str, inputs: list[torch.Tensor], state: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{name}.{k}": v.contiguous()
            for name, mod in block.named_modules()
            if isinstance(mod, QuantizedLinear)
            for k, v in mod.state_dict().items()
        }
        self._atomic(self.path / f"block_{index}.safetensors", lambda p: save_file(tensors, str(p)))
        nxt = {f"batch_{b}": x.contiguous() for b, x in enumerate(inputs)}
        self._atomic(self.path / f"inputs_{index + 1}.safetensors", lambda p: save_file(nxt, str(p)))
        state = {**state, "key": self.key, "blocks_done": index + 1}
        self._atomic(self.state_file, lambda p: p.write_text(json.dumps(state, indent=1)))
        old = self.path / f"inputs_{index}.safetensors"
        old.unlink(missing_ok=True)

    def load_block(self, index: int, block: nn.Module, layers: dict[str, dict[str, Any]], block_prefix: str) -> None:
        """Put the saved quantized linears of block `index` back into `block`."""
        tensors = self._load(self.path / f"block_{index}.safetensors")
        for full, rec in layers.items():
            if not full.startswith(block_prefix):
                continue
            rel = full[len(block_prefix) :]
            out, n = rec["shape"]
            bias = f"{rel}.bias" in tensors
            layer = QuantizedLinear(n, out, format_from_dict(rec["format"]), bias=bias)
            layer.load_state_dict({k[len(rel) + 1 :]: v for k, v in tensors.items() if k.startswith(rel + ".")})
            _replace(block, rel, layer)

    def load_inputs(self, index: int) -> list[torch.Tensor]:
        tensors = self._load(self.path / f"inputs_{index}.safetensors")
        return [tensors[f"batch_{b}"] for b in range(len(tensors))]

    def _load(self, file: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(file))
        except Exception as exc:  # noqa: BLE001 - any read failure means the same thing here
            raise CheckpointError(f"resume file {file} is missing or damaged ({exc}); delete {self.path}") from exc

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def model_digest(model: nn.Module) -> str:
    """Config plus the first few tensors (embedding, first block): cheap, and distinct per checkpoint."""
    h = hashlib.sha256(model.config.to_json_string().encode())
    for p in list(model.parameters())[:4]:
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def checkpoint_key(model: nn.Module, windows: torch.Tensor, plan: dict[str, Format], settings: GPTQSettings) -> str:
    """A digest of everything that determines the result: config, weights, calibration, plan, settings."""
    h = hashlib.sha256(model_digest(model).encode())
    h.update(windows.numpy().tobytes())
    h.update(json.dumps({k: v.to_dict() for k, v in plan.items()}, sort_keys=True).encode())
    h.update(json.dumps(asdict(settings), sort_keys=True).encode())
    return h.hexdigest()


@dataclass
class PipelineResult:
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    stats: PipelineStats = field(default_factory=PipelineStats)


@torch.no_grad()
def gptq_pipeline(
    model: nn.Module,
    adapter: ArchAdapter,
    plan: dict[str, Format],
    windows: torch.Tensor,
    settings: GPTQSettings | None = None,
    checkpoint: Checkpoint | None = None,
    resume: bool = False,
    progress: bool = True,
    on_block_done: Callable[[int], None] | None = None,
    layer_record: Callable[[Format, Any], dict[str, Any]] | None = None,
) -> PipelineResult:
    """Quantize every linear named in `plan` (full name -> format) block by block, in place.

    `on_block_done(i)` is called after block i is committed (tests use it to
    interrupt a run); `layer_record(fmt, qt)` builds the base manifest entry.
    """
    settings = settings or GPTQSettings()
    result = PipelineResult()
    stats = result.stats
    t_start = time.perf_counter()
    blocks = decoder_blocks(model, adapter)
    stats.calibration_tokens = int(windows.numel())

    t0 = time.perf_counter()
    calls = capture_block_calls(model, adapter, windows, settings.batch_size)
    stats.capture = time.perf_counter() - t0

    start = 0
    inputs = calls.first_inputs
    if checkpoint is not None and resume and checkpoint.exists():
        t0 = time.perf_counter()
        state = checkpoint.read_state()
        start = int(state["blocks_done"])
        result.layers.update(state["layers"])
        for i in range(start):
            checkpoint.load_block(i, blocks[i], state["layers"], f"{adapter.blocks}.{i}.")
        inputs = checkpoint.load_inputs(start)
        stats.resumed_blocks = start
        stats.checkpoint += time.perf_counter() - t0

    bar = tqdm(
        range(len(blocks)), desc="GPTQ blocks", initial=start, total=len(blocks), disable=not progress, unit="block"
    )
    bar.update(0)
    for i in range(start, len(blocks)):
        block = blocks[i]
        prefix = f"{adapter.blocks}.{i}."
        groups = [[n for n in g if prefix + n in plan] for g in adapter.linear_groups]
        groups = [g for g in groups if g]
        stages = [[g] for g in groups] if settings.true_sequential else [groups]
        pending: dict[str, nn.Module] = {}  # quantized layers, installed once the block's passes are done
        outputs: list[torch.Tensor] | None = None
        for k, stage in enumerate(stages):
            # the last stage's pass may run to the end of the block: its outputs, corrected for the
            # last layer's quantization, are the next block's inputs (saves a whole block pass)
            correct = settings.reuse_last_stage and k == len(stages) - 1 and len(stage) == 1 and len(stage[0]) == 1
            accs = []
            handles = []
            for j, group in enumerate(stage):
                acc = _HessianAccumulator(
                    prefix + group[0], i, stop=j == len(stage) - 1 and not correct, stats=stats, keep_inputs=correct
                )
                handles.append(block.get_submodule(group[0]).register_forward_pre_hook(acc))
                accs.append(acc)
            t0, h0 = time.perf_counter(), stats.hessian
            try:
                float_outputs = _run_block(block, inputs, calls, i)
            finally:
                for handle in handles:
                    handle.remove()
            stats.forward += time.perf_counter() - t0 - (stats.hessian - h0)
            t0 = time.perf_counter()
            old_weight = linear_weight(block.get_submodule(stage[0][0])).detach().clone() if correct else None
            for group, acc in zip(stage, accs, strict=True):
                if not acc.called:
                    raise LowbitError(f"{prefix + group[0]} was never called during calibration; its adapter is wrong")
                _solve_group(block, prefix, group, plan, acc.hessian(), settings, result, layer_record, pending)
            stats.solve += time.perf_counter() - t0
            if correct:
                t0 = time.perf_counter()
                layer = block.get_submodule(stage[0][0])
                delta = linear_weight(layer).detach() - old_weight
                outputs = _corrected_outputs(block, inputs, calls, i, float_outputs, accs[0].inputs, delta)
                stats.forward += time.perf_counter() - t0
                accs[0].inputs = None

        if outputs is None:
            t0 = time.perf_counter()
            outputs = _run_block(block, inputs, calls, i)
            stats.forward += time.perf_counter() - t0
        for name, layer in pending.items():
            _replace(block, name, layer)
        for x in outputs:
            if not torch.isfinite(x).all():
                raise NonFiniteActivationError(
                    f"NaN or Inf in the outputs of block {i} ({prefix.rstrip('.')}) after quantization; "
                    "try more bits, a larger damping (--damp) or float32 compute"
                )
        inputs = outputs
        if checkpoint is not None:
            t0 = time.perf_counter()
            checkpoint.save(i, block, prefix, inputs, {"layers": result.layers})
            stats.checkpoint += time.perf_counter() - t0
        errs = [result.layers[prefix + n]["output_error"] for g in groups for n in g]
        bar.set_postfix(max_err=f"{max(errs):.4f}" if errs else "-")
        bar.update(1)
        if on_block_done is not None:
            on_block_done(i)
    bar.close()
    stats.total = time.perf_counter() - t_start
    return result


def _solve_group(
    block: nn.Module,
    prefix: str,
    group: list[str],
    plan: dict[str, Format],
    hessian: torch.Tensor,
    settings: GPTQSettings,
    result: PipelineResult,
    layer_record: Callable[[Format, Any], dict[str, Any]] | None,
    pending: dict[str, nn.Module],
) -> None:
    """Solve the linears that share `hessian`; those with one format are stacked into one solve
    (GPTQ treats rows independently, so this is exact and saves per-column overhead).

    The float module keeps working with the dequantized weight written into it until the
    block is finished (no unpacking on every calibration batch); its quantized replacement
    waits in `pending`."""
    by_format: dict[str, list[str]] = {}
    for name in group:
        by_format.setdefault(json.dumps(plan[prefix + name].to_dict(), sort_keys=True), []).append(name)
    for names in by_format.values():
        fmt = plan[prefix + names[0]]
        mods = [block.get_submodule(n) for n in names]
        weights = [linear_weight(m).detach().float() for m in mods]
        res = gptq_quantize(
            torch.cat(weights),
            hessian,
            fmt,
            **settings.solver_options(),
            name=", ".join(prefix + n for n in names),
        )
        parts = res.qt.split_rows([w.shape[0] for w in weights])
        for name, mod, w, qt in zip(names, mods, weights, parts, strict=True):
            deq = qt.dequantize()
            pending[name] = QuantizedLinear.from_quantized(qt, mod.bias)
            mod.weight.data = (deq.t() if isinstance(mod, Conv1D) else deq).to(mod.weight.dtype).contiguous()
            rec = layer_record(fmt, qt) if layer_record else {"format": fmt.to_dict(), "shape": list(qt.shape)}
            rec["output_error"] = relative_output_error(w, deq, hessian)
            rec["damp"] = res.damp
            result.layers[prefix + name] = rec
