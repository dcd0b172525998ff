"""`lowbit` command line: quantize, eval, inspect.

It parses arguments into the library's values (a Recipe, EvalSettings), calls the library and
prints what comes back; what the options mean is checked and decided in the library.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, NoReturn

from lowbit.errors import LowbitError


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line naming the problem and where to read more."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message}; see {self.prog} --help")


def _bits(value: str, flag: str = "--bits") -> int | float:
    """A whole number ("4") is a uniform code width; a decimal ("3.25", also "3.0") is an average
    budget in bpw, so "--bits 3.0" never silently becomes uniform int3 at 3.16 bpw. `--bpw` is
    always a budget."""
    try:
        bits = float(value)
    except ValueError:
        raise LowbitError(
            f"{flag} must be a number of bits, got {value!r}; e.g. --bits 4 (uniform) or --bits 3.25 (average budget)"
        ) from None
    uniform = flag == "--bits" and value.strip().lstrip("+").isdigit()
    return int(bits) if uniform else bits


def _group_size(value: str) -> int | None:
    if value.lower() in ("channel", "per-channel", "none", "-1"):
        return None
    try:
        gs = int(value)
    except ValueError:
        gs = 0
    if gs <= 0:
        raise LowbitError(f"--group-size must be a positive integer or 'channel', got {value!r}; e.g. --group-size 128")
    return gs


def _add_eval_options(p: argparse.ArgumentParser, legacy: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--quick", dest="protocol", action="store_const", const="quick", help="first 64 windows of 512 tokens (default)"
    )
    g.add_argument(
        "--full", dest="protocol", action="store_const", const="full", help="every window of the evaluation text"
    )
    p.set_defaults(protocol="quick")
    p.add_argument(
        "--data", default="wikitext2", help="evaluation text: a named data set (wikitext2) or a .txt/.jsonl file"
    )
    p.add_argument("--eval-seqlen", type=int, default=512, help="tokens per evaluation window (default 512)")
    p.add_argument("--eval-batch-size", type=int, default=4, help="evaluation windows per forward pass (default 4)")
    # the spellings of lowbit 0.1, kept working but no longer shown
    if legacy == "eval":
        p.add_argument("--seqlen", dest="eval_seqlen", type=int, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", dest="eval_batch_size", type=int, help=argparse.SUPPRESS)


def _add_offload_option(p: argparse.ArgumentParser, where: str) -> None:
    p.add_argument(
        "--offload-activations",
        choices=("cpu", "disk"),
        help="keep the activations between decoder blocks in CPU memory (cpu) or in memory-mapped files "
        f"{where} (disk) instead of on the compute device; same result, for many or long windows",
    )


def _add_compute_options(p: argparse.ArgumentParser) -> None:
    from lowbit.devices import DEVICE_CHOICES, DTYPE_CHOICES

    p.add_argument(
        "--device",
        default="auto",
        help=f"where to compute: {DEVICE_CHOICES} (default auto: a GPU when torch sees one, else the CPU)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="the model's compute dtype (default auto: float32 on a CPU, bfloat16 on a GPU that has it, else "
        "float16); Hessians and solver updates are float32 whatever it is",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lowbit", description="Quantize LLMs to a size you choose and measure what it cost.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = sub.add_parser("quantize", help="quantize a model and write an artifact directory")
    q.add_argument("model", help="HF model directory, .gguf file, hub id, or alias (smollm2-135m)")
    q.add_argument(
        "--bits",
        help="a whole number 2..8: every layer gets codes of that width; a decimal (e.g. 3.25 or 3.0): an "
        "average budget in bits per weight, scales and zeros included, met by giving each layer its own format",
    )
    q.add_argument(
        "--format",
        help="every layer in one named format, for grids --bits cannot name: a llama.cpp type (q2_k, q3_k, "
        "q4_0, iq4_nl, q4_1, q4_k, q5_0, q5_1, q5_k, q6_k, q8_0) or lowbit's int4-g64 / int3-g128-sym / nf3-g64-s8; "
        "any with -rot (int3-g128-rot) turns the layer's inputs at run time, in lowbit's runtime only",
    )
    q.add_argument("--bpw", help="average budget in bits per weight, 2..8 (the same as --bits with a decimal)")
    q.add_argument(
        "--size",
        help="budget for the whole weights file, float embeddings/head/norms and header included, e.g. 70MB "
        "(10^6 bytes) or 64MiB; layers get formats by their exact packed bytes",
    )
    q.add_argument(
        "--keep",
        help='pin layers: comma-separated globs over layer names, "PATTERN" keeps matches in float, '
        '"PATTERN=FORMAT" fixes their format, e.g. "*.0.self_attn.*=8bit,*.29.mlp.down_proj=int6-g64"',
    )
    q.add_argument(
        "--candidates",
        help="budget runs: the formats each layer may get, comma-separated (names as in --format, e.g. "
        "q4_0,q5_0,q6_k,q8_0); default (recipe.DEFAULT_CANDIDATES): int2 g16/g32/g64, int3/int4/nf3/nf4 g32/g64 "
        "and int5/int6 g64 with 8-bit scale codes (-s8), int2/int3/nf3 g128, int3 g256, int8 g128; or every type "
        "the --target holds but q4_1/q5_1",
    )
    q.add_argument(
        "--measurements",
        help="budget runs: JSON file of per-layer errors; written by the first run, reused by later ones "
        "(same model, calibration and candidates) so a new budget plans in seconds; candidates added to the "
        "end of its list are measured alone and added to it",
    )
    q.add_argument(
        "--allocator",
        default="upgrade",
        help="budget runs: upgrade (default): the best uniform format that fits, its spare bits spent by the "
        "knapsack where they cut the error most, no layer worse; knapsack: the free knapsack on measured "
        "errors; baq: BAQ's closed form (BENCHMARKS.md compares them)",
    )
    q.add_argument(
        "--weighting",
        default="kl",
        help="budget runs: how layer errors are compared across layers and depths: kl (default: each layer's "
        "error as a fraction of its own output energy, times the KL per unit of error that probes measure per "
        "layer role and bit width and by the layer's own factor from a probe of each layer alone; the probes "
        "run once per measurement file); relative (without the probes); "
        "stream or raw (see README and BENCHMARKS.md)",
    )
    q.add_argument(
        "--trust",
        type=float,
        metavar="R",
        help="budget runs, upgrade allocator: a layer may take a cheaper candidate whose measured error is at "
        "most R times its error under the uniform base, to pay for another layer's better one (default 1; "
        "no layer worse than under the base). 1.5 helped at a uniform format's own size and hurt between "
        "them; --fade does the first without the second (BENCHMARKS.md)",
    )
    q.add_argument(
        "--fade",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="budget runs, upgrade allocator: near a uniform format's own size, let a layer fall back to its "
        "error under the base the plan had just below that size, at a price that rises to infinity above it (one "
        "base-to-base gap for coarser groups of the same bit width, only until the next uniform format fits for a "
        "bit less), so a budget that just reaches a format gets no worse plan than one just below it "
        "(default: on; --no-fade for the plain allocator)",
    )
    q.add_argument(
        "--refine",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="budget runs: then improve the plan for this long by an evolutionary search scored by "
        "whole-model KL divergence (default 0: off; holds every layer's Pareto candidates in memory)",
    )
    q.add_argument(
        "--refine-windows", type=int, default=4, help="held-out calibration windows the refinement scores plans on (4)"
    )
    q.add_argument(
        "--group-size",
        help="inputs sharing one scale: a positive integer or 'channel' (default 128; with --target, its block)",
    )
    q.add_argument(
        "--sym",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="symmetric grid: no zero point stored (default: asymmetric; with --target compressed-tensors, symmetric)",
    )
    q.add_argument(
        "--target",
        choices=["gguf", "compressed-tensors"],
        help="write only formats this export format holds (gguf: llama.cpp's types; compressed-tensors: integer "
        "grids whose groups divide the rows, q/k/v and gate/up in one format each, for vLLM), so that lowbit "
        "export writes exactly what was solved; --bits then names the target's format of that width",
    )
    q.add_argument(
        "--method",
        default="gptq",
        choices=["gptq", "rtn"],
        help="gptq (default): second-order error compensation on calibration data; rtn: round to nearest, no data",
    )
    q.add_argument(
        "--clip-search",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="per group, search the range shrink with the least error (squared error for rtn, weighted by the "
        "Hessian diagonal for gptq); default: on for gptq, off for rtn",
    )
    c = q.add_argument_group("calibration (gptq)")
    c.add_argument("--calib", default="c4", help="calibration text: a named data set (c4, wikipedia) or a .txt/.jsonl")
    c.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    c.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    c.add_argument("--seqlen", dest="calib_seqlen", type=int, help=argparse.SUPPRESS)  # lowbit 0.1's spelling
    c.add_argument("--damp", type=float, default=0.01, help="Hessian damping, fraction of its mean diagonal (0.01)")
    c.add_argument(
        "--act-order",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="solve columns by decreasing Hessian diagonal, group scales fitted up front (default on)",
    )
    c.add_argument(
        "--true-sequential",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="calibrate o_proj and the MLP on the outputs of the already quantized layers before them "
        "(default on; off: one Hessian pass per block on float inputs, faster)",
    )
    c.add_argument(
        "--scale-refit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="re-solve group scales for the final codes by least squares on the Hessian (default on)",
    )
    c.add_argument(
        "--awq",
        action="store_true",
        help="activation-aware scaling: per block, scale each linear's input channels by their activation size "
        "(the exponent searched per group of linears), folded into the norm or linear before it; llama, "
        "mistral, qwen2, qwen3",
    )
    c.add_argument(
        "--float-target",
        action="store_true",
        help="solve each linear toward the float model's output rather than its own on the quantized inputs "
        "(GPTAQ's asymmetric calibration): corrects what earlier blocks got wrong; carries the float model's "
        "activations beside the quantized ones (on smollm2: 1.7x the quantize time, 1.3x the peak memory)",
    )
    c.add_argument(
        "--float-target-damp",
        type=float,
        help="damping of the float target, fraction of the Hessian's mean diagonal (default 0.1): larger keeps "
        "the target nearer the weight where the calibration inputs say little",
    )
    c.add_argument("--calib-batch-size", type=int, default=8, help="windows per block forward (default 8)")
    c.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run (measurement or GPTQ pass) from the state kept next to --out "
        "(same settings required)",
    )
    q.add_argument("--scale-dtype", default="float16", help="dtype of stored scales (default float16)")
    q.add_argument(
        "--storage-dtype",
        default="float16",
        help="dtype of unquantized tensors: embeddings, head, norms: float16 (default), bfloat16 or float32",
    )
    q.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    q.add_argument(
        "--eval", action="store_true", help="evaluate against the float model before saving; results go in the manifest"
    )
    q.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow model code from the hub (off by default: it runs arbitrary code)",
    )
    q.add_argument("--json", action="store_true", help="print a machine-readable summary")
    q.add_argument(
        "--lazy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="read each decoder block from the checkpoint only when it is quantized, so the float model need "
        "not fit in memory (default on; --no-lazy loads the whole model first)",
    )
    q.add_argument(
        "--rotate",
        action="store_true",
        help="rotate the residual stream first, as `lowbit rotate` does (loads the whole model in float32; "
        "llama, mistral, qwen2, qwen3; a tied head becomes a second table)",
    )
    q.add_argument("--rotate-seed", type=int, default=0, help="the rotation's seed (default 0)")
    _add_offload_option(q, "beside --out")
    _add_compute_options(q)
    _add_eval_options(q, legacy="quantize")

    e = sub.add_parser("eval", help="perplexity, KL divergence and top-1 agreement of a model")
    e.add_argument("model", help="lowbit artifact, HF model directory, .gguf file, hub id or alias")
    e.add_argument("--reference", help="float model to compare with (default: an artifact's source)")
    e.add_argument("--no-reference", action="store_true", help="perplexity only")
    e.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub")
    e.add_argument("--json", action="store_true", help="print results as JSON")
    e.add_argument(
        "--engine",
        choices=["torch", "llama.cpp"],
        default="torch",
        help="torch (default): lowbit's own runtime; llama.cpp: score a .gguf file with llama.cpp itself "
        "(through xllamacpp; the reference defaults to the model lowbit exported it from)",
    )
    _add_offload_option(e, "under the cache directory (the reference, computed block by block)")
    _add_compute_options(e)
    _add_eval_options(e, legacy="eval")

    x = sub.add_parser(
        "export", help="write an artifact in a format other engines load (gguf: llama.cpp; compressed-tensors: vLLM)"
    )
    x.add_argument("artifact", help="artifact directory written by lowbit quantize")
    x.add_argument("--to", required=True, choices=["gguf", "compressed-tensors"], help="the format to write")
    x.add_argument(
        "--out", required=True, help="the file (gguf, e.g. model.gguf) or directory (compressed-tensors) to write"
    )
    x.add_argument("--overwrite", action="store_true", help="replace an existing output")

    r = sub.add_parser(
        "rotate",
        help="write a float copy of a model with its residual stream rotated (same function, easier to "
        "quantize); quantize that copy",
    )
    r.add_argument(
        "model", help="HF model directory, .gguf file, hub id, or alias (smollm2-135m): llama, mistral, qwen2 or qwen3"
    )
    r.add_argument("--out", required=True, help="the Hugging Face checkpoint directory to write (float32)")
    r.add_argument("--seed", type=int, default=0, help="seed of the random orthogonal matrices (default 0)")
    r.add_argument(
        "--heads",
        action="store_true",
        help="also rotate each attention head's values (v_proj rows, o_proj inputs; SpinQuant's R2)",
    )
    r.add_argument(
        "--no-residual",
        dest="residual",
        action="store_false",
        help="leave the residual stream alone (with --heads: only the heads; a tied head stays tied)",
    )
    r.add_argument("--overwrite", action="store_true", help="replace an existing output")
    r.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub")

    i = sub.add_parser("inspect", help="show what an artifact holds: formats, bpw, sizes, results")
    i.add_argument("artifact", help="artifact directory written by lowbit quantize")
    i.add_argument("--layers", action="store_true", help="list every quantized layer")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    return parser


def recipe_from_args(args: argparse.Namespace):
    """The Recipe the quantize options describe (validated by the library)."""
    from lowbit.allocate.size import parse_size
    from lowbit.recipe import GPTQSettings, Recipe

    if args.bits is not None and args.bpw is not None:
        raise LowbitError("give --bits or --bpw, not both (--bpw 3.25 is --bits 3.25)")
    size = parse_size(args.size) if args.size is not None else None
    bits = _bits(args.bits) if args.bits is not None else _bits(args.bpw, "--bpw") if args.bpw is not None else None
    if args.format is not None and (bits is not None or size is not None):
        raise LowbitError("give --format or --bits/--bpw/--size, not both")
    if bits is None and size is None and args.format is None:
        raise LowbitError("give --bits (e.g. --bits 4, or a budget such as --bits 3.25), --bpw, --size or --format")
    if size is not None and bits is not None:
        raise LowbitError("give --bits/--bpw or --size, not both")
    if args.candidates is not None and size is None and not isinstance(bits, float):
        raise LowbitError("--candidates are what a budget chooses from; give --bits with a decimal, --bpw or --size")
    if args.awq and args.method != "gptq":
        raise LowbitError("--awq searches its scales on calibration data, which --method rtn does not read; drop one")
    if args.float_target and args.method != "gptq":
        raise LowbitError("--float-target is a GPTQ option (rtn reads no calibration data); drop one")
    if args.float_target_damp is not None and not args.float_target:
        raise LowbitError("--float-target-damp sets the damping of --float-target; add --float-target or drop it")
    gptq = None
    ft_damp = GPTQSettings.float_target_damp if args.float_target_damp is None else args.float_target_damp
    if args.method == "gptq":
        gptq = GPTQSettings(
            percdamp=args.damp,
            act_order=args.act_order,
            true_sequential=args.true_sequential,
            batch_size=args.calib_batch_size,
            scale_refit=args.scale_refit,
            awq=args.awq,
            float_target=args.float_target,
            float_target_damp=ft_damp,
        )
    return Recipe.build(
        bits=bits if isinstance(bits, int) else 4,
        group_size="default" if args.group_size is None else _group_size(args.group_size),
        target=args.target,
        symmetric=args.sym,
        method=args.method,
        clip_search=args.clip_search,
        scale_dtype=args.scale_dtype,
        storage_dtype=args.storage_dtype,
        calib=args.calib,
        nsamples=args.nsamples,
        seqlen=args.calib_seqlen,
        gptq=gptq,
        budget_bpw=bits if isinstance(bits, float) else None,
        size_bytes=size,
        allocator=args.allocator,
        weighting=args.weighting,
        **({} if args.trust is None else {"trust": args.trust}),
        **({} if args.fade is None else {"fade": args.fade}),
        refine_seconds=args.refine,
        refine_windows=args.refine_windows,
        keep=args.keep,
        format=args.format,
        candidates=args.candidates,
    )


def _eval_settings(args: argparse.Namespace):
    from lowbit.eval import EvalSettings

    return EvalSettings(args.data, args.protocol, args.eval_seqlen, args.eval_batch_size)


def _print_metrics(m: dict[str, Any]) -> None:
    line = f"perplexity {m['perplexity']:.3f}"
    if "kld" in m:
        line += f" | KLD {m['kld']:.4f} | top-1 agreement {m['top1_agreement']:.4f}"
    if "reference_perplexity" in m:
        line += f" | reference perplexity {m['reference_perplexity']:.3f}"
    line += f" | {m['windows']} windows x {m['seqlen']} tokens ({m['protocol']}) on {m['data']}"
    print(line)


def cmd_quantize(args: argparse.Namespace) -> int:
    from lowbit.job import quantize_to_artifact

    recipe = recipe_from_args(args)
    evaluation = _eval_settings(args)  # checked even without --eval, so a typo is never silently kept
    done = quantize_to_artifact(
        args.model,
        recipe,
        args.out,
        overwrite=args.overwrite,
        resume=args.resume,
        measurements=args.measurements,
        evaluation=evaluation if args.eval else None,
        trust_remote_code=args.trust_remote_code,
        device=args.device,
        dtype=args.dtype,
        lazy=args.lazy,
        offload_activations=args.offload_activations,
        rotation_seed=args.rotate_seed if args.rotate else None,
    )
    m = done.manifest
    budget = m["settings"].get("budget")
    summary = {
        "out": str(done.out),
        "format": m["settings"]["format"],
        "budget": budget,
        "bits_per_weight": m["bits_per_weight"],
        "artifact_bytes": m["sizes"]["artifact_bytes"],
        "fp16_bytes": m["sizes"]["fp16_bytes"],
        "quantize_seconds": m["stats"]["quantize_seconds"],
        "peak_rss_mb": m["stats"]["peak_rss_mb"],
        "pipeline": m["stats"].get("pipeline"),
        "evaluation": done.evaluation,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"wrote {done.out}: {len(m['layers'])} layers at {m['bits_per_weight']:.4f} bpw, "
        f"{summary['artifact_bytes'] / 1e6:.1f} MB (16-bit: {summary['fp16_bytes'] / 1e6:.1f} MB)"
    )
    if budget:
        counts = ", ".join(f"{n} x{c}" for n, c in budget["formats"].items())
        if budget.get("size_bytes"):
            weights = m["sizes"]["weights_bytes"]
            print(
                f"size budget {budget['size_bytes'] / 1e6:.2f} MB ({budget['allocator']}): weights file "
                f"{weights / 1e6:.2f} MB, {budget['fixed_bytes'] / 1e6:.2f} MB of it float or pinned; "
                f"formats: {counts}{_tables_text(budget)}"
            )
        else:
            print(
                f"budget {budget['bpw']} bpw ({budget['allocator']}): achieved {budget['achieved_bpw']:.4f}; "
                f"formats: {counts}"
            )
        r = budget.get("refinement")
        if r:
            rho = r["proxy_rank_correlation"]
            print(
                f"refinement: held-out KL {r['start_kl']:.4f} -> {r['final_kl']:.4f} in {r['generations']} "
                f"generations ({r['seconds']:.0f} s); proxy-vs-KL rank correlation "
                f"{'n/a' if rho is None else f'{rho:.2f}'} over {r['plans_scored']} plans"
            )
    if done.evaluation:
        _print_metrics(done.evaluation)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lowbit.devices import cast_parameters, resolve_device, resolve_dtype
    from lowbit.eval import default_reference, evaluate
    from lowbit.models import load_model

    settings = _eval_settings(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.engine == "llama.cpp":
        from lowbit.eval.llamacpp import open_gguf

        if args.device != "auto" or args.dtype != "auto":
            raise LowbitError(
                "--device and --dtype apply to lowbit's runtime; llama.cpp picks its own (--engine torch)"
            )
        model, tokenizer, source = open_gguf(args.model, settings.seqlen)
        device = None
        manifest = None
    else:
        loaded = load_model(args.model, dtype, trust_remote_code=args.trust_remote_code)
        if loaded.tokenizer is None:
            raise LowbitError(f"{args.model} has no tokenizer files; re-create the artifact with lowbit quantize")
        if loaded.source.kind == "artifact":
            cast_parameters(loaded.model, dtype)
        model, tokenizer = loaded.model, loaded.tokenizer
        source = default_reference(model)
        manifest = getattr(model, "lowbit_manifest", None)
    reference = None if args.no_reference else args.reference or source
    result = evaluate(
        model,
        tokenizer,
        reference=reference,
        data=settings.data,
        protocol=settings.protocol,
        seqlen=settings.seqlen,
        batch_size=settings.batch_size,
        device=device,
        dtype=dtype,
        offload_activations=args.offload_activations,
    )
    if args.engine == "llama.cpp":
        model.close()
    result["model"] = args.model
    result["reference"] = reference
    result["engine"] = args.engine
    if manifest:
        result["bits_per_weight"] = manifest["bits_per_weight"]
        result["artifact_bytes"] = manifest["sizes"]["artifact_bytes"]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_metrics(result)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.to == "compressed-tensors":
        from lowbit.export.compressed_tensors import export_compressed_tensors

        out, notes = export_compressed_tensors(args.artifact, args.out, overwrite=args.overwrite)
        size = sum(p.stat().st_size for p in out.iterdir())
        print(f"wrote {out}: {size / 1e6:.1f} MB")
        for note in notes[:3]:
            print(f"note: {note}", file=sys.stderr)
        if len(notes) > 3:
            print(f"note: ... {len(notes) - 3} more (README: compressed-tensors)", file=sys.stderr)
        return 0
    from lowbit.export.gguf import export_gguf

    out = export_gguf(args.artifact, args.out, overwrite=args.overwrite)
    print(f"wrote {out}: {out.stat().st_size / 1e6:.1f} MB")
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    from lowbit.transforms.rotation import write_rotated

    rotation = write_rotated(
        args.model, args.out, args.seed, args.residual, args.heads, args.overwrite, args.trust_remote_code
    )
    what = [f"the {rotation.width}-wide residual stream"] if rotation.residual else []
    what += ["every attention head's values"] if rotation.heads else []
    untied = "; the head was tied to the embedding and is now a second table" if rotation.untied_head else ""
    change = f"largest change {rotation.max_block_error:.1e} of a block's output"
    print(f"wrote {args.out}: rotated {' and '.join(what)} ({change}){untied}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from lowbit.artifact import read_manifest
    from lowbit.formats import format_from_dict

    m = read_manifest(args.artifact)
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    fmt = m["settings"]["format"]
    fmt = format_from_dict(fmt).name if fmt else "mixed (per layer, see the plan below)"
    sizes = m["sizes"]
    print(f"artifact     {args.artifact}")
    print(f"source       {m.get('source')}  ({m['model_type']})")
    settings = m["settings"]
    if m["method"] == "gptq":
        g = settings.get("gptq", {})
        detail = (
            f"calibration {settings.get('calibration')} {settings.get('nsamples')} x {settings.get('seqlen')}, "
            f"damp {g.get('percdamp')}, act-order {g.get('act_order')}, true-sequential {g.get('true_sequential')}, "
            f"clip search {g.get('clip_search', False)}, scale refit {g.get('scale_refit', False)}"
            + (", activation-aware scales" if g.get("awq") else "")
            + (", float targets" if g.get("float_target") else "")
        )
    else:
        detail = f"clip search: {settings.get('clip_search', False)}"
    print(f"method       {m['method']}  {detail}")
    if settings.get("rotation"):
        r = settings["rotation"]
        what = " and ".join(w for w, on in (("residual stream", r["residual"]), ("attention heads", r["heads"])) if on)
        untied = " (head untied from the embedding)" if r["untied_head"] else ""
        print(f"rotation     {what}, seed {r['seed']}{untied}")
    print(f"format       {fmt}")
    print(
        f"bpw          {m['bits_per_weight']:.4f} over {m['quantized_weights']:,} quantized weights "
        f"in {len(m['layers'])} layers"
    )
    print(f"size         {sizes['artifact_bytes']:,} bytes on disk; 16-bit model: {sizes['fp16_bytes']:,}")
    kept = sorted({n.rsplit(".", 1)[0] for n in m["unquantized"]})
    print(
        f"unquantized  {len(m['unquantized'])} tensors in {m['storage_dtype']} "
        f"(e.g. {', '.join(kept[:3])}{' ...' if len(kept) > 3 else ''})"
    )
    budget = settings.get("budget")
    if budget:
        counts = ", ".join(f"{n} x{c}" for n, c in budget["formats"].items())
        if budget.get("size_bytes"):
            print(
                f"size         budget {budget['size_bytes'] / 1e6:.2f} MB, weights file "
                f"{m['sizes']['weights_bytes'] / 1e6:.2f} MB ({budget['fixed_bytes'] / 1e6:.2f} MB float or pinned)"
                f"{_tables_text(budget)}"
            )
        seconds = budget.get("measurement_seconds")
        measured = "reused" if budget["measurements_reused"] else f"{seconds:.0f} s"
        print(
            f"plan         budget {budget['bpw']:.4g} bpw, achieved {budget['achieved_bpw']:.4f} "
            f"({budget['allocator']}); {counts}; measurement {measured}"
        )
        r = budget.get("refinement")
        if r:
            print(
                f"refinement   held-out KL {r['start_kl']:.4f} -> {r['final_kl']:.4f}, "
                f"{r['generations']} generations, {r['seconds']:.0f} s"
                + (f"; started from {r['start']}" if r.get("start") else "")
            )
    stats = m.get("stats") or {}
    if "quantize_seconds" in stats:
        line = f"{stats['quantize_seconds']:.1f} s"
        if "peak_rss_mb" in stats:
            line += f", peak memory {stats['peak_rss_mb']:.0f} MB"
        p = stats.get("pipeline")
        if p:
            line += (
                f" (block forwards {p['forward']:.1f} s, Hessians {p['hessian']:.1f} s, solver {p['solve']:.1f} s, "
                f"checkpoints {p['checkpoint']:.1f} s; {p['calibration_tokens']:,} calibration tokens)"
            )
        print(f"time         {line}")
    errors = [layer["output_error"] for layer in m["layers"].values() if "output_error" in layer]
    if errors:
        worst = max(m["layers"], key=lambda n: m["layers"][n].get("output_error", -1.0))
        print(
            f"layer error  mean {sum(errors) / len(errors):.4f}, worst {max(errors):.4f} ({worst}); "
            "relative Hessian-weighted output error tr(dW H dWᵀ)/tr(W H Wᵀ)"
        )
    if m.get("evaluation"):
        _print_metrics(m["evaluation"])
    if args.layers:
        print(f"\n{'layer':48s} {'format':18s} {'bpw':>7s} {'output error':>13s} {'weight rel. MSE':>16s}")
        for name, layer in m["layers"].items():
            f = format_from_dict(layer["format"])
            out_err = f"{layer['output_error']:13.3e}" if "output_error" in layer else f"{'-':>13s}"
            w_err = f"{layer['weight_rel_mse']:16.3e}" if "weight_rel_mse" in layer else f"{'-':>16s}"
            print(f"{name:48s} {f.name:18s} {layer['bpw']:7.4f} {out_err} {w_err}")
    return 0


def _tables_text(budget: dict) -> str:
    """'; embedding/head: NAME FORMAT, ...' for a size budget's tables (float or packed)."""
    from lowbit.formats import format_from_dict

    tables = budget.get("tables") or {}
    if not tables:
        return ""
    parts = [f"{n} {'float' if f is None else format_from_dict(f).name}" for n, f in tables.items()]
    return "; embedding/head: " + ", ".join(parts)


COMMANDS = {
    "quantize": cmd_quantize,
    "eval": cmd_eval,
    "export": cmd_export,
    "rotate": cmd_rotate,
    "inspect": cmd_inspect,
}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as exc:
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(format="lowbit: note: %(message)s", level=logging.WARNING, force=True)
    try:
        return COMMANDS[args.command](args)
    except LowbitError as exc:
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        kept = ""
        if args.command == "quantize":
            from lowbit.job import has_resume_state, resume_dir

            if has_resume_state(args.out):
                kept = f"; finished blocks are kept in {resume_dir(args.out)}: rerun with --resume to continue"
        print(f"lowbit: interrupted; no artifact was written{kept}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
