"""Applying a plan: every planned tensor replaced by its packed, quantized form, in place.

Tables (embedding/head) are rounded first, so that calibration then flows through them as the
artifact will hold them. Linears are solved by the recipe's solver: RTN one by one, GPTQ block
by block through the walker, each block's layers calibrated on the outputs of the blocks
(and, with true-sequential order, the layers) already quantized.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from lowbit.activations import Offload
from lowbit.allocate.plan import Plan
from lowbit.digests import model_digest
from lowbit.errors import LowbitError
from lowbit.formats import Format, format_from_dict
from lowbit.memory import trim
from lowbit.models.adapters import ArchAdapter, decoder_blocks, linear_weight
from lowbit.models.lazy import load_block, load_rest, release_unquantized
from lowbit.modules import set_module
from lowbit.recipe import GPTQSettings, RTNSettings
from lowbit.records import layer_record
from lowbit.runtime import QuantizedLinear
from lowbit.solvers.float_target import float_target
from lowbit.solvers.gptq import gptq_quantize_stacked, relative_output_error
from lowbit.spill import Spill
from lowbit.tables import Table, quantize_table
from lowbit.transforms.awq import Fold, ScalingError, apply_fold, channel_rms, folds, search_scale, tie_heads
from lowbit.walker import (
    Block,
    Checkpoint,
    CrossAccumulator,
    FloatInputs,
    HessianAccumulator,
    WalkStats,
    capture_block_calls,
    walk,
)

SCALING_TOLERANCE = 1e-2  # a scaled block's output may move by the storage rounding of a norm, not more
SCALING_WINDOWS = 32  # calibration windows the scale search's Hessians are summed over (a quarter of 128)


@dataclass
class Execution:
    """Manifest records of the tensors quantized, and where a walk's time went."""

    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    stats: WalkStats | None = None


@torch.no_grad()
def execute(
    model: nn.Module,
    adapter: ArchAdapter,
    plan: Plan,
    solver: GPTQSettings | RTNSettings,
    tables: list[Table] = (),
    windows: torch.Tensor | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    on_block_done=None,
    device: torch.device | None = None,
    spill_dir: str | os.PathLike | None = None,
    offload: Offload | None = None,
    storage_dtype: torch.dtype = torch.float16,
) -> Execution:
    """Quantize what `plan` names; GPTQ needs the calibration `windows`, and with
    `checkpoint_dir` resumes an interrupted run (`resume=True`) from the state kept there.
    With `device`, the solving runs there (the walker's blocks, RTN's layers one at a time).

    With `spill_dir`, each finished block's packed layers go to disk there (spill.py) and a lazy
    model's unquantized tensors stay on disk: the model comes back in pieces that only
    artifact.save puts together, for models larger than memory. Without it, the model comes
    back whole. With `offload`, GPTQ's activations between blocks wait in CPU memory or on disk."""
    result = Execution()
    spill = None
    if spill_dir is not None:
        spill = model.lowbit_spill = Spill(spill_dir)
    prefixes = [f"{adapter.blocks}.{i}." for i in range(len(decoder_blocks(model, adapter)))]
    planned_tables = [t for t in tables if plan.formats.get(t.name) is not None]
    for table in planned_tables:
        load_block(model, table.name + ".")  # a table left on disk (load_model's tables_on_disk)
    float_start = None
    if planned_tables and isinstance(solver, GPTQSettings) and solver.float_target and windows is not None:
        float_start = _float_first_inputs(model, adapter, windows, solver.batch_size, prefixes[0])
    for table in planned_tables:
        result.layers[table.name] = quantize_table(model, table, plan.formats[table.name])
    table_names = {t.name for t in tables}
    linears = {n: f for n, f in plan.quantized.items() if n not in table_names}
    if isinstance(solver, RTNSettings):
        if spill is not None:
            release_unquantized(model)  # RTN reads no table: they wait on disk until the artifact is written
        _execute_rtn(model, linears, solver, result, progress, device, spill, prefixes)
    else:
        if windows is None:
            raise LowbitError("GPTQ needs calibration windows")
        client = GPTQExecution(
            adapter,
            linears,
            solver,
            folds(model.config) if solver.awq else (),
            storage_dtype=storage_dtype,
            float_start=float_start,
        )
        checkpoint = None
        if checkpoint_dir is not None:
            checkpoint = Checkpoint(checkpoint_dir, _checkpoint_key(model, windows, linears, solver))

        def block_done(i: int) -> None:
            if spill is not None:
                spill.put(model, prefixes[i], client.scaled.get(prefixes[i], ()))
            if on_block_done is not None:
                on_block_done(i)

        result.stats = walk(
            model,
            adapter,
            windows,
            client,
            solver.batch_size,
            checkpoint,
            resume,
            progress,
            block_done,
            device,
            # once the blocks' inputs are recorded, a spilling run keeps the tables on disk too
            after_capture=None if spill is None else lambda: release_unquantized(model),
            offload=offload,
        )
        result.layers.update(client.layers)
    if spill is None:
        load_rest(model)  # a lazy model's tensors no pass reached (norms of resumed blocks, float layers)
    else:
        scaled = client.scaled if isinstance(solver, GPTQSettings) else {}
        for prefix in prefixes:  # blocks restored from a resume state are still in memory
            spill.put(model, prefix, scaled.get(prefix, ()))
        release_unquantized(model)
    return result


