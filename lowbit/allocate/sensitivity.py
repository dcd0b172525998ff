"""The measurement pass: every layer solved with every candidate format, errors recorded.

A client of the block walker: one float forward per block accumulates each layer group's
Hessian; each candidate is then solved with GPTQ against that same Hessian (layers that share
an input and a format are stacked into one solve). The errors, with each candidate's exact
cost in bits, are what the allocator plans with; they are saved so a new budget for the same
model, calibration set and candidates needs no new pass, and the pass itself checkpoints after
every block, so an interrupted one resumes to the same file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.activations import Offload
from lowbit.digests import model_digest, windows_digest
from lowbit.errors import CheckpointError, LowbitError
from lowbit.formats import Format, format_from_dict
from lowbit.models.adapters import ArchAdapter, linear_weight
from lowbit.recipe import WEIGHTINGS, GPTQSettings
from lowbit.solvers.gptq import gptq_quantize_stacked, hessian_weighted_error
from lowbit.targets import fits
from lowbit.walker import Block, Checkpoint, HessianAccumulator, walk

MEASUREMENT_VERSION = 2

logger = logging.getLogger(__name__)


class MeasurementMismatchError(LowbitError):
    pass


def layer_probe_candidate(errors: list[float | None], candidates: list[Format]) -> int | None:
    """The candidate a layer is probed at alone (allocate.kl_probe.probe_layers): the narrowest
    width of 3 bits or more it can hold, largest groups within it. One layer at 2 bits is outside
    what plans do; at 4 bits and more its KL is near the probe's floor."""
    held = [j for j, f in enumerate(candidates) if errors[j] is not None and math.isfinite(errors[j]) and errors[j] > 0]
    held = [j for j in held if candidates[j].bits >= 3]
    if not held:
        return None
    return min(held, key=lambda j: probe_rank(candidates[j]))


def role_probe_candidates(errors: Mapping[str, list[float]], candidates: list[Format]) -> dict[str, dict[int, int]]:
    """The candidates the role probes (allocate.kl_probe.probe_roles) perturb each layer role with:
    role -> bits -> candidate index, one per width that every layer of the role can hold (`errors`:
    layer -> per candidate, inf where it cannot), the first of the least `probe_rank`."""
    roles: dict[str, list[str]] = {}
    for n in errors:
        roles.setdefault(layer_role(n), []).append(n)
    widths: dict[str, dict[int, int]] = {}
    for role, names in roles.items():
        widths[role] = {}
        for j, fmt in enumerate(candidates):
            if any(math.isinf(errors[n][j]) for n in names):  # not a choice for this role (rows of 256)
                continue
            k = widths[role].get(fmt.bits)
            if k is None or probe_rank(fmt) < probe_rank(candidates[k]):
                widths[role][fmt.bits] = j
    return widths


def probe_rank(fmt: Format) -> tuple:
    """Which format of a width the probes perturb a layer with (the least first): a grid with
    scales before a fitted codebook (whose error a probe's round-to-nearest would not match),
    then the largest groups (per channel largest of all)."""
    return (fmt.bits, fmt.kind == "codebook", -(fmt.group_size or math.inf))


def layer_role(name: str) -> str:
    """A linear's place in its block, the same at every depth: model.layers.3.mlp.down_proj -> mlp.down_proj."""
    return re.sub(r"^.*?\.\d+\.", "", name)


