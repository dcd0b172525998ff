"""The block walker: calibration windows through a model one decoder block at a time.

Every pass lowbit makes over calibration data is a client of `walk`: the measurement pass
(allocate.sensitivity), GPTQ execution (execute) and, later, transforms. The walker records
once what each block is called with, hands each block and its inputs to the client, takes the
client's outputs as the next block's inputs, and checkpoints after every block, so that an
interrupted pass resumes where it stopped and ends exactly as an uninterrupted one would.

A client observes a block through `Block.run(observers=...)`: forward pre-hooks that see a
submodule's inputs on every calibration batch (the Hessians of GPTQ are one kind of observer;
activation statistics for scaling and rotations are others). Only the activations of one
block boundary are held (the block's inputs and its outputs), plus what the observers keep.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lowbit.activations import Activations, Offload
from lowbit.devices import to_device
from lowbit.errors import CheckpointError, NonFiniteActivationError
from lowbit.memory import trim
from lowbit.models.adapters import ArchAdapter, decoder_blocks
from lowbit.models.lazy import lazy_weights

# keyword arguments of a block call that only matter for generation caches
_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past", "use_cache", "output_attentions")


@dataclass
class WalkStats:
    """Where a walk's wall time went, in seconds."""

    capture: float = 0.0  # embedding + recording every block's call arguments
    forward: float = 0.0  # block forwards, observer work excluded
    hessian: float = 0.0  # observers (accumulating XᵀX)
    solve: float = 0.0  # the client's own work on a block (GPTQ solves, layer replacement)
    checkpoint: float = 0.0  # writing (or reading) the resume state
    total: float = 0.0
    calibration_tokens: int = 0
    resumed_blocks: int = 0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once what was needed has been seen."""


# ---------------------------------------------------------------------------------------------
# capturing what every block is called with


@dataclass
class BlockCalls:
    """What each decoder block is called with, per calibration batch."""

    first_inputs: list[torch.Tensor]  # hidden states entering block 0, one tensor per batch
    args: list[list[tuple]]  # [block][batch] extra positional arguments
    kwargs: list[list[dict[str, Any]]]  # [block][batch] keyword arguments (masks, rotary tables ...)
    returns_tuple: bool  # whether a block returns (hidden, ...) rather than hidden


class StandIn(nn.Module):
    """A module put in a decoder block's place for one pass over the model; attributes it does
    not have are the block's (model code may read attributes of its layers, e.g. attention_type)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


class _Recorder(StandIn):
    """Stands in for a decoder block during capture: records its call, passes the hidden states on."""

    def __init__(self, block: nn.Module, index: int, last: int, calls: BlockCalls) -> None:
        super().__init__(block)
        self.index = index
        self.last = last
        self.calls = calls

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


# ---------------------------------------------------------------------------------------------
# observers: statistics of a submodule's inputs


class Observer(Protocol):
    def update(self, x: torch.Tensor) -> None: ...