def _float_first_inputs(
    model: nn.Module, adapter: ArchAdapter, windows: torch.Tensor, batch_size: int, first_prefix: str
) -> list[torch.Tensor]:
    """The first block's inputs from the float tables, taken before they are rounded: where the
    float stream of float targets starts (the walk's own capture sees the rounded tables, and the
    table's rounding error would otherwise be left for no linear to correct). Costs the embedding."""
    load_block(model, first_prefix)  # the capture calls block 0 once, to learn what a block returns
    return capture_block_calls(model, adapter, windows, batch_size).first_inputs


def _execute_rtn(
    model: nn.Module,
    plan: dict[str, Format],
    solver: RTNSettings,
    result: Execution,
    progress: bool,
    device: torch.device | None,
    spill: Spill | None,
    prefixes: list[str],
) -> None:
    names = list(plan)
    for k, (name, fmt) in enumerate(tqdm(plan.items(), desc="quantizing (rtn)", disable=not progress)):
        load_block(model, name + ".")
        module = model.get_submodule(name)
        w = linear_weight(module).detach().float()
        home = w.device
        w = w.to(device or home)
        qt = fmt.quantize_tensor(w, clip_search=solver.clip_search)
        diff = qt.dequantize().sub_(w).square_()  # in place: one layer-sized temporary at a time
        err = (diff.sum() / w.pow(2).sum().clamp_min(1e-30)).item()
        del diff
        set_module(model, name, QuantizedLinear.from_quantized(qt, module.bias).to(home))
        result.layers[name] = layer_record(fmt, qt.shape, weight_rel_mse=err)
        del module, w, qt
        if spill is not None:  # a block whose last planned layer this was goes to disk
            block = next((p for p in prefixes if name.startswith(p)), None)
            if block is not None and (k + 1 == len(names) or not names[k + 1].startswith(block)):
                spill.put(model, block)
        trim()


def _checkpoint_key(model: nn.Module, windows: torch.Tensor, plan: dict[str, Format], settings: GPTQSettings) -> str:
    """A digest of everything that determines the result: config, weights, calibration, plan, settings."""
    h = hashlib.sha256(model_digest(model).encode())
    h.update(windows.numpy().tobytes())
    h.update(json.dumps({k: v.to_dict() for k, v in plan.items()}, sort_keys=True).encode())
    h.update(json.dumps(asdict(settings), sort_keys=True).encode())
    return h.hexdigest()