@dataclass
class Measurements:
    """Per layer and candidate: cost in bits and the Hessian-weighted output error."""

    model: str  # model_digest
    calibration: str  # windows_digest
    candidates: list[dict[str, Any]]
    settings: dict[str, Any]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> shape, numel, block, costs, errors
    stream: dict[str, float] = field(default_factory=dict)  # block -> median squared norm of its input
    # layer role -> per candidate, KL per unit of relative error (allocate.kl_probe.probe_roles); the
    # `kl` weighting's calibration, probed when first needed and saved with the errors
    kl_scale: dict[str, list[float]] = field(default_factory=dict)
    # layer -> its own KL over what kl_scale predicts for it (allocate.kl_probe.probe_layers), probed
    # after kl_scale and saved with it; a layer without one counts 1
    kl_layer: dict[str, float] = field(default_factory=dict)
    # not saved: the file holds only what the inputs determine, so a resumed pass writes the same bytes
    seconds: float | None = field(default=None, repr=False)  # of the pass that made them; None when loaded
    bank: dict[str, dict[int, torch.Tensor]] | None = field(default=None, repr=False)
    # layer -> its GPTQ solution at `layer_probe_candidate` (float16), kept by a pass that knows
    # the layer probe will follow, so the probe need not solve every layer again; read from the
    # pass's checkpoint when it has one (StoredProbeBank), so it is not all in memory
    probe_bank: Mapping[str, torch.Tensor] | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        skip = ("bank", "probe_bank", "seconds")
        return {"version": MEASUREMENT_VERSION, **{k: v for k, v in self.__dict__.items() if k not in skip}}

    def weightings(self) -> list[str]:
        """The weightings these measurements can give: `kl` only once its probe is in them."""
        return [w for w in WEIGHTINGS if w != "kl" or self.kl_scale]

    def weighted_errors(self, name: str, weighting: str = "relative") -> list[float]:
        """A layer's candidate errors on a scale comparable across layers and depths.

        raw: tr(dW H dWᵀ), the layer's own output error; relative (this method's default; budgets use kl): divided by
        tr(W H Wᵀ), the error as a fraction of the layer's output energy; stream: divided
        by the median squared norm of the residual stream entering the layer's block.
        On smollm2-135m at 2.5-3.5 bpw, knapsack plans under `relative` had 25-35 % lower
        KL than under `stream` or `raw` (BENCHMARKS.md). kl: relative times the KL per unit of
        relative error that probes measured for the layer's role and candidate (`kl_scale`) and
        the layer's own factor (`kl_layer`: its KL alone over that prediction), so errors read
        as the KL they cause.

        A candidate the layer cannot hold (its rows do not split into the format's blocks, so the
        pass recorded None, or the export target refuses it: `restricted`) has error inf."""
        rec = self.layers[name]
        errors = [math.inf if e is None else e for e in rec["errors"]]
        if weighting == "kl":
            scale = self.kl_scale.get(layer_role(name))
            if scale is None:
                raise LowbitError(f"the measurements hold no KL calibration for {name}; run the KL probe (kl_probe)")
            factor = self.kl_layer.get(name, 1.0)
            return [e / max(rec["base"], 1e-300) * k * factor for e, k in zip(errors, scale, strict=True)]
        if weighting == "raw":
            return errors
        if weighting == "relative":
            return [e / max(rec["base"], 1e-300) for e in errors]
        if weighting == "stream":
            return [e / max(self.stream[str(rec["block"])], 1e-300) for e in errors]
        raise LowbitError(f"unknown error weighting {weighting!r}; use one of {', '.join(WEIGHTINGS)}")

    def restricted(self, unfit: dict[str, set[int]]) -> Measurements:
        """A copy in which each layer's `unfit` candidates (those an export target cannot write
        for it) are recorded as impossible, as the pass records those its rows cannot hold; the
        copy shares the bank and is never saved over the file it came from."""
        layers = dict(self.layers)
        for name, bad in unfit.items():
            if bad and name in layers:
                rec = dict(layers[name])
                rec["errors"] = [None if j in bad else e for j, e in enumerate(rec["errors"])]
                rec["costs"] = [None if j in bad else c for j, c in enumerate(rec["costs"])]
                layers[name] = rec
        return replace(self, layers=layers)

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_json()))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Measurements:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise LowbitError(f"measurement file {path} is unreadable ({exc}); delete it to measure again") from exc
        if d.pop("version", None) != MEASUREMENT_VERSION:
            raise MeasurementMismatchError(f"measurement file {path} is from another lowbit version; measure again")
        d.pop("seconds", None)  # files from lowbit before the walker stored the pass's time
        return cls(**d)

    def check_matches(self, model: str, calibration: str, candidates: list[dict[str, Any]], path: str = "") -> None:
        """Refuse measurements taken on something else, naming what differs."""
        where = f" in {path}" if path else ""
        if self.model != model:
            raise MeasurementMismatchError(f"the measurements{where} are of another model; measure this one again")
        if self.calibration != calibration:
            raise MeasurementMismatchError(
                f"the measurements{where} used another calibration set (data, --nsamples or --calib-seqlen); "
                "use the same calibration or measure again"
            )
        if self.candidates != candidates:
            raise MeasurementMismatchError(
                f"the measurements{where} cover other candidate formats; measure again (a file is extended, "
                "measuring only the new formats, when the candidates keep its list and add to its end)"
            )

    def extended_by(self, more: Measurements) -> Measurements:
        """These measurements with `more`'s candidates after their own (`more`: a pass over only
        those, on the same model, calibration and settings). The errors are what one pass over all
        of them would find: each candidate is solved alone against the same float Hessian. The KL
        calibration carries over only where one pass would have probed the same candidates (the
        new ones take the factor of their width); otherwise it is dropped, to be probed again."""
        if set(more.layers) != set(self.layers):
            raise MeasurementMismatchError("the extending pass measured other layers; measure again")
        layers = {
            name: {
                **rec,
                "costs": rec["costs"] + more.layers[name]["costs"],
                "errors": rec["errors"] + more.layers[name]["errors"],
            }
            for name, rec in self.layers.items()
        }
        merged = replace(self, candidates=self.candidates + more.candidates, layers=layers, kl_scale={}, kl_layer={})
        merged.seconds, merged.bank, merged.probe_bank = more.seconds, None, None
        old = [format_from_dict(c) for c in self.candidates]
        new = [format_from_dict(c) for c in merged.candidates]
        if self.kl_scale:
            before = {n: self.weighted_errors(n, "relative") for n in self.layers}
            after = {n: merged.weighted_errors(n, "relative") for n in layers}
            probed = role_probe_candidates(before, old)
            if probed == role_probe_candidates(after, new):
                merged.kl_scale = {
                    role: scale
                    + [scale[probed[role][f.bits]] if f.bits in probed.get(role, {}) else 1.0 for f in new[len(old) :]]
                    for role, scale in self.kl_scale.items()
                }
        same_layer_probe = all(
            layer_probe_candidate(rec["errors"], old) == layer_probe_candidate(layers[n]["errors"], new)
            for n, rec in self.layers.items()
        )
        if merged.kl_scale and same_layer_probe:
            merged.kl_layer = dict(self.kl_layer)
        return merged


