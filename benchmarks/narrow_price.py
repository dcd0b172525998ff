"""An experiment, not a feature: budget plans whose layers narrower than the budget's bit width
are priced M times their measured error, end to end.

Plans that keep some layers a bit narrower than the rest (int2 layers in a 3-bit plan, int3 in
a 4-bit one) have KLD 1.5-1.7 times their summed `kl` proxy, plans of one width 1.24-1.36
(proxy_split.py). If the narrow layers are what the proxy underprices, pricing them higher
while planning should give plans with fewer of them and lower KLD. The budget's width is that
of the cheapest uniform candidate at or above the budget (int4 g256's 4 at 4.0 bpw); every
candidate of a smaller width has its weighted errors multiplied by M while the allocator plans
(`Measurements.weighted_errors`, patched in this process only). The run is `lowbit quantize`
in this process, as budget_frontier.py runs it, with the measurement file of WORK; its JSON
(`--eval --quick`) is written to WORK/NAME.json beside the artifact, so proxy_split.py and
budget_frontier.py's tables read it like any other run.

    LOWBIT_DATA_DIR=../shared/data .venv/bin/python benchmarks/narrow_price.py --work /tmp/frontier3 \\
        --bits 4.09765625 --price 3 --candidates $C
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from proxy_curve import uniform_sizes  # noqa: E402

from lowbit import cli  # noqa: E402
from lowbit.allocate.sensitivity import Measurements  # noqa: E402
from lowbit.formats import format_from_dict  # noqa: E402


def patch(
    budget: float,
    price: float,
    measurements: Path,
    only: set[str] | None = None,
    factors: dict[str, float] | None = None,
) -> int:
    """Price the candidates narrower than the budget's width (with `only`, make every other
    candidate impossible; with `factors`, scale each layer's errors by its own factor, as
    layer_probe.py measured them); returns that width."""
    meas = Measurements.load(measurements)
    bits = [format_from_dict(c).bits for c in meas.candidates]
    names = [format_from_dict(c).name for c in meas.candidates]
    sizes = uniform_sizes(meas)
    above = [n for n, s in sizes.items() if s >= budget - 1e-12]
    width = bits[names.index(min(above, key=sizes.get))] if above else max(bits) + 1
    measured = Measurements.weighted_errors

    def priced(self, name: str, weighting: str = "relative") -> list[float]:
        factor = factors.get(name, 1.0) if factors else 1.0
        errors = [e * factor * (price if bits[j] < width else 1) for j, e in enumerate(measured(self, name, weighting))]
        return [e if only is None or names[j] in only else math.inf for j, e in enumerate(errors)]

    Measurements.weighted_errors = priced
    return width


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="holds measurements.json; the run lands here")
    ap.add_argument("--bits", type=float, required=True)
    ap.add_argument("--price", type=float, required=True, help="M: narrow layers' errors count M times")
    ap.add_argument("--candidates", required=True, help="the measurement file's candidates, in its order")
    ap.add_argument("--only", help="comma-separated candidate names: every other one is impossible while planning")
    ap.add_argument("--layer-factors", type=Path, help="a layer_probe.py results file: each layer's factor")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    factors = None
    if args.layer_factors:
        factors = {n: r["factor"] for n, r in json.loads(args.layer_factors.read_text())["layers"].items()}
    width = patch(args.bits, args.price, args.work / "measurements.json", only, factors)
    name = f"b{args.bits:g}-kl-upgrade-nf-narrow{args.price:g}"
    if only:
        name += "-only-" + "+".join(sorted(only))
    if factors:
        name += "-layerfactors"
    print(f"=== {name}: layers narrower than {width} bits priced x{args.price:g}", file=sys.stderr)
    argv = ["quantize", "smollm2-135m", "--bits", str(args.bits), "--weighting", "kl", "--allocator", "upgrade"]
    argv += ["--candidates", args.candidates, "--measurements", str(args.work / "measurements.json")]
    argv += ["--out", str(args.work / name), "--overwrite", "--eval", "--quick", "--json"]
    out = args.work / f"{name}.json"
    with out.open("w") as f, contextlib.redirect_stdout(f):
        code = cli.main(argv)
    if code:
        out.unlink()
        raise SystemExit(code)


if __name__ == "__main__":
    main()
