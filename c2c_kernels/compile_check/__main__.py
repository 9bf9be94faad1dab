"""``python -m c2c_kernels.compile_check [--only training|fuse] [--quick] [--json OUT]``: compile every Triton
kernel of the package for a stand-in H200 through the package's host code; print one line per
launched (kernel, constexprs) and the totals. Exit status 1 when anything fails to compile."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

from ..backends.triton import interpreting

if interpreting():
    sys.exit("compile_check: unset TRITON_INTERPRET (the interpreter compiles nothing)")

from .driver import stand_in_h200, stand_in_tensor  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def training_calls():
    """Each training kernel at a realistic width, in every gradient dtype."""
    from c2c_kernels.training import kernels as k

    t, width, heads, hidden = 1024, 1024, 8, 2048
    for dt in DTYPES:
        h = stand_in_tensor((t, hidden), dt)
        yield f"gelu {dt}", lambda h=h: k.gelu(h)
        yield f"gelu_backward {dt}", lambda h=h: k.gelu_backward(h, stand_in_tensor((t, hidden), dt))
        y = stand_in_tensor((t, width), dt)
        keep = stand_in_tensor((t, width), torch.uint8)
        yield f"dropout_add {dt}", lambda y=y, keep=keep: k.dropout_add(stand_in_tensor((t, width), dt), y, keep, 0.1)
        yield f"dropout_grad {dt}", lambda dt=dt, keep=keep: k.dropout_grad(
            stand_in_tensor((t, width), torch.float32), keep, 0.1, dt)
        logits = stand_in_tensor((t, heads), torch.float32)
        gate = stand_in_tensor((t, heads), torch.float32)
        yield f"gated_merge {dt}", lambda dt=dt: k.gated_merge(
            stand_in_tensor((t, width), dt), stand_in_tensor((t, width), dt), logits, gate, stand_in_tensor((t, width), dt))
        yield f"gated_merge_backward {dt}", lambda dt=dt: k.gated_merge_backward(
            stand_in_tensor((t, width), dt), stand_in_tensor((t, width), dt), logits, gate, dt)
        yield f"rms_norm {dt}", lambda dt=dt: k.rms_norm(stand_in_tensor((t, width), dt), stand_in_tensor((width,), dt))
        yield f"rms_norm_backward {dt}", lambda dt=dt: k.rms_norm_backward(
            stand_in_tensor((t, width), dt), stand_in_tensor((t, width), dt), stand_in_tensor((width,), dt),
            stand_in_tensor((t, width), torch.float32))


# (label, make_case arguments): the test suite's size, and the first benchmark workload
# (qwen3-0.6b + qwen2.5-0.5b: receiver 8x128, sharer 2x64, fuser 1024 wide) at three token counts.
FUSE_SIZES = [("test", {}, DTYPES)] + [
    (f"bench-{tokens}", dict(receiver_heads=8, receiver_dim=128, sharer_heads=2, sharer_dim=64, hidden=1024,
                             intermediate=1024, seq_lens=(tokens,), page_size=16, padding=0),
     (torch.bfloat16, torch.float16)) for tokens in (64, 1024, 16384)]


def fuse_calls(sizes=None):
    """fuse, project and merge of the Triton backend through the op layer (c2c::fuse etc.)."""
    from torch.utils._pytree import tree_map

    import c2c_kernels  # noqa: F401  (registers torch.ops.c2c)
    from c2c_kernels.testing import make_case

    from .driver import as_stand_in

    for label, kwargs, dtypes in FUSE_SIZES if sizes is None else sizes:
        for dt in dtypes:
            case = make_case(dtype=dt, seed=1, **kwargs)
            args = tree_map(lambda x: as_stand_in(x) if isinstance(x, torch.Tensor) else x, list(case.args()))
            yield f"fuse {label} {dt}", lambda args=args: torch.ops.c2c.fuse(*args, "triton", False)

            def project_merge(args=args):
                projection, head_scale = torch.ops.c2c.project(*args, "triton", False)
                torch.ops.c2c.merge(args[0], args[2], list(projection.unbind(0)), list(head_scale.unbind(0)),
                                    "triton", False)
            yield f"project+merge {label} {dt}", project_merge


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m c2c_kernels.compile_check")
    parser.add_argument("--only", choices=("training", "fuse"), default=None)
    parser.add_argument("--quick", action="store_true", help="fuse/project/merge at the test size only")
    parser.add_argument("--json", default=None, help="write the launches and failures here")
    args = parser.parse_args(argv)
    groups = [("training", training_calls),
              ("fuse", lambda: fuse_calls(FUSE_SIZES[:1] if args.quick else None))]
    failures, rows = [], []
    start = time.perf_counter()
    with stand_in_h200() as driver:
        for group, calls in groups:
            if args.only and group != args.only:
                continue
            for name, call in calls():
                before, t0 = len(driver.launches), time.perf_counter()
                try:
                    call()
                except Exception as exc:  # report every failure, not only the first
                    failures.append((name, f"{type(exc).__name__}: {exc}"))
                    print(f"FAIL {name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                    if os.environ.get("C2C_COMPILE_CHECK_TRACE") == "1":
                        traceback.print_exc()
                    continue
                seconds = time.perf_counter() - t0
                for launch in driver.launches[before:]:
                    rows.append(dict(call=name, kernel=launch.kernel, grid=list(launch.grid),
                                     num_warps=launch.num_warps, num_stages=launch.num_stages,
                                     shared=launch.shared, signature=launch.signature,
                                     constexprs={k: str(v) for k, v in launch.constexprs.items()},
                                     registers=launch.registers, spills=launch.spills, mma=list(launch.mma)))
                print(f"ok   {name}: {len(driver.launches) - before} launch(es), {seconds:.2f} s")
    kernels = {(r["kernel"], r["signature"], json.dumps(r["constexprs"], sort_keys=True), r["num_warps"], r["num_stages"])
               for r in rows}
    total = time.perf_counter() - start
    print(f"compiled {len(kernels)} distinct specialisations (kernel, signature, constexprs, warps, stages) for sm_90a; "
          f"{len(rows)} launches, {len(driver.benchmarked)} autotune trials, {len(failures)} failure(s), {total:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, failures=failures, autotune_trials=driver.benchmarked, seconds=total), f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