class StoredProbeBank(Mapping[str, torch.Tensor]):
    """The probe candidates' solutions where the measurement pass's checkpoint saved them, each
    read when asked for: a float16 copy of every linear is as large as a bfloat16 model."""

    def __init__(self, checkpoint: Checkpoint, blocks: dict[str, int]) -> None:
        self.checkpoint, self.blocks = checkpoint, blocks

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.checkpoint.load_tensor(self.blocks[name], f"{name}:probe")

    def __contains__(self, name: object) -> bool:  # (Mapping's would read the tensor)
        return name in self.blocks

    def __iter__(self) -> Iterator[str]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)


def finished_probe_bank(checkpoint: Checkpoint, layers: list[str]) -> StoredProbeBank | None:
    """The probe solutions a finished measurement pass left in its checkpoint, so a run stopped
    during the probes that follow it does not solve them again; None when the checkpoint is
    absent, another pass's, or not finished (every layer measured)."""
    if not checkpoint.exists():
        return None
    try:
        state = checkpoint.read_state()
        if set(state["client"]["layers"]) != set(layers):
            return None
        blocks = {}
        for index in range(int(state["blocks_done"])):
            for key in checkpoint.tensor_keys(index):
                name, _, kind = key.rpartition(":")
                if kind == "probe":
                    blocks[name] = index
    except (CheckpointError, KeyError):
        return None
    return StoredProbeBank(checkpoint, blocks)