class HessianAccumulator:
    """Sum of XᵀX over the inputs of one linear (shared by the linears that read the same input).

    Wide inputs accumulate only the block upper triangle (4 row blocks: 10/16 of the products,
    ~0.66x the time measured for 1536 columns); `hessian()` mirrors it. Plain torch matmuls on
    purpose: a BLAS symmetric rank-k update (scipy's ssyrk) computes half the products, but its
    idle OpenBLAS threads then spin against torch's and slowed the block forwards by ~30 % on a
    2-core CPU, more than the Hessians gained.

    With `keep_inputs`, the inputs are also kept (one tensor per batch, in `store` if given), for the output
    correction of a block's last stage (`Block.corrected_outputs`), in `keep_dtype`: bfloat16
    halves what a wide input costs (smollm2's down_proj inputs on 128 x 512 windows: 403 MB in
    float32, the largest thing a GPTQ block holds), and the correction it feeds only needs to
    be right to a fraction of the quantization change (its rounding moves the correction by
    ~0.2 %, the check in `corrected_outputs` allows 1 %)."""

    _TRIANGLE_MIN = 512  # narrower inputs: one full matmul is as fast
    _ROW_BLOCKS = 4

    def __init__(
        self, keep_inputs: bool = False, keep_dtype: torch.dtype | None = None, store: Activations | None = None
    ) -> None:
        self.xtx: torch.Tensor | None = None
        self.rows = 0
        self.inputs: list[torch.Tensor] | None = [] if keep_inputs else None
        self.keep_dtype = keep_dtype
        self.store = store  # where kept inputs wait (with the block's activations)

    def update(self, x: torch.Tensor) -> None:
        if self.inputs is not None:
            kept = x if self.keep_dtype is None else x.to(self.keep_dtype)
            self.inputs.append(kept if self.store is None else self.store.keep(kept))
        x = x.reshape(-1, x.shape[-1]).float()
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

    @property
    def called(self) -> bool:
        return self.rows > 0

    def hessian(self) -> torch.Tensor:
        """H = 2XᵀX/n, the Hessian of the layer's squared output error."""
        xtx = self.xtx
        if xtx.shape[0] >= self._TRIANGLE_MIN:
            xtx = torch.triu(xtx) + torch.triu(xtx, 1).t()
        return xtx * (2.0 / self.rows)


class FloatInputs:
    """Keeps a submodule's inputs on a second stream (the float model's), one tensor per batch."""

    def __init__(self, store: Activations) -> None:
        self.store = store
        self.inputs: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        self.inputs.append(self.store.keep(x))


class CrossAccumulator(HessianAccumulator):
    """H of the inputs, and D = X̃ᵀ(X - X̃) against another stream's inputs X of the same batches
    (`float_inputs`, consumed in order, each freed once used), for solvers.float_target."""

    def __init__(self, float_inputs: list[torch.Tensor], **kwargs) -> None:
        super().__init__(**kwargs)
        self.float_inputs = float_inputs
        self.cross: torch.Tensor | None = None
        self._batch = 0

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        ref = self.float_inputs[self._batch]
        self.float_inputs[self._batch] = None  # the batch is used once
        self._batch += 1
        fetched = self.store.fetch(ref) if self.store is not None else ref
        xq = x.reshape(-1, x.shape[-1]).float()
        diff = fetched.reshape(-1, x.shape[-1]).float() - xq
        if self.cross is None:
            self.cross = torch.zeros(xq.shape[1], xq.shape[1], dtype=torch.float32, device=xq.device)
        self.cross.addmm_(xq.t(), diff)

    def cross_term(self) -> torch.Tensor:
        """D scaled as `hessian()` is (2/n), so the two combine directly."""
        return self.cross * (2.0 / self.rows)


# ---------------------------------------------------------------------------------------------
# one block, as a client sees it


