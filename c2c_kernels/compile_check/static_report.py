"""The static performance report: what every GPU kernel of the package costs, judged from its
compiled code alone (no GPU).

Triton: the package's own host code runs every benchmark workload (docs/fuser.md) at 64, 1024
and 16384 tokens under the stand-in driver (``driver.py``) for each architecture, so every
kernel configuration the autotuner may pick after pruning is compiled (the stand-in autotuner
compiles every candidate it would time) and its cubin read. CUDA: every ``csrc/cuda/*.cu`` with
device code is compiled with nvcc (``-Xptxas -v``), the cubin cached under
``build/static_report`` by a hash of its sources and flags.

One row per (backend, kernel, config, dtype, arch): registers, spill_bytes (local memory per
thread), shared_bytes (static + dynamic per CTA), threads, ctas_per_sm, gemm / wgmma, and for
GEMM kernels the grid and waves at 64, 1024 and 16384 tokens of the first workload (all its
fused layers, K and V). :func:`violations` is the gate CI runs (tests/test_static_report.py).

``python benchmarks/static_report.py --json OUT.json [--subset] [--arch sm_90a sm_80]``.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from .occupancy import ARCHS, arch as arch_of, occupancy, waves

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENS = (64, 1024, 16384)
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Views as the benchmark builds them, and the same views one element off a 16-byte boundary
# (a cache carved out of a larger buffer): the latter takes the kernels' unvectorised path.
VARIANTS = ("aligned", "unaligned")
LAYOUTS = ("hf", "vllm_nhd")  # c2c-bench's contiguous and paged layouts
OPS = ("fuse", "project+merge")  # sequential fusion; parallel multi-sharer mode
# CI's subset (about a minute of compiling on 2 cores with a cold Triton cache): 64 and 1024
# tokens, the short- and the long-prompt candidates of the autotuner.
SUBSET = dict(workloads=1, dtypes=("bf16",), tokens=(64, 1024), layouts=("hf",), variants=VARIANTS,
              ops=("fuse",), archs=("sm_90a",))


# --------------------------------------------------------------------------- Triton (worker side)

def _stand_in_args(workload, tokens: int, dtype, layout: str, variant: str):
    """The c2c::fuse arguments of one benchmark call (all fused layers, K and V) as stand-ins:
    real shapes, strides and slot values' dtypes, no data (one layer is built on the CPU and
    its views repeated, each with a storage of its own)."""
    import torch

    from ..testing import make_case
    from .driver import as_stand_in, stand_in_tensor

    (_, rh, rd), (_, sh, sd) = workload.receiver, workload.sharer
    fusers = 2 * workload.fused_layers
    case = make_case(layout=layout, layers=1, receiver_heads=rh, receiver_dim=rd, sharer_heads=sh, sharer_dim=sd,
                     hidden=workload.hidden, intermediate=workload.intermediate, num_layers=workload.depth,
                     seq_lens=(tokens,), page_size=16, padding=0, align=False, dtype=dtype, seed=1)
    shift = 1 if variant == "unaligned" else 0

    def view(t):
        if not shift:
            return as_stand_in(t)
        meta = torch.empty(t.untyped_storage().nbytes() // t.element_size() + shift, dtype=t.dtype, device="meta")
        return as_stand_in(meta.as_strided(t.shape, t.stride(), t.storage_offset() + shift))

    receiver = [view(case.receiver_caches[i % len(case.receiver_caches)]) for i in range(fusers)]
    sharer = [view(case.sharer_caches[i % len(case.sharer_caches)]) for i in range(fusers)]
    weights = [stand_in_tensor((fusers, *t.shape[1:]), t.dtype) for t in case.weights]
    return [receiver, sharer, as_stand_in(case.receiver_slots), as_stand_in(case.sharer_slots), weights,
            list(range(fusers))]


def _reset_autotuners() -> int:
    """Forget every pick of the package's autotuners, so each call autotunes (and compiles every
    candidate) as in a process that only ever sees that layout and alignment: their keys need
    not hold everything that changes the compiled code (a page size, a vector width)."""
    from triton.runtime.autotuner import Autotuner

    count = 0
    for name, module in list(sys.modules.items()):
        if not name.startswith("c2c_kernels") or module is None:
            continue
        for value in list(vars(module).values()):
            seen = 0
            while value is not None and seen < 8:  # through @triton.heuristics and other wrappers
                if isinstance(value, Autotuner):
                    value.cache.clear()
                    count += 1
                value, seen = getattr(value, "fn", None), seen + 1
    return count


def _triton_worker(arch: str, plan: dict, out_path: str) -> int:
    """Runs in its own process (the host code caches device limits and autotune picks)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("static report: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    import torch

    import c2c_kernels  # noqa: F401  (registers torch.ops.c2c)

    from ..bench.workloads import WORKLOADS, named_workload
    from .driver import GPUS, stand_in_gpu

    names = list(WORKLOADS)[:plan["workloads"]] if isinstance(plan["workloads"], int) else plan["workloads"]
    launches, failures = [], []
    with stand_in_gpu(GPUS[arch]) as driver:
        for w_index, name in enumerate(names):
            workload = named_workload(name)
            for dtype_name in plan["dtypes"]:
                dtype = getattr(torch, DTYPE_NAMES[dtype_name])
                for layout in plan["layouts"]:
                    for variant in plan["variants"]:
                        for tokens in plan["tokens"]:
                            context = dict(workload=name, first_workload=w_index == 0, dtype=dtype_name,
                                           layout=layout, variant=variant, tokens=tokens)
                            args = None
                            _reset_autotuners()
                            for op in plan.get("ops", OPS):
                                before = len(driver.launches)
                                try:
                                    args = args or _stand_in_args(workload, tokens, dtype, layout, variant)
                                    if op == "fuse":
                                        torch.ops.c2c.fuse(*args, "triton", False)
                                    else:
                                        projection, head_scale = torch.ops.c2c.project(*args, "triton", False)
                                        torch.ops.c2c.merge(args[0], args[2], list(projection.unbind(0)),
                                                            list(head_scale.unbind(0)), "triton", False)
                                except Exception as exc:  # every failure is reported, not only the first
                                    text = str(exc).strip().splitlines()
                                    failures.append(dict(context, op=op, arch=arch,
                                                         error=f"{type(exc).__name__}: {text[0] if text else ''}"))
                                for launch in driver.launches[before:]:
                                    launches.append(dict(
                                        context, op=op, kernel=launch.kernel, grid=list(launch.grid),
                                        constexprs={k: str(v) for k, v in launch.constexprs.items()},
                                        num_warps=launch.num_warps, num_stages=launch.num_stages,
                                        shared=launch.shared, static_shared=launch.static_shared,
                                        registers=launch.registers, spills=launch.spills, gemm=launch.gemm,
                                        mma=list(launch.mma), hash=launch.hash))
                            print(f"  {arch} {name} {dtype_name} {layout} {variant} {tokens}: "
                                  f"{len(launches)} launches so far", file=sys.stderr, flush=True)
    with open(out_path, "w") as f:
        json.dump(dict(launches=launches, failures=failures), f)
    return 0


def triton_launches(arch: str, plan: dict, verbose: bool = True) -> dict:
    """The worker's launches and failures for one architecture (a subprocess)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "launches.json")
        proc = subprocess.Popen([sys.executable, "-m", "c2c_kernels.compile_check.static_report", "--worker", arch,
                                 "--plan", json.dumps(plan), "--json", out], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        tail = []
        for line in proc.stdout:  # progress as it comes; the tail explains a crash
            if verbose:
                print(line, end="", file=sys.stderr, flush=True)
            tail = (tail + [line])[-60:]
        if proc.wait() != 0 or not os.path.exists(out):
            return dict(launches=[], failures=[dict(arch=arch, op="worker", error="".join(tail)[-3000:])])
        with open(out) as f:
            return json.load(f)


_DTYPE_VALUE = re.compile(r"^(triton\.language\.)?(bf16|fp16|fp32|tf32|bfloat16|float16|float32|fp8\w*|u?int\d+)$")


def config_label(constexprs: dict, num_warps: int, num_stages: int) -> str:
    """The compile-time choices of a launch: tile sizes and other constexprs, warps and stages.
    Dtype constexprs (the dtype column says them) and Triton's stride == 1 specialisations are
    left out."""
    parts = [f"{k}={v}" for k, v in constexprs.items()
             if not k.startswith("stride_") and not _DTYPE_VALUE.match(str(v)) and not k.startswith("(")]
    return " ".join(parts + [f"warps={num_warps}", f"stages={num_stages}"])


def triton_rows(arch: str, launches: list[dict], tokens=TOKENS) -> list[dict]:
    """One row per (kernel, config, dtype) of this arch: the worst figures over its compiled
    specialisations, and the grid/waves of the first workload at each token count."""
    a = arch_of(arch)
    groups: dict[tuple, list[dict]] = {}
    for launch in launches:
        key = (launch["kernel"], config_label(launch["constexprs"], launch["num_warps"], launch["num_stages"]),
               launch["dtype"])
        groups.setdefault(key, []).append(launch)
    rows = []
    for (kernel, config, dtype), group in groups.items():
        registers = max(g["registers"] or 0 for g in group)
        spill = max(g["spills"] or 0 for g in group)
        shared = max(g["shared"] + g["static_shared"] for g in group)
        threads = group[0]["num_warps"] * 32
        occ = occupancy(a, registers=registers, shared_bytes=shared, threads=threads)
        gemm = any(g["gemm"] for g in group)
        row = dict(backend="triton", kernel=kernel, config=config, dtype=dtype, arch=arch, registers=registers,
                   spill_bytes=spill, shared_bytes=shared, threads=threads, ctas_per_sm=occ.ctas_per_sm,
                   limited_by=occ.limited_by, gemm=gemm,
                   wgmma=(all("wgmma" in g["mma"] for g in group if g["gemm"]) if gemm else None),
                   binaries=len({g["hash"] for g in group}),
                   workloads=sorted({g["workload"] for g in group}),
                   layouts=sorted({f'{g["layout"]}/{g["variant"]}' for g in group}),
                   candidate_at_tokens=sorted({g["tokens"] for g in group}), sms=a.sms)
        for t in tokens:
            first = [g for g in group if g["first_workload"] and g["tokens"] == t]
            ctas = max((g["grid"][0] * g["grid"][1] * g["grid"][2] for g in first), default=None)
            row[f"grid_{t}"] = ctas if gemm else None
            row[f"waves_{t}"] = (None if not gemm or ctas is None
                                 else _round(waves(ctas, a.sms, occ.ctas_per_sm)))
        rows.append(row)
    return rows


def _round(value):
    return None if value is None else round(value, 2)


# --------------------------------------------------------------------------- CUDA

CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
CACHE_DIR = os.path.join(ROOT, "build", "static_report")
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)
_TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s+<(ATen|torch|c10)/', re.M)


def _gpu_text(text: str) -> str:
    """The lines a GPU build compiles: blocks only a C2C_CUDA_EMULATOR build sees are dropped
    (other conditions keep both branches)."""
    out, stack = [], []  # per open #if: None (not about the emulator) or whether this branch is live
    for line in text.splitlines():
        d = line.strip()
        if d.startswith("#"):
            word = d[1:].strip().split(" ")[0].split("(")[0]
            if word in ("if", "ifdef", "ifndef"):
                about = "C2C_CUDA_EMULATOR" in d
                negated = word == "ifndef" or "!defined" in d.replace(" ", "") or "!C2C" in d.replace(" ", "")
                stack.append(None if not about else (negated if word != "ifdef" else False))
                continue
            if word in ("else", "elif") and stack and stack[-1] is not None:
                stack[-1] = not stack[-1]
                continue
            if word == "endif" and stack:
                stack.pop()
                continue
        if all(s is None or s for s in stack):
            out.append(line)
    return "\n".join(out)


def _closure(path: str) -> list[tuple[str, str]]:
    """(path, GPU-build text) of the file and every project header it includes, transitively
    (resolved as setup.py's -Icsrc)."""
    seen, todo = {}, [path]
    while todo:
        p = todo.pop()
        if p in seen or not os.path.isfile(p):
            continue
        with open(p) as f:
            seen[p] = _gpu_text(f.read())
        for inc in _INCLUDE.findall(seen[p]):
            for base in (os.path.dirname(p), os.path.join(ROOT, "csrc")):
                candidate = os.path.normpath(os.path.join(base, inc))
                if os.path.isfile(candidate):
                    todo.append(candidate)
                    break
    return list(seen.items())


def cuda_sources() -> list[dict]:
    """Every csrc/cuda/*.cu with device code (``__global__`` in it or a project header it includes)."""
    import glob

    out = []
    for path in sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu"))):
        files = _closure(path)
        if any("__global__" in text for _, text in files):
            out.append(dict(path=path, files=[p for p, _ in files],
                            uses_torch=any(_TORCH_INCLUDE.search(text) for _, text in files)))
    return out


def _nvcc() -> str | None:
    from shutil import which

    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return which("nvcc")


def _nvcc_flags(arch: str) -> list[str]:
    """setup.py's nvcc flags and include folders, for one architecture."""
    import torch
    from torch.utils import cpp_extension

    number = arch[3:]
    flags = [f"-gencode=arch=compute_{number},code={arch}", "-O3", "-lineinfo", "--expt-relaxed-constexpr",
             "-DC2C_WITH_CUDA=1", "-std=c++20", *getattr(cpp_extension, "COMMON_NVCC_FLAGS", []),
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    includes = [os.path.join(ROOT, "csrc"), *cpp_extension.include_paths()]
    try:
        import nvidia
        includes += [p for p in (os.path.join(d, "cu13", "include") for d in nvidia.__path__) if os.path.isdir(p)]
    except ImportError:
        pass
    return flags + [f"-I{p}" for p in includes]


def cuda_compile(source: dict, arch: str, *, compile_missing: bool = True) -> dict:
    """The cubin and ptxas log of one .cu for one arch, from the cache when its sources, flags and
    nvcc are unchanged. Returns {status: cached|compiled|skipped|failed, cubin, log, seconds}."""
    nvcc = _nvcc()
    if nvcc is None:
        return dict(status="skipped", reason="no nvcc")
    flags = _nvcc_flags(arch)
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256()
    for p in sorted(source["files"]):
        digest.update(os.path.relpath(p, ROOT).encode() + b"\0" + open(p, "rb").read())
    digest.update("\0".join(f for f in flags if not f.startswith("-I")).encode() + version.encode())
    name = os.path.splitext(os.path.basename(source["path"]))[0]
    stem = os.path.join(CACHE_DIR, arch, f"{name}-{digest.hexdigest()[:16]}")
    cubin, log = stem + ".cubin", stem + ".ptxas.log"
    if os.path.exists(cubin) and os.path.exists(log):
        return dict(status="cached", cubin=cubin, log=log, seconds=0.0)
    if not compile_missing:
        return dict(status="skipped", reason="not cached (the full report compiles and caches it)")
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run([nvcc, "-cubin", *flags, "-Xptxas", "-v", source["path"], "-o", cubin + ".partial"],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(status="failed", reason=(proc.stderr or proc.stdout)[-3000:])
    with open(log, "w") as f:
        f.write(proc.stderr)
    os.replace(cubin + ".partial", cubin)
    return dict(status="compiled", cubin=cubin, log=log, seconds=time.perf_counter() - t0)


_CUDA_DTYPES = (("__nv_bfloat16", "bf16"), ("__half", "fp16"), ("float", "fp32"))


def cuda_rows(arch: str, source: dict, built: dict) -> list[dict]:
    from .resources import cubin_mma, cubin_resources, demangle, parse_ptxas_log, split_kernel_name

    a = arch_of(arch)
    found = cubin_resources(built["cubin"])
    with open(built["log"]) as f:
        ptxas = parse_ptxas_log(f.read())
    mma = cubin_mma(built["cubin"])
    names = demangle(list(found))
    rows = []
    for mangled, r in found.items():
        kernel, config = split_kernel_name(names[mangled])
        p = ptxas.get(mangled, {})
        # ptxas's own count where its log has the function; else the local memory (stack + local)
        spill = p["spill_stores"] if "spill_stores" in p else r.spill_bytes
        ops = mma.get(mangled, set())
        gemm = bool(ops)
        occ = (occupancy(a, registers=r.registers, shared_bytes=r.static_shared, threads=r.max_threads)
               if r.max_threads else None)
        first_arg = config.strip("<>").split(",")[0].strip() if config else ""
        dtype = next((short for ctype, short in _CUDA_DTYPES if first_arg == ctype), "-")
        rows.append(dict(backend="cuda", kernel=kernel, config=config or "-", dtype=dtype, arch=arch,
                         registers=r.registers, spill_bytes=spill, shared_bytes=r.static_shared,
                         threads=r.max_threads, ctas_per_sm=occ.ctas_per_sm if occ else None,
                         limited_by=occ.limited_by if occ else "threads per CTA unknown (no __launch_bounds__)",
                         gemm=gemm, wgmma=("HGMMA" in ops) if gemm else None,
                         source=os.path.relpath(source["path"], ROOT),
                         sms=a.sms, **{f"grid_{t}": None for t in TOKENS}, **{f"waves_{t}": None for t in TOKENS}))
    return rows


# --------------------------------------------------------------------------- the gate and the table

def violations(rows: list[dict]) -> list[str]:
    """What CI refuses: a spill in an sm_90a row (every Triton row is a config the autotuner may
    pick), a GEMM without warpgroup MMA on sm_90a, shared memory above the arch's per-CTA limit."""
    out = []
    for r in rows:
        where = f'{r["backend"]} {r["kernel"]} [{r["config"]}] {r["dtype"]} {r["arch"]}'
        limit = ARCHS[r["arch"]].smem_per_block
        if r["arch"] == "sm_90a" and r["spill_bytes"]:
            out.append(f'spill: {where}: {r["spill_bytes"]} B of local memory per thread, {r["registers"]} registers')
        if r["arch"] == "sm_90a" and r["gemm"] and not r["wgmma"]:
            out.append(f"no wgmma: {where}: a GEMM without warpgroup MMA (wgmma.mma_async)")
        if r["shared_bytes"] > limit:
            out.append(f'shared: {where}: {r["shared_bytes"]} B > {limit} B per CTA')
    return out


COLUMNS = (("backend", "backend"), ("kernel", "kernel"), ("config", "config"), ("dtype", "dtype"),
           ("arch", "arch"), ("registers", "regs"), ("spill_bytes", "spill B"), ("shared_bytes", "smem B"),
           ("threads", "thr"), ("ctas_per_sm", "CTA/SM"), ("wgmma", "wgmma"),
           *((f"waves_{t}", f"waves@{t}") for t in TOKENS))


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return str(value)


def table(rows: list[dict], markdown: bool = False) -> str:
    heads = [h for _, h in COLUMNS]
    lines = [[_cell(r[k]) for k, _ in COLUMNS] for r in rows]
    if markdown:
        out = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(heads)]
    numeric = {i for i, (k, _) in enumerate(COLUMNS) if k not in ("backend", "kernel", "config", "dtype", "arch")}

    def render(cells):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([render(heads).rstrip(), render(["-" * w for w in widths]).rstrip()]
                     + [render(line).rstrip() for line in lines])


def _sort_key(r):
    return (r["backend"], r["arch"] != "sm_90a", r["arch"], r["dtype"], r["kernel"], r["config"])


# --------------------------------------------------------------------------- the command

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/static_report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="PATH", help="write rows, violations, failures and versions here")
    p.add_argument("--subset", action="store_true",
                   help="CI's subset: fuse on the first workload, bf16, 64 and 1024 tokens, contiguous views "
                        "(aligned and not), sm_90a; CUDA files that include torch only from the cache")
    p.add_argument("--arch", nargs="+", choices=sorted(ARCHS), default=None, help="default: sm_90a sm_80")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPE_NAMES), default=None,
                   help="default: bf16 fp16 fp32 (bf16 with --subset)")
    p.add_argument("--workloads", type=int, default=None, metavar="N", help="the first N benchmark workloads")
    p.add_argument("--no-cuda", action="store_true", help="Triton kernels only")
    p.add_argument("--no-triton", action="store_true", help="CUDA kernels only")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--worker", choices=sorted(ARCHS), help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    return p


