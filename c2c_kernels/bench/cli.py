"""``c2c-bench``: argument parsing, the run's metadata, and the outputs."""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys

import torch

from .. import backends
from . import peaks as peaks_mod
from . import report, runners
from .run import Plan, run
from .workloads import LAYOUT_CHOICES, WORKLOADS, Workload, named_workload

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
# With no arguments: the README's main job on a CPU (under two minutes on 2 cores), and the
# whole first workload on a GPU.
DEFAULTS = {"cpu": dict(layers="2", tokens=[64, 512]), "cuda": dict(layers="all", tokens=[64, 512, 4096])}
DEFAULT_DTYPES = ["fp32", "bf16"]


def _shape(text: str) -> tuple[int, int, int]:
    try:
        layers, heads, dim = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAYERSxHEADSxDIM such as 28x8x128, got {text!r}") from None
    if min(layers, heads, dim) < 1:
        raise argparse.ArgumentTypeError(f"every size must be >= 1, got {text!r}")
    return layers, heads, dim


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="c2c-bench",
        description="Time C2C KV-cache fusion: the research-style eager fuser, torch.compile of it, and "
                    "every available c2c.fuse_all backend, each checked against the reference first.",
        epilog="With no arguments on a CPU: 2 layers of the first workload, 64 and 512 tokens, fp32 and "
               "bf16. See docs/benchmarks.md for how to read the numbers.")
    w = p.add_argument_group("what to run")
    w.add_argument("--workload", nargs="+", metavar="NAME", default=None,
                   help=f"workloads of docs/fuser.md ('all' for every one): {', '.join(WORKLOADS)}")
    w.add_argument("--receiver", type=_shape, metavar="LxHxD",
                   help="a custom workload: receiver layers x KV heads x head dim (needs --sharer)")
    w.add_argument("--sharer", type=_shape, metavar="LxHxD", help="the custom workload's sharer")
    w.add_argument("--hidden", type=_positive, default=1024, help="custom fuser hidden width (1024)")
    w.add_argument("--intermediate", type=_positive, default=1024, help="custom fuser FFN width (1024)")
    w.add_argument("--depth", type=int, default=3, help="custom fuser num_layers, >= 3 (3)")
    w.add_argument("--layers", default=None,
                   help="fused layers to build, from the first ('all'; default 2 on a CPU, all on a GPU)")
    w.add_argument("--tokens", type=_positive, nargs="+", default=None,
                   help="prompt tokens per request (default 64 512 on a CPU, 64 512 4096 on a GPU)")
    w.add_argument("--requests", type=_positive, default=1, help="requests of --tokens tokens each (1)")
    w.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=DEFAULT_DTYPES,
                   help="cache and weight dtypes (fp32 bf16)")
    w.add_argument("--layout", choices=LAYOUT_CHOICES, default="contiguous",
                   help="cache layout of the fuse_all backends: contiguous (HF), paged (vLLM), or any "
                        "engine layout; eager always runs on contiguous HF tensors (contiguous)")
    w.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when visible")
    w.add_argument("--backends", nargs="+", metavar="NAME", default=None,
                   help=f"contenders, from {runners.known_contenders()} (default: every available one "
                        f"but reference)")
    w.add_argument("--reference", action="store_true", help="also time the (slow) reference backend")
    w.add_argument("--seed", type=int, default=0, help="weights and caches come from this seed (0)")
    h = p.add_argument_group("how")
    h.add_argument("--threads", type=_positive, default=None, metavar="N",
                   help="CPU threads for torch (default: torch's own; 1 gives steadier numbers on a "
                        "machine other jobs share)")
    h.add_argument("--no-check", action="store_true", help="skip the check against the reference")
    h.add_argument("--min-time", type=float, default=None, metavar="S",
                   help="time each contender for at least S seconds (0.5 on a CPU, 0.1 on a GPU)")
    h.add_argument("--json", metavar="PATH", help="write the rows, peaks and machine as JSON")
    h.add_argument("--plot", metavar="PATH", help="write a PNG: time per token count per backend + roofline")
    h.add_argument("--quiet", action="store_true", help="no progress output")
    h.add_argument("--debug", action="store_true", help="full tracebacks in the error column")
    h.add_argument("--list", action="store_true", help="list workloads and available contenders, then exit")
    e = p.add_argument_group("end to end (needs the hf extra)")
    e.add_argument("--ttft", action="store_true",
                   help="time to first token with transformers models (random weights from the published "
                        "configs): both prefills, fusion, first decode; fused kernels vs the reference fuser")
    e.add_argument("--tiny-models", action="store_true", help="with --ttft: shrink the models; with --decode: "
                   "shrink the fusers (a smoke run)")
    e.add_argument("--decode", action="store_true",
                   help="the decode step of include_response fusion: B requests x 1 token, every mapped layer, "
                        "one fuse_all per step (B from --requests if given, else 1, 8 and 64)")
    return p


