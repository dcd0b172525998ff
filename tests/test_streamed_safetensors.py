import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.streamed_safetensors import Pending, save_streamed


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.mlp.qweight": torch.randint(0, 255, (7, 5), generator=g).to(torch.uint8),
        "b.scales": torch.randn(3, 4, generator=g).to(torch.float16),
        "a.weight": torch.randn(5, generator=g),
        "c.bf": torch.randn(2, 3, generator=g).to(torch.bfloat16),
        "d.codes": torch.randint(-5, 5, (4,), generator=g).to(torch.int8),
        "e.index": torch.arange(3, dtype=torch.int32),
        "f.long": torch.arange(2, dtype=torch.int64),
        "g.empty": torch.zeros(0, 4),
        "h.scalar": torch.tensor(1.5),
        "i.mask": torch.tensor([True, False, True]),
    }


def test_the_bytes_are_those_of_safetensors_save_file(tmp_path):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    save_streamed({k: Pending.of(v) for k, v in tensors.items()}, tmp_path / "mine.safetensors", {"format": "pt"})
    assert (tmp_path / "mine.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    save_file(tensors, str(tmp_path / "ref2.safetensors"))
    save_streamed({k: Pending.of(v) for k, v in tensors.items()}, tmp_path / "mine2.safetensors")
    assert (tmp_path / "mine2.safetensors").read_bytes() == (tmp_path / "ref2.safetensors").read_bytes()
    back = load_file(str(tmp_path / "mine.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_each_tensor_is_fetched_once_when_written_and_must_match_its_header(tmp_path):
    fetched = []

    def later(name: str, t: torch.Tensor) -> Pending:
        return Pending(t.dtype, tuple(t.shape), lambda: fetched.append(name) or t)

    tensors = _tensors()
    save_streamed({k: later(k, v) for k, v in tensors.items()}, tmp_path / "x.safetensors")
    assert sorted(fetched) == sorted(tensors)
    liar = {"w": Pending(torch.float32, (2, 2), lambda: torch.zeros(2, 3))}
    with pytest.raises(ValueError, match="header promised"):
        save_streamed(liar, tmp_path / "y.safetensors")


def test_a_tensor_may_arrive_as_slices_of_rows_and_must_add_up(tmp_path):
    t = torch.randn(10, 3)
    save_file({"t": t}, str(tmp_path / "ref.safetensors"))
    save_streamed({"t": Pending(t.dtype, (10, 3), lambda: iter(t.split(4)))}, tmp_path / "mine.safetensors")
    assert (tmp_path / "mine.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    with pytest.raises(ValueError, match="9 rows"):
        save_streamed({"t": Pending(t.dtype, (10, 3), lambda: iter(t[:9].split(4)))}, tmp_path / "short.safetensors")