class GPTQExecution:
    """Walker client: each block's planned linears solved by GPTQ and replaced by QuantizedLinear.

    With true-sequential order (the default) the block runs once per group of linears that
    share an input: q/k/v, then o_proj on the outputs of the quantized q/k/v, then the MLP. The
    last stage's pass runs to the block's end, and its outputs, corrected for the last linear's
    change, are the next block's inputs (saves a pass; Block.corrected_outputs checks it holds)."""

    desc = "GPTQ blocks"
    releases_blocks = False
    outputs_hint = " after quantization; try more bits, a larger damping (--damp) or float32 compute"

    def __init__(
        self,
        adapter: ArchAdapter,
        plan: dict[str, Format],
        settings: GPTQSettings,
        folds: list[Fold] = (),
        storage_dtype: torch.dtype = torch.float16,
        float_start: list[torch.Tensor] | None = None,
    ) -> None:
        self.adapter, self.plan, self.settings = adapter, plan, settings
        self.folds, self.storage_dtype = list(folds), storage_dtype
        self.layers: dict[str, dict[str, Any]] = {}
        self.scaled: dict[str, list[str]] = {}  # block prefix -> float tensors the scaling changed
        self._alpha: dict[str, dict[str, Any]] = {}  # linear -> its group's scaling record
        self._float: list[torch.Tensor] | None = None  # float targets: the float model's stream, this block's inputs
        self._float_start = float_start  # its start when the tables are rounded (else block 0's own inputs)

    def process(self, block: Block) -> list[torch.Tensor]:
        if self.folds:
            self._scale(block)
        groups = block.groups(self.adapter, self.plan.__contains__)
        stages = [[g] for g in groups] if self.settings.true_sequential else [groups]
        pending: dict[str, nn.Module] = {}  # quantized layers, installed once the block's passes are done
        outputs = None
        reference = None  # with float targets: the block as the float model has it, on the float stream
        if self.settings.float_target:
            if self._float is None:  # block 0: the streams start apart only if the tables are rounded
                start, self._float_start = self._float_start, None
                self._float = list(block.inputs) if start is None else [block.store.keep(x) for x in start]
            reference = replace(block, module=copy.deepcopy(block.module), inputs=self._float)
        for k, stage in enumerate(stages):
            correct = self.settings.reuse_last_stage and k == len(stages) - 1 and len(stage) == 1 and len(stage[0]) == 1
            last_stage = k == len(stages) - 1
            float_inputs = {}
            if reference is not None:  # the stage's inputs on the float stream first
                float_inputs = {group[0]: FloatInputs(block.store) for group in stage}
                ref_outputs = reference.run(float_inputs, stop_after=None if last_stage else stage[-1][0])
                if last_stage:
                    self._float = ref_outputs
            accs = {group[0]: self._accumulator(block, correct, float_inputs.get(group[0])) for group in stage}
            float_outputs = block.run(accs, stop_after=None if correct else stage[-1][0])
            t0 = time.perf_counter()
            last = block.module.get_submodule(stage[0][0])
            old_weight = linear_weight(last).detach().clone() if correct else None
            for group in stage:
                acc = accs[group[0]]
                if not acc.called:
                    raise LowbitError(
                        f"{block.prefix + group[0]} was never called during calibration; its adapter is wrong"
                    )
                cross = acc.cross_term() if isinstance(acc, CrossAccumulator) else None
                self._solve_group(block, group, acc.hessian(), pending, cross)
            block.stats.solve += time.perf_counter() - t0
            if correct:
                delta = linear_weight(last).detach() - old_weight
                outputs = block.corrected_outputs(float_outputs, accs[stage[0][0]].inputs, delta)
        if reference is not None and not stages:  # nothing planned here: the float stream moves on
            self._float = reference.run()
        if outputs is None:
            outputs = block.run()
        for name, layer in pending.items():
            set_module(block.module, name, layer)
        errs = [self.layers[block.prefix + n]["output_error"] for g in groups for n in g]
        block.postfix["max_err"] = f"{max(errs):.4f}" if errs else "-"
        return outputs

    @staticmethod
    def _accumulator(block: Block, correct: bool, reference: FloatInputs | None) -> HessianAccumulator:
        """The Hessian observer of one group; with float targets, one that also sums the cross term
        against the float stream's inputs of the same batches."""
        keep = {"keep_inputs": correct, "keep_dtype": torch.bfloat16, "store": block.store}
        if reference is None:
            return HessianAccumulator(**keep)
        return CrossAccumulator(reference.inputs, **keep)

    def _solve_group(
        self, block: Block, group: list[str], hessian: torch.Tensor, pending: dict, cross: torch.Tensor | None = None
    ) -> None:
        """Solve the linears that share `hessian`, those with one format stacked into one solve.
        With `cross` (float targets), each is solved toward the weight that maps its inputs here to
        the float model's output (solvers.float_target), and its error is measured against that.

        The float module keeps working with the dequantized weight written into it until the
        block is finished (no unpacking on every calibration batch); its quantized replacement
        waits in `pending`."""
        by_format: dict[str, list[str]] = {}
        for name in group:
            by_format.setdefault(json.dumps(self.plan[block.prefix + name].to_dict(), sort_keys=True), []).append(name)
        for names in by_format.values():
            fmt = self.plan[block.prefix + names[0]]
            mods = [block.module.get_submodule(n) for n in names]
            weights = [linear_weight(m).detach().float() for m in mods]
            shifts = [None] * len(weights)
            if cross is not None:
                targets = [float_target(w, hessian, cross, self.settings.float_target_damp) for w in weights]
                shifts = [relative_output_error(w, t, hessian) for w, t in zip(weights, targets, strict=True)]
                weights = targets
            parts, res = gptq_quantize_stacked(
                weights, hessian, fmt, **self.settings.solver_options(), name=", ".join(block.prefix + n for n in names)
            )
            for name, mod, w, qt, shift in zip(names, mods, weights, parts, shifts, strict=True):
                deq = qt.dequantize()
                pending[name] = QuantizedLinear.from_quantized(qt, mod.bias)
                mod.weight.data = (deq.t() if isinstance(mod, Conv1D) else deq).to(mod.weight.dtype).contiguous()
                err = relative_output_error(w, deq, hessian)
                extra = {"awq": self._alpha[block.prefix + name]} if block.prefix + name in self._alpha else {}
                if shift is not None:  # how far the float target moved the weight, in the same units as the error
                    extra["float_target_shift"] = shift
                self.layers[block.prefix + name] = layer_record(fmt, qt.shape, output_error=err, damp=res.damp, **extra)

    def _scale(self, block: Block) -> None:
        """Activation-aware scales for each group of the block's planned linears (transforms/awq.py),
        from one pass over the block's first SCALING_WINDOWS calibration windows (a full pass's Hessians,
        the down_proj one above all, would cost as much as a GPTQ stage), folded in before any is solved;
        the block's output on a batch is checked to be unchanged (up to the storage rounding)."""
        active = [f for f in self.folds if any(block.prefix + r in self.plan for r in f.readers)]
        if not active:
            return
        accs = {f.readers[0]: HessianAccumulator() for f in active}
        batches = max(1, -(-SCALING_WINDOWS // self.settings.batch_size))  # the statistics need far fewer tokens
        replace(block, inputs=block.inputs[:batches]).run(accs, stop_after=active[-1].readers[0])
        before = block.outputs_for(block.inputs[:1])[0]
        t0 = time.perf_counter()
        dtype = self.storage_dtype
        changed: list[str] = []
        for fold in active:
            readers = [r for r in fold.readers if block.prefix + r in self.plan]
            weights = [linear_weight(block.module.get_submodule(r)).detach() for r in readers]
            formats = [self.plan[block.prefix + r] for r in readers]
            hessian = accs[fold.readers[0]].hessian()
            stat = tie_heads(channel_rms(hessian), fold.kv_groups, fold.head_dim)
            s, alpha, base, err = search_scale(weights, formats, hessian, stat)
            record = {"alpha": alpha, "source": fold.source, "rtn_error_ratio": err / base if base > 0 else 1.0}
            for r in readers:
                self._alpha[block.prefix + r] = record
            if alpha > 0:
                apply_fold(block.module, fold, s, lambda t: t.to(dtype).float())
                if block.prefix + fold.source not in self.plan:  # a planned source is packed with its change
                    source = block.module.get_submodule(fold.source)
                    changed += [f"{fold.source}.{k}" for k, _ in source.named_parameters()]
        block.stats.solve += time.perf_counter() - t0
        after = block.outputs_for(block.inputs[:1])[0]
        fetch = block.store.fetch
        miss = ((fetch(after) - fetch(before)).abs().max() / fetch(before).abs().max().clamp_min(1e-12)).item()
        if not miss <= SCALING_TOLERANCE:
            raise ScalingError(
                f"activation-aware scaling changed the output of block {block.index} by {miss:.2e} of its largest "
                f"value (tolerance {SCALING_TOLERANCE:g}); this model's layout is not the one the folds assume: "
                "quantize it without --awq"
            )
        self.scaled[block.prefix] = sorted(set(changed))

    def block_tensors(self, block: Block) -> dict[str, torch.Tensor]:
        packed = {
            f"{name}.{k}": v
            for name, mod in block.module.named_modules()
            if isinstance(mod, QuantizedLinear)
            for k, v in mod.state_dict().items()
        }
        return packed | {name: block.module.get_parameter(name).detach() for name in self.scaled.get(block.prefix, [])}

    def state(self) -> dict[str, Any]:
        return {"layers": self.layers, "scaled": self.scaled}

    def carried(self) -> list[torch.Tensor]:
        """The float stream: saved with the next block's inputs, so a resumed run targets the same outputs."""
        return list(self._float or ())

    def restore_carried(self, stream: list[torch.Tensor]) -> None:
        self._float = stream or None
        if self._float is not None:  # resumed past block 0: the float table's outputs are not needed
            self._float_start = None

    def restore(self, state: dict[str, Any], finished: list[tuple[Block, dict[str, torch.Tensor]]]) -> None:
        """Put the saved quantized linears (and the float tensors the scaling changed) of the
        finished blocks back in place."""
        self.layers.update(state["layers"])
        self.scaled.update(state.get("scaled", {}))
        for block, tensors in finished:
            for rel in self.scaled.get(block.prefix, []):
                owner, _, leaf = rel.rpartition(".")
                block.module.get_submodule(owner)._parameters[leaf] = nn.Parameter(tensors[rel], requires_grad=False)
            for full, rec in state["layers"].items():
                if not full.startswith(block.prefix):
                    continue
                rel = full[len(block.prefix) :]
                out, n = rec["shape"]
                layer = QuantizedLinear(n, out, format_from_dict(rec["format"]), bias=f"{rel}.bias" in tensors)
                layer.load_state_dict({k[len(rel) + 1 :]: v for k, v in tensors.items() if k.startswith(rel + ".")})
                set_module(block.module, rel, layer)