@dataclass
class Block:
    """Decoder block `index` with its calibration inputs (one tensor per batch)."""

    index: int
    module: nn.Module
    prefix: str  # full name of the block, with a trailing dot: "model.layers.3."
    inputs: list[torch.Tensor]
    calls: BlockCalls
    stats: WalkStats
    store: Activations  # where `inputs` and the outputs wait between batches
    postfix: dict[str, str] = field(default_factory=dict)  # shown on the progress bar once the block is done

    def groups(self, adapter: ArchAdapter, wanted: Callable[[str], bool]) -> list[list[str]]:
        """The adapter's groups of linears that read one input (names relative to the block),
        in execution order, keeping the linears `wanted(full name)` accepts."""
        groups = [[n for n in g if wanted(self.prefix + n)] for g in adapter.linear_groups]
        return [g for g in groups if g]

    def run(self, observers: dict[str, Observer] | None = None, stop_after: str | None = None):
        """The block's outputs on every batch, with each observer seeing the inputs of the
        submodule it is keyed by. With `stop_after` (a key of `observers`), every batch's pass
        ends once that submodule's inputs are seen, and None is returned instead of outputs."""
        handles = []
        for name, observer in (observers or {}).items():
            hook = self._hook(name, observer, stop=name == stop_after)
            handles.append(self.module.get_submodule(name).register_forward_pre_hook(hook))
        t0, h0 = time.perf_counter(), self.stats.hessian
        try:
            outputs = self._forward(self.inputs)
        finally:
            for handle in handles:
                handle.remove()
        self.stats.forward += time.perf_counter() - t0 - (self.stats.hessian - h0)
        return outputs

    def outputs_for(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The block's outputs on other inputs than its own (another model's stream through it)."""
        t0 = time.perf_counter()
        outputs = self._forward(inputs)
        self.stats.forward += time.perf_counter() - t0
        return outputs

    def _hook(self, name: str, observer: Observer, stop: bool):
        def hook(_module: nn.Module, args: tuple) -> None:
            t0 = time.perf_counter()
            x = args[0].detach()
            if not torch.isfinite(x).all():
                raise NonFiniteActivationError(
                    f"NaN or Inf in the calibration inputs of {self.prefix + name} (block {self.index}); "
                    "the model overflows on this data: compute in float32 or check the calibration text"
                )
            observer.update(x)
            self.stats.hessian += time.perf_counter() - t0
            if stop:
                raise _StopForward

        return hook

    def _forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
        outs: list[torch.Tensor] | None = []
        args, kwargs = self.calls.args[self.index], self.calls.kwargs[self.index]
        for b, x in enumerate(inputs):
            try:
                y = self.module(self.store.fetch(x), *args[b], **kwargs[b])
            except _StopForward:
                outs = None
                continue
            if outs is not None:
                outs.append(self.store.keep(y[0] if isinstance(y, tuple) else y))
        return outs

    def corrected_outputs(
        self, float_outputs: list[torch.Tensor], layer_inputs: list[torch.Tensor], delta: torch.Tensor
    ) -> list[torch.Tensor]:
        """The block's outputs after its last linear changed by `delta` ([out, in]), without a pass.

        Where that linear's output is added straight to the residual stream (Llama, Qwen, GPT-2 ...)
        the new output is the old one plus X·deltaᵀ. Whether that holds is checked, not assumed: the
        first batch is run for real and compared; where the correction misses (e.g. a norm after the
        MLP, as in Gemma 2) every batch is run for real.

        Consumes its arguments to keep the peak low: the outputs are corrected in place and each
        batch's layer inputs are dropped from `layer_inputs` once used."""
        t0 = time.perf_counter()
        actual = self._forward(self.inputs[:1])[0]
        outs = [actual]
        fetch = self.store.fetch
        for b in range(len(self.inputs)):
            x = fetch(layer_inputs[b])
            layer_inputs[b] = None
            fix = (x.reshape(-1, x.shape[-1]).to(delta.dtype) @ delta.t()).reshape(float_outputs[b].shape)
            del x
            fix = fix.to(float_outputs[b].dtype)
            if b == 0:
                real = fetch(actual)
                miss = (fetch(float_outputs[b]) + fix - real).float().norm()
                if miss > 1e-2 * fix.float().norm() + 1e-5 * real.float().norm():
                    outs += self._forward(self.inputs[1:])
                    break
                continue
            outs.append(float_outputs[b].add_(fix.to(float_outputs[b].device)))
        self.stats.forward += time.perf_counter() - t0
        return outs


# ---------------------------------------------------------------------------------------------
# resume state