def _device(args, p) -> torch.device:
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    return torch.device(name)


def _workloads(args, p) -> list[Workload]:
    if (args.receiver is None) != (args.sharer is None):
        p.error("--receiver and --sharer go together (a custom workload needs both)")
    if args.receiver is not None:
        if args.workload:
            p.error("give either --workload or --receiver/--sharer, not both")
        if args.depth < 3:
            p.error(f"--depth: the fuser needs num_layers >= 3, got {args.depth}")
        return [Workload("custom", args.receiver, args.sharer, args.hidden, args.intermediate, args.depth)]
    names = args.workload or [next(iter(WORKLOADS))]
    if "all" in names:
        names = list(WORKLOADS)
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        p.error(f"--workload: unknown {unknown}; expected 'all' or names from {list(WORKLOADS)}")
    return [named_workload(n) for n in names]


def _layers(args, p, workloads, device) -> list[int]:
    text = args.layers or DEFAULTS[device.type]["layers"]
    if text == "all":
        return [w.fused_layers for w in workloads]
    if args.layers is None:  # the default count, capped for small custom workloads
        return [min(int(text), w.fused_layers) for w in workloads]
    try:
        count = int(text)
    except ValueError:
        p.error(f"--layers: expected a count or 'all', got {text!r}")
    too_few = [w.name for w in workloads if w.fused_layers < count]
    if count < 1 or too_few:
        p.error(f"--layers {count}: must be between 1 and the fused layers of {too_few or 'the workload'} "
                f"({min(w.fused_layers for w in workloads)})")
    return [count] * len(workloads)


def _contenders(args, p, device) -> list[str]:
    if args.backends is None:
        return runners.default_contenders(device.type, args.reference)
    names = list(dict.fromkeys(args.backends + (["reference"] if args.reference else [])))
    for name in names:
        if name not in runners.known_contenders():
            p.error(f"--backends: unknown {name!r}; expected names from {runners.known_contenders()}")
        if name in (runners.EAGER, runners.COMPILED):
            continue
        reason = backends.reason(name)
        if reason is not None:
            p.error(f"--backends: {name!r} is not available here: {reason}")
        if device.type not in backends.devices(name):
            p.error(f"--backends: {name!r} runs on {list(backends.devices(name))}, not on {device.type}")
    return names


