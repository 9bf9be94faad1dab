"""``c2c-bench --ttft``: end-to-end time to first token of C2C generation with ``transformers``
models (both prefills, the fusion, the first decode step), fused kernels against the same
pipeline with the reference fuser, and the receiver alone as the floor."""
from __future__ import annotations

import json
import sys

import torch


def run_ttft(workloads: list[str], tokens: list[int], requests: int, device: torch.device, dtype,
             *, repeats: int, tiny: bool, json_path: str | None) -> int:
    try:
        from ..integrations import hf_bench
    except ImportError as e:  # transformers is an optional extra
        print(f"--ttft needs the hf extra (pip install -e '.[hf]'): {e}", file=sys.stderr)
        return 2
    rows = []
    for workload in workloads:
        for n in tokens:
            print(f"ttft: {workload}, {requests} x {n} tokens ...", file=sys.stderr, flush=True)
            rows += hf_bench.ttft_rows(workload, batch=requests, prompt_tokens=n, device=device, dtype=dtype,
                                       repeats=repeats, tiny=tiny)
    header = f"{'workload':28} {'variant':16} {'batch':>5} {'tokens':>6} {'median_ms':>10} {'peak_MiB':>9} {'vs_ref':>7}"
    print(header)
    for r in rows:
        vs = f"{r['vs_reference']:.2f}x" if r.get("vs_reference") else ""
        print(f"{r['workload']:28} {r['variant']:16} {r['batch']:>5} {r['prompt_tokens']:>6} "
              f"{r['median_ms']:>10.1f} {r['peak_mib']:>9.1f} {vs:>7}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"ttft": rows}, f, indent=2, default=str)
        print(f"wrote {json_path}")
    return 0