class Checkpoint:
    """Resume state of a walk: the client's tensors and state after each finished block, and the
    inputs of the next block.

    Each file is written under a temporary name and renamed; `state.json` is written last and
    is the commit point, so a crash at any moment leaves a consistent state. `key` digests
    everything that determines the result: a state made from anything else is refused."""

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

    def save(
        self,
        index: int,
        tensors: dict[str, torch.Tensor],
        inputs: list[torch.Tensor],
        state: dict,
        carried: Sequence[torch.Tensor] = (),
    ) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.cpu().contiguous() for k, v in tensors.items()}
        self._atomic(self.path / f"block_{index}.safetensors", lambda p: save_file(tensors, str(p)))
        nxt = {f"batch_{b}": x.cpu().contiguous() for b, x in enumerate(inputs)}
        nxt |= {f"carried_{b}": x.cpu().contiguous() for b, x in enumerate(carried)}
        self._atomic(self.path / f"inputs_{index + 1}.safetensors", lambda p: save_file(nxt, str(p)))
        state = {"key": self.key, "blocks_done": index + 1, "client": state}
        self._atomic(self.state_file, lambda p: p.write_text(json.dumps(state, indent=1)))
        (self.path / f"inputs_{index}.safetensors").unlink(missing_ok=True)

    def load_tensors(self, index: int) -> dict[str, torch.Tensor]:
        return self._load(self.path / f"block_{index}.safetensors")

    def load_tensor(self, index: int, key: str) -> torch.Tensor:
        """One of block `index`'s saved tensors, read alone."""
        return self._read_block(index, lambda f: f.get_tensor(key))

    def tensor_keys(self, index: int) -> list[str]:
        """The names of block `index`'s saved tensors, without reading them."""
        return self._read_block(index, lambda f: list(f.keys()))

    def _read_block(self, index: int, read: Callable[[Any], Any]) -> Any:
        file = self.path / f"block_{index}.safetensors"
        try:
            with safe_open(str(file), framework="pt") as f:
                return read(f)
        except Exception as exc:  # noqa: BLE001 - as _load
            raise CheckpointError(f"resume file {file} is missing or damaged ({exc}); delete {self.path}") from exc

    def load_inputs(self, index: int, kind: str = "batch") -> list[torch.Tensor]:
        """Block `index`'s inputs, or (`kind="carried"`) the client's second stream saved with them."""
        tensors = self._load(self.path / f"inputs_{index}.safetensors")
        return [tensors[f"{kind}_{b}"] for b in range(sum(k.startswith(kind + "_") for k in tensors))]

    def _load(self, file: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(file))
        except Exception as exc:  # noqa: BLE001 - any read failure means the same thing here
            raise CheckpointError(f"resume file {file} is missing or damaged ({exc}); delete {self.path}") from exc


# ---------------------------------------------------------------------------------------------
# the walk


class Unresumable:
    """For clients whose walks are short and keep nothing to resume from (a float forward, a probe)."""

    def block_tensors(self, block: Block) -> dict[str, torch.Tensor]:
        return {}

    def state(self) -> dict[str, Any]:
        return {}

    def restore(self, state: dict[str, Any], finished: list) -> None:
        pass


class BlockClient(Protocol):
    """What a pass over the blocks does with each of them."""

    desc: str  # progress bar label
    outputs_hint: str  # appended to the error when a block's outputs are not finite
    releases_blocks: bool  # a lazy model's float block goes back to disk once processed (the model is unchanged)

    def process(self, block: Block) -> list[torch.Tensor]:
        """Do the pass's work on `block`; return the next block's inputs."""

    def block_tensors(self, block: Block) -> dict[str, torch.Tensor]:
        """Tensors to keep for a finished block (saved in the checkpoint)."""

    def state(self) -> dict[str, Any]:
        """JSON state after the blocks processed so far (saved in the checkpoint)."""

    def restore(self, state: dict[str, Any], finished: list[tuple[Block, dict[str, torch.Tensor]]]) -> None:
        """Take back a checkpoint: the state, and each finished block with its saved tensors."""

    # Optional: a client that carries a second stream of activations from block to block (the
    # float model's, for float targets) has `carried() -> list[Tensor]`, saved with the next
    # block's inputs, and `restore_carried(list[Tensor])`, called on resume before the next block.