def _meta(argv, device: torch.device) -> dict:
    meta = {"command": shlex.join(["c2c-bench", *argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": device.type, "python": platform.python_version(), "torch": torch.__version__,
            "cpu": _cpu_name(), "cpu_threads": torch.get_num_threads()}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    meta["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else meta["cpu"]
    return meta


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _warn_if_busy(device: torch.device) -> None:
    """OpenMP threads on an oversubscribed CPU stall each other: say so before the numbers."""
    if device.type != "cpu" or torch.get_num_threads() == 1 or not hasattr(os, "getloadavg"):
        return
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:
        print(f"c2c-bench: warning: load average {load:.1f} on {cores} cores; other processes compete for "
              f"the CPU and {torch.get_num_threads()} threads per op will stall each other (--threads 1 "
              f"gives steadier numbers)", file=sys.stderr)


def _list(device: torch.device) -> None:
    print("workloads (receiver / sharer: layers x KV heads x head dim; fused layers):")
    for name in WORKLOADS:
        w = named_workload(name)
        print(f"  {name:26s} {'x'.join(map(str, w.receiver)):>9} / {'x'.join(map(str, w.sharer)):<9} "
              f"{w.fused_layers}")
    print(f"contenders on {device.type}: {', '.join(runners.default_contenders(device.type, True))}")
    for name in backends.names():
        reason = backends.reason(name)
        if reason is not None:
            print(f"  {name}: unavailable ({reason})")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser()
    args = p.parse_args(argv)
    device = _device(args, p)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.list:
        _list(device)
        return 0
    if args.ttft:
        from .ttft import run_ttft
        dtype = DTYPES[args.dtype[0]] if args.dtype != DEFAULT_DTYPES else (
            torch.bfloat16 if device.type == "cuda" else torch.float32)
        return run_ttft(args.workload or [next(iter(WORKLOADS))], args.tokens or [512], args.requests, device,
                        dtype, repeats=3, tiny=args.tiny_models, json_path=args.json)
    if args.decode:
        from .ttft import run_decode
        dtype = DTYPES[args.dtype[0]] if args.dtype != DEFAULT_DTYPES else (
            torch.bfloat16 if device.type == "cuda" else torch.float32)
        batches = [args.requests] if "--requests" in argv else [1, 8, 64]
        return run_decode(args.workload or [next(iter(WORKLOADS))], batches, device, dtype,
                          repeats=3 if device.type == "cpu" else 20, tiny=args.tiny_models, json_path=args.json)
    workloads = _workloads(args, p)
    plan = Plan(workloads=workloads, layers=_layers(args, p, workloads, device),
                tokens=args.tokens or DEFAULTS[device.type]["tokens"], requests=args.requests,
                dtypes=list(dict.fromkeys(DTYPES[d] for d in args.dtype)), layout=args.layout, device=device,
                contenders=_contenders(args, p, device), check=not args.no_check,
                min_time_s=args.min_time if args.min_time is not None else (0.1 if device.type == "cuda" else 0.5),
                seed=args.seed, show_progress=not args.quiet, debug=args.debug)
    meta = _meta(argv, device)
    _warn_if_busy(device)
    if not args.quiet:
        print(f"c2c-bench on {meta['device_name']}: measuring peaks ...", file=sys.stderr, flush=True)
    peaks = peaks_mod.measure(plan.dtypes, device)
    save = (lambda rows: report.write_json(args.json, meta, peaks, rows)) if args.json else None
    rows = run(plan, peaks, on_rows=save)  # the JSON grows as it goes: a killed run keeps its rows
    print(report.table(rows))
    matmul = ", ".join(f"{d} {v:.3g}" for d, v in peaks["matmul_tflops"].items())
    print(f"\npeaks measured in this run: matmul TFLOP/s {matmul}; copy {peaks['copy_gbs']:.0f} GB/s. "
          f"% roofline = the bound these peaks allow / median.")
    if args.json:
        report.write_json(args.json, meta, peaks, rows)
        print(f"wrote {args.json}")
    if args.plot:
        problem = report.plot(args.plot, meta, peaks, rows)
        print(problem if problem else f"wrote {args.plot}", file=sys.stderr if problem else sys.stdout)
    failed = [r for r in rows if r["error"] or r["correct"] is False]
    if failed:
        print(f"{len(failed)} row(s) failed: " + ", ".join(sorted({r['backend'] for r in failed})), file=sys.stderr)
    return 1 if failed else 0
