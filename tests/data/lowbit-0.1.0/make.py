"""Run with lowbit at fd1cba1 (before the core reshape) on PYTHONPATH."""

import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, "/work/main/tests")
from conftest import make_tiny_model
from lowbit.pipeline import GPTQSettings

import lowbit
from lowbit.errors import BudgetError
from lowbit.formats import IntFormat

out = Path(sys.argv[1])
probe = torch.randint(2, 256, (2, 16), generator=torch.Generator().manual_seed(7))
windows = torch.randint(2, 256, (8, 64), generator=torch.Generator().manual_seed(0))
m = lowbit.quantize(make_tiny_model("llama"), bits=4, group_size=32, method="rtn", progress=False)
lowbit.save(m, out / "llama-rtn-int4")
kw = dict(
    calib=windows, gptq=GPTQSettings(batch_size=4), candidates=[IntFormat(2, 32), IntFormat(4, 32)], progress=False
)
try:
    lowbit.quantize(make_tiny_model("gpt2"), size_bytes=1000, **kw)
except BudgetError as e:
    smallest = int(float(re.search(r"--size ([0-9.]+)MB", str(e)).group(1)) * 1e6)
g = lowbit.quantize(make_tiny_model("gpt2"), size_bytes=smallest, **kw)
lowbit.save(g, out / "gpt2-size-budget")
with torch.no_grad():
    save_file(
        {"probe": probe, "llama-rtn-int4": m(probe).logits, "gpt2-size-budget": g(probe).logits},
        str(out / "logits.safetensors"),
    )
print(lowbit.__file__)