@torch.no_grad()
def walk(
    model: nn.Module,
    adapter: ArchAdapter,
    windows: torch.Tensor,
    client: BlockClient,
    batch_size: int = 8,
    checkpoint: Checkpoint | None = None,
    resume: bool = False,
    progress: bool = True,
    on_block_done: Callable[[int], None] | None = None,
    device: torch.device | None = None,
    after_capture: Callable[[], None] | None = None,
    offload: Offload | None = None,
) -> WalkStats:
    """Take `client` through every decoder block of `model` on the calibration `windows`.

    With `checkpoint`, the state after every block is saved there; `resume=True` continues
    from it. `on_block_done(i)` is called once block i is committed (tests interrupt runs with it).

    A lazy model (models/lazy.py) has each block's tensors read when the walk reaches it; a client
    that `releases_blocks` has them freed again after it, so one float block is held at a time.
    With `device`, each block is moved there for its work (with the activations, which stay
    there) and back to the model's device after it, packed: one block on the device at a time.
    `after_capture()` runs once every block's inputs are recorded, when the embedding and the
    head are no longer needed by the walk (a client may free them). With `offload`, the
    activations between blocks wait in CPU memory or on disk instead (activations.py)."""
    stats = WalkStats(calibration_tokens=int(windows.numel()))
    t_start = time.perf_counter()
    blocks = decoder_blocks(model, adapter)

    def block(i: int, inputs: list[torch.Tensor]) -> Block:
        return Block(i, blocks[i], f"{adapter.blocks}.{i}.", inputs, calls, stats, store)

    lazy = lazy_weights(model)
    prefix = [f"{adapter.blocks}.{i}." for i in range(len(blocks))]
    t0 = time.perf_counter()
    if lazy is not None:  # capture calls block 0 once, to learn what a block returns
        lazy.load(model, prefix[0])
    calls = capture_block_calls(model, adapter, windows, batch_size)
    home = next(model.parameters()).device
    if after_capture is not None:
        after_capture()
    device = home if device is None else device
    store = Activations(device, offload)
    calls.first_inputs = [store.keep(x) for x in calls.first_inputs]
    if device != home:  # everything else a block is called with, on the compute device once
        moved: dict[int, torch.Tensor] = {}
        calls.args = to_device(calls.args, device, moved)
        calls.kwargs = to_device(calls.kwargs, device, moved)
    stats.capture = time.perf_counter() - t0

    start, inputs = 0, calls.first_inputs
    calls.first_inputs = []  # held by `inputs` only: freed once block 0's outputs replace them
    if checkpoint is not None and resume and checkpoint.exists():
        t0 = time.perf_counter()
        state = checkpoint.read_state()
        start = int(state["blocks_done"])
        client.restore(state["client"], [(block(i, []), checkpoint.load_tensors(i)) for i in range(start)])
        inputs = [store.keep(x) for x in checkpoint.load_inputs(start)]
        if hasattr(client, "restore_carried"):
            client.restore_carried([store.keep(x) for x in checkpoint.load_inputs(start, "carried")])
        stats.resumed_blocks = start
        if lazy is not None and client.releases_blocks and start > 0:
            lazy.release(model, prefix[0])
        stats.checkpoint += time.perf_counter() - t0

    bar = tqdm(total=len(blocks), initial=start, desc=client.desc, disable=not progress, unit="block")
    for i in range(start, len(blocks)):
        if lazy is not None:
            lazy.load(model, prefix[i])
        current = block(i, inputs)
        current.module.to(device)
        outputs = client.process(current)
        current.module.to(home)
        if lazy is not None and client.releases_blocks:
            lazy.release(model, prefix[i])
        trim()
        for x in outputs:
            if not torch.isfinite(x).all():
                raise NonFiniteActivationError(
                    f"NaN or Inf in the outputs of block {i} ({current.prefix.rstrip('.')}){client.outputs_hint}"
                )
        if checkpoint is not None:
            t0 = time.perf_counter()
            carried = client.carried() if hasattr(client, "carried") else ()
            checkpoint.save(i, client.block_tensors(current), outputs, client.state(), carried)
            stats.checkpoint += time.perf_counter() - t0
        inputs = outputs
        bar.set_postfix(current.postfix)
        bar.update(1)
        if on_block_done is not None:
            on_block_done(i)
    bar.close()
    stats.total = time.perf_counter() - t_start
    return stats
