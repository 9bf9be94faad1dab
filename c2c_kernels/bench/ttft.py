"""``c2c-bench --ttft`` and ``--decode``: C2C generation with ``transformers`` models end to end.

``--ttft``: time to first token (both prefills, the fusion, the first decode step), fused kernels
against the same pipeline with the reference fuser, and the receiver alone as the floor.
``--decode``: the decode step of ``include_response`` fusion (one new row per request, every
mapped layer, one ``fuse_all``), per batch size; a CUDA-graph replay on a GPU."""
from __future__ import annotations

import json
import sys

import torch


def _hf_bench(flag: str):
    try:
        from ..integrations import hf_bench
        return hf_bench
    except ImportError as e:  # transformers is an optional extra
        print(f"{flag} needs the hf extra (pip install -e '.[hf]'): {e}", file=sys.stderr)
        return None


def _report(key: str, rows: list[dict], header: str, line, json_path: str | None) -> int:
    print(header)
    for r in rows:
        print(line(r, f"{r['vs_reference']:.2f}x" if r.get("vs_reference") else ""))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({key: rows}, f, indent=2, default=str)
        print(f"wrote {json_path}")
    return 0


def run_ttft(workloads: list[str], tokens: list[int], requests: int, device: torch.device, dtype,
             *, repeats: int, tiny: bool, json_path: str | None) -> int:
    hf_bench = _hf_bench("--ttft")
    if hf_bench is None:
        return 2
    rows = []
    for workload in workloads:
        for n in tokens:
            print(f"ttft: {workload}, {requests} x {n} tokens ...", file=sys.stderr, flush=True)
            rows += hf_bench.ttft_rows(workload, batch=requests, prompt_tokens=n, device=device, dtype=dtype,
                                       repeats=repeats, tiny=tiny)
    return _report(
        "ttft", rows,
        f"{'workload':28} {'variant':16} {'batch':>5} {'tokens':>6} {'median_ms':>10} {'peak_MiB':>9} {'vs_ref':>7}",
        lambda r, vs: (f"{r['workload']:28} {r['variant']:16} {r['batch']:>5} {r['prompt_tokens']:>6} "
                       f"{r['median_ms']:>10.1f} {r['peak_mib']:>9.1f} {vs:>7}"), json_path)


def run_decode(workloads: list[str], batches: list[int], device: torch.device, dtype, *,
               repeats: int, tiny: bool = False, json_path: str | None) -> int:
    hf_bench = _hf_bench("--decode")
    if hf_bench is None:
        return 2
    rows = []
    for workload in workloads:
        print(f"decode: {workload}, batches {batches} ...", file=sys.stderr, flush=True)
        rows += hf_bench.decode_rows(workload, batches=tuple(batches), device=device, dtype=dtype,
                                     repeats=repeats, warmup=max(1, repeats // 5),
                                     **(dict(fuser_hidden=32, fuser_intermediate=32) if tiny else {}))
    return _report(
        "decode", rows,
        f"{'workload':28} {'variant':24} {'batch':>5} {'median_us':>10} {'weights_GB/s':>12} {'vs_ref':>7}",
        lambda r, vs: (f"{r['workload']:28} {r['variant']:24} {r['batch']:>5} {r['median_us']:>10.1f} "
                       f"{r.get('weights_gbps', 0):>12.1f} {vs:>7}"), json_path)