class _MeasurementPass:
    """Walker client: float blocks, every wanted layer solved with every candidate."""

    desc = "measuring"
    releases_blocks = True
    outputs_hint = "; the float model overflows on this data: compute in float32 or check the calibration text"

    def __init__(
        self,
        adapter: ArchAdapter,
        layers: list[str],
        candidates: list[Format],
        settings: GPTQSettings,
        result: Measurements,
        keep_weights: bool | str,
        keep_probe: bool = False,
        spilled: dict[str, int] | None = None,
    ) -> None:
        self.adapter, self.wanted, self.candidates = adapter, set(layers), candidates
        self.settings, self.result, self.keep_weights = settings, result, keep_weights
        # with a checkpoint, the probe solutions leave memory once saved: layer -> block
        self.keep_probe, self.spilled = keep_probe, spilled

    def process(self, block: Block) -> list[torch.Tensor]:
        groups = block.groups(self.adapter, self.wanted.__contains__)
        accs = {group[0]: HessianAccumulator() for group in groups}
        outputs = block.run(accs)  # the float block: the next inputs, and every Hessian
        self.result.stream[str(block.index)] = (
            torch.cat([x.pow(2).sum(-1).reshape(-1) for x in block.inputs]).median().item()
        )
        t0 = time.perf_counter()
        for group in groups:
            self._solve(block, group, accs[group[0]].hessian())
        block.stats.solve += time.perf_counter() - t0
        return outputs

    def _solve(self, block: Block, group: list[str], h: torch.Tensor) -> None:
        weights = [linear_weight(block.module.get_submodule(n)).detach().float() for n in group]
        recs, solved, probe = {}, {name: [] for name in group}, {}
        for name, w in zip(group, weights, strict=True):
            recs[name] = {"block": block.index, "shape": list(w.shape), "numel": w.numel(), "costs": [], "errors": []}
            recs[name]["base"] = hessian_weighted_error(w.double(), h.double())  # tr(W H Wᵀ)
        for fmt in self.candidates:
            if not fits(fmt, weights[0].shape[1]):  # rows that do not split into its blocks: not a choice here
                for name in group:
                    recs[name]["costs"].append(None)
                    recs[name]["errors"].append(None)
                    solved[name].append(None)
                continue
            parts, _ = gptq_quantize_stacked(
                weights, h, fmt, **self.settings.solver_options(), name=", ".join(block.prefix + n for n in group)
            )
            for name, w, qt in zip(group, weights, parts, strict=True):
                deq = qt.dequantize()
                errors = recs[name]["errors"]
                recs[name]["costs"].append(fmt.storage_bits(*w.shape))
                errors.append(hessian_weighted_error((w - deq).double(), h.double()))
                solved[name].append(deq.to(torch.float16).cpu() if self.keep_weights else None)
                # the probe's candidate is the last to be the best of those solved so far (the rule
                # orders candidates; errors only rule some out): one copy per layer held at a time
                pending = [None] * (len(self.candidates) - len(errors))
                if self.keep_probe and layer_probe_candidate(errors + pending, self.candidates) == len(errors) - 1:
                    probe[name] = deq.to(torch.float16).cpu()
        for name, rec in recs.items():
            self.result.layers[block.prefix + name] = rec
            if name in probe:
                self.result.probe_bank = self.result.probe_bank or {}
                self.result.probe_bank[block.prefix + name] = probe[name]
            if self.keep_weights:
                every = [j for j, e in enumerate(rec["errors"]) if e is not None]
                front = every if self.keep_weights == "all" else pareto_front(rec["costs"], rec["errors"])
                self.result.bank = self.result.bank or {}
                self.result.bank[block.prefix + name] = {j: solved[name][j] for j in front}

    def block_tensors(self, block: Block) -> dict[str, torch.Tensor]:
        bank, probe = self.result.bank or {}, self.result.probe_bank or {}
        kept = {f"{n}:{j}": w for n, ws in bank.items() if n.startswith(block.prefix) for j, w in ws.items()}
        kept |= {f"{n}:probe": w for n, w in probe.items() if n.startswith(block.prefix)}
        if self.spilled is not None:  # saved with the block from here on
            for name in [n for n in probe if n.startswith(block.prefix)]:
                del probe[name]
                self.spilled[name] = block.index
        return kept

    def state(self) -> dict[str, Any]:
        return {"layers": self.result.layers, "stream": self.result.stream}

    def restore(self, state: dict[str, Any], finished: list[tuple[Block, dict[str, torch.Tensor]]]) -> None:
        self.result.layers.update(state["layers"])
        self.result.stream.update(state["stream"])
        for block, tensors in finished:
            for key, w in tensors.items():
                name, _, j = key.rpartition(":")
                if j == "probe":
                    if self.spilled is not None:
                        self.spilled[name] = block.index
                    else:
                        self.result.probe_bank = self.result.probe_bank or {}
                        self.result.probe_bank[name] = w
                    continue
                self.result.bank = self.result.bank or {}
                self.result.bank.setdefault(name, {})[int(j)] = w