def plan_of(args) -> dict:
    from ..bench.workloads import WORKLOADS

    base = dict(SUBSET) if args.subset else dict(workloads=len(WORKLOADS), dtypes=tuple(DTYPE_NAMES), tokens=TOKENS,
                                                  layouts=LAYOUTS, variants=VARIANTS, ops=OPS, archs=tuple(ARCHS))
    if args.arch:
        base["archs"] = tuple(args.arch)
    if args.dtype:
        base["dtypes"] = tuple(args.dtype)
    if args.workloads:
        base["workloads"] = args.workloads
    return base


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.worker:
        return _triton_worker(args.worker, json.loads(args.plan), args.json)
    plan = plan_of(args)
    start = time.perf_counter()
    rows, failures, sources = [], [], []
    for arch in plan["archs"]:
        if not args.no_triton:
            t0 = time.perf_counter()
            found = triton_launches(arch, {k: v for k, v in plan.items() if k != "archs"})
            failures += found["failures"]
            rows += triton_rows(arch, found["launches"])
            print(f"triton {arch}: {len(found['launches'])} launches, {len(found['failures'])} failure(s), "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if not args.no_cuda:
            for source in cuda_sources():
                built = cuda_compile(source, arch, compile_missing=not (args.subset and source["uses_torch"]))
                sources.append(dict(source=os.path.relpath(source["path"], ROOT), arch=arch,
                                    status=built["status"], seconds=round(built.get("seconds", 0.0), 1),
                                    reason=built.get("reason")))
                print(f"cuda {arch} {sources[-1]['source']}: {built['status']}"
                      + (f" ({built['reason'].splitlines()[0]})" if built.get("reason") else ""),
                      file=sys.stderr, flush=True)
                if built["status"] == "failed":
                    failures.append(dict(arch=arch, op=sources[-1]["source"], error=built["reason"]))
                elif built["status"] in ("cached", "compiled"):
                    rows += cuda_rows(arch, source, built)
    rows.sort(key=_sort_key)
    bad = violations(rows)
    print(table(rows, markdown=args.markdown))
    print(f"\n{len(rows)} rows; {len(bad)} violation(s); {len(failures)} failure(s); "
          f"{time.perf_counter() - start:.0f} s")
    for line in bad:
        print("VIOLATION " + line)
    for f in failures:
        print(f"FAILED {f.get('arch')} {f.get('op')} {f.get('workload', '')} {f.get('dtype', '')} "
              f"{f.get('tokens', '')}: {str(f.get('error', '')).splitlines()[0] if f.get('error') else ''}")
    if args.json:
        import torch
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        meta = dict(command=" ".join(["static_report.py", *(argv if argv is not None else sys.argv[1:])]),
                    date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    torch=torch.__version__, triton=triton_version, plan=plan, tokens=list(TOKENS),
                    archs={a: dict(sms=ARCHS[a].sms, smem_per_block=ARCHS[a].smem_per_block,
                                   smem_per_sm=ARCHS[a].smem_per_sm, gpu=ARCHS[a].gpu) for a in plan["archs"]},
                    seconds=round(time.perf_counter() - start, 1))
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows, violations=bad, failures=failures, cuda_sources=sources), f,
                      indent=1)
    return 1 if bad or failures else 0


if __name__ == "__main__":
    sys.exit(main())