def _pass_key(
    model_id: str, windows: torch.Tensor, layers, candidates, settings: GPTQSettings, keep_weights, keep_probe: bool
) -> str:
    h = hashlib.sha256(model_id.encode())
    h.update(windows.numpy().tobytes())
    spec = {
        "layers": list(layers),
        "candidates": [f.to_dict() for f in candidates],
        "solver": settings.solver_options(),
        "batch_size": settings.batch_size,
        "keep_weights": keep_weights,
    }
    if keep_probe:  # (absent otherwise: checkpoints from before it still resume)
        spec["keep_probe"] = True
    h.update(json.dumps(spec, sort_keys=True).encode())
    return h.hexdigest()


@torch.no_grad()
def measure(
    model: nn.Module,
    adapter: ArchAdapter,
    layers: list[str],
    candidates: list[Format],
    windows: torch.Tensor,
    settings: GPTQSettings | None = None,
    progress: bool = True,
    keep_weights: bool | str = False,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    on_block_done=None,
    device: torch.device | None = None,
    offload: Offload | None = None,
    keep_probe: bool = False,
) -> Measurements:
    """Solve every layer in `layers` (full names) with every candidate; the model is not changed.

    With `keep_weights`, the dequantized weights (float16) of each layer's Pareto-optimal
    candidates (no other candidate both cheaper and more accurate) stay in `bank`, for
    the refinement that evaluates whole plans (allocate.evolve); "all" keeps every
    candidate's (benchmarks compare uniform plans with it). `keep_probe` keeps each layer's
    solution at `layer_probe_candidate` in `probe_bank`, for the layer probe that follows a
    fresh pass under the `kl` weighting: in memory, or with a checkpoint read from it. With `checkpoint_dir`, the pass
    saves its state after every block there and `resume=True` continues from it."""
    settings = settings or GPTQSettings()
    t0 = time.perf_counter()
    digest = model_digest(model)
    result = Measurements(
        model=digest,
        calibration=windows_digest(windows),
        candidates=[f.to_dict() for f in candidates],
        settings=settings.solver_options(),
    )
    checkpoint = None
    if checkpoint_dir is not None:
        key = _pass_key(digest, windows, layers, candidates, settings, keep_weights, keep_probe)
        checkpoint = Checkpoint(checkpoint_dir, key)
    spilled = {} if keep_probe and checkpoint is not None else None
    client = _MeasurementPass(adapter, layers, list(candidates), settings, result, keep_weights, keep_probe, spilled)
    walk(
        model,
        adapter,
        windows,
        client,
        settings.batch_size,
        checkpoint,
        resume,
        progress,
        on_block_done,
        device,
        offload=offload,
    )
    if spilled is not None:
        result.probe_bank = StoredProbeBank(checkpoint, spilled)
    result.seconds = time.perf_counter() - t0
    return result


def _extendable(meas: Measurements, model: str, calibration: str, candidates: list[dict], settings: dict) -> bool:
    """Whether `meas` is this model's, calibration's and solver's, its candidates the start of `candidates`."""
    n = len(meas.candidates)
    return (
        meas.model == model
        and meas.calibration == calibration
        and meas.settings == settings
        and n < len(candidates)
        and candidates[:n] == meas.candidates
    )


def pareto_front(costs: list[int], errors: list[float]) -> list[int]:
    """Candidate indices, cheapest first, each strictly more accurate than every cheaper one
    (candidates the layer cannot hold, cost None, left out)."""
    front: list[int] = []
    held = [j for j in range(len(costs)) if costs[j] is not None]
    for j in sorted(held, key=lambda j: (costs[j], errors[j])):
        if not front or errors[j] < errors[front[-1]]:
            if front and costs[j] == costs[front[-1]]:
                continue
            front.append(j)
    return front


def plan_formats(measurements: Measurements, choice: dict[str, int]) -> dict[str, Format]:
    """Layer name -> chosen format, from candidate indices."""
    return {name: format_from_dict(measurements.candidates[j]) for name, j in choice.items()}


def measurements_for(
    model: nn.Module,
    adapter: ArchAdapter,
    layers: list[str],
    candidates: list[Format],
    windows: torch.Tensor,
    settings: GPTQSettings,
    path: str | os.PathLike | None = None,
    keep_weights: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    on_block_done=None,
    device: torch.device | None = None,
    offload: Offload | None = None,
    keep_probe: bool = False,
) -> tuple[Measurements, bool]:
    """The measurements from `path` when it holds this model's, calibration's and candidates'
    (refused, naming the mismatch, when it holds another's); otherwise measured, and saved to
    `path`. Returns them and whether they were reused. Every layer is measured, pinned or not,
    so one file serves other keep rules too. `keep_weights` (the refinement's bank) is never in
    a file, so it always measures; `keep_probe` is kept only by a pass that runs anyway, or read
    back from that pass's checkpoint when a file without layer factors is reused (a resumed run)."""
    key = (model_digest(model), windows_digest(windows), [f.to_dict() for f in candidates])
    path = Path(path) if path is not None else None
    if path is not None and path.exists():
        meas = Measurements.load(path)
        if not keep_weights and _extendable(meas, *key, (settings or GPTQSettings()).solver_options()):
            added = candidates[len(meas.candidates) :]
            logger.info("extending %s: measuring the %d candidates it does not hold", path, len(added))
            more = measure(
                model, adapter, layers, added, windows, settings, progress, False, checkpoint_dir, resume,
                on_block_done, device, offload,
            )  # fmt: skip
            meas = meas.extended_by(more)
            meas.save(path)
            return meas, False
        meas.check_matches(*key, path=str(path))
        if not keep_weights:
            if keep_probe and checkpoint_dir is not None and not meas.kl_layer:
                pass_key = _pass_key(key[0], windows, layers, candidates, settings or GPTQSettings(), False, True)
                meas.probe_bank = finished_probe_bank(Checkpoint(checkpoint_dir, pass_key), layers)
            return meas, True
        logger.warning("refinement needs every candidate's weights: measuring again (the file has errors only)")
    meas = measure(
        model,
        adapter,
        layers,
        candidates,
        windows,
        settings,
        progress,
        keep_weights,
        checkpoint_dir,
        resume,
        on_block_done,
        device,
        offload,
        keep_probe,
    )
    if path is not None:
        meas.save(path)
    return meas, False
