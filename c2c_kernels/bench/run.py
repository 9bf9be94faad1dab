"""The benchmark loop: for every workload x dtype x token count, check each contender against
the reference, time the ones that ran, and turn each timing into a row (throughput, fraction
of the roofline bound, speedup over eager)."""
from __future__ import annotations

import traceback
from dataclasses import dataclass

import torch

from . import runners
from .peaks import dtype_name
from .progress import progress
from .report import roofline_ms
from .timing import Timing, time_gpu, time_interleaved
from .workloads import Workload, build_inputs


@dataclass
class Plan:
    workloads: list[Workload]
    layers: list[int]  # per workload
    tokens: list[int]
    requests: int
    dtypes: list[torch.dtype]
    layout: str
    device: torch.device
    contenders: list[str]
    check: bool = True
    min_time_s: float = 0.5
    seed: int = 0
    show_progress: bool = True
    debug: bool = False


def _error(e: BaseException, debug: bool) -> str:
    return traceback.format_exc() if debug else f"{type(e).__name__}: {e}".strip()


def _row(inputs, name: str) -> dict:
    return {"workload": inputs.workload.name, "backend": name, "device": inputs.device.type,
            "dtype": dtype_name(inputs.dtype), "layout": inputs.layout, "layers": inputs.layers,
            "fusers": inputs.fusers, "requests": inputs.requests, "tokens": inputs.tokens,
            "total_tokens": inputs.total_tokens, "median_ms": None, "spread_ms": None, "min_ms": None,
            "samples": 0, "first_call_ms": None, "tflops": None, "gbs": None, "peak_fraction": None,
            "roofline_ms": None, "speedup": None, "correct": None, "max_abs_err": None,
            "flops": inputs.flops(), "bytes": inputs.bytes(), "weight_bytes": inputs.weight_bytes(),
            "error": None}


def _check(inputs, name: str, expected, plan: Plan) -> dict:
    """The contender's first call, on a clean copy, compared with the reference."""
    row = _row(inputs, name)
    try:
        got, first_s = runners.fused_rows(name, inputs)
    except Exception as e:  # a broken backend is a row with its error, not the end of the run
        row["error"] = _error(e, plan.debug)
        return row
    row["first_call_ms"] = first_s * 1e3
    if expected is not None:
        check = runners.compare(got, expected, inputs.dtype)
        row["correct"], row["max_abs_err"] = check.correct, check.max_abs_err
    return row


def _time(inputs, rows: list[dict], plan: Plan, peaks: dict, done=lambda row: None) -> None:
    """Time every contender that ran: one after the other with do_bench on a GPU (the device is
    the run's own), interleaved rounds of wall clock on a CPU (other processes share it).
    ``done(row)`` as soon as a row is final: on a GPU after each contender's timing."""
    calls, timings, errors = {}, {}, {}
    for row in rows:
        if row["error"] is not None:
            continue
        name = row["backend"]
        try:
            calls[name] = runners.make_call(name, inputs)
            if inputs.device.type == "cpu" and row["first_call_ms"] < 1e3:
                calls[name]()  # warm-up; a call that took over a second was warm-up enough
        except Exception as e:  # noqa: BLE001  (reported in the row)
            calls.pop(name, None)
            errors[name] = _error(e, plan.debug)
    by_name = {row["backend"]: row for row in rows}

    def finish(name: str) -> None:
        row = by_name[name]
        if name in errors:
            row["error"] = errors[name]
        elif name in timings:
            _fill(row, timings[name], peaks)
        done(row)

    for name in errors:  # failed before timing: final now
        finish(name)
    if _one_after_another(inputs):
        for name, call in calls.items():
            try:
                timings[name] = time_gpu(call, rep_ms=max(100.0, 1e3 * plan.min_time_s))
            except Exception as e:  # noqa: BLE001  (reported in the row)
                errors[name] = _error(e, plan.debug)
            finish(name)
    else:  # interleaved rounds: every contender's timing ends at once
        timings, failed = time_interleaved(calls, min_time_s=plan.min_time_s)
        errors.update(failed)
        for name in calls:
            finish(name)


def _one_after_another(inputs) -> bool:
    """GPU contenders are timed one after the other (each row final when its timing ends)."""
    return inputs.device.type == "cuda"


def _fill(row: dict, timing: Timing, peaks: dict) -> None:
    seconds = timing.median_ms / 1e3
    row.update(median_ms=timing.median_ms, spread_ms=timing.spread_ms, min_ms=timing.min_ms,
               samples=timing.samples, tflops=row["flops"] / seconds / 1e12, gbs=row["bytes"] / seconds / 1e9)
    peak = peaks["matmul_tflops"].get(row["dtype"])
    if peak:
        row["roofline_ms"] = roofline_ms(row["flops"], row["bytes"], peak, peaks["copy_gbs"])
        row["peak_fraction"] = row["roofline_ms"] / timing.median_ms


def _speedups(rows: list[dict]) -> None:
    eager = {_config(r): r["median_ms"] for r in rows if r["backend"] == runners.EAGER and r["median_ms"]}
    for r in rows:
        base = eager.get(_config(r))
        if base and r["median_ms"]:
            r["speedup"] = base / r["median_ms"]


def _config(r: dict):
    return (r["workload"], r["dtype"], r["layout"], r["layers"], r["requests"], r["tokens"])


def run(plan: Plan, peaks: dict, on_rows=None) -> list[dict]:
    """Every row of the plan; ``on_rows(rows)`` with every final row so far, as soon as each one
    is final (a run stopped in the middle of a token count keeps the contenders it timed)."""
    configs = [(w, layers, dtype, tokens) for w, layers in zip(plan.workloads, plan.layers)
               for dtype in plan.dtypes for tokens in plan.tokens]
    bar = progress(len(configs) * (len(plan.contenders) + plan.check + 1), plan.show_progress)
    rows = []
    try:
        for workload, layers, dtype, tokens in configs:
            label = f"{workload.name} {dtype_name(dtype)} {plan.requests}x{tokens}"
            bar.set_description(f"{label}: building inputs")
            inputs = build_inputs(workload, layers=layers, tokens=tokens, requests=plan.requests, dtype=dtype,
                                  layout=plan.layout, device=plan.device, seed=plan.seed)
            expected = None
            if plan.check:
                bar.set_description(f"{label}: reference")
                expected, _ = runners.fused_rows("reference", inputs)
                bar.update()
            group, finished = [], set()

            def done(row, group=group, finished=finished):
                finished.add(id(row))
                if on_rows:
                    partial = rows + [r for r in group if id(r) in finished]  # in plan order
                    _speedups(partial)
                    on_rows(partial)

            for name in plan.contenders:
                bar.set_description(f"{label}: checking {name}")
                group.append(_check(inputs, name, expected, plan))
                bar.update()
            del expected
            for row in group:
                if row["error"] is not None:  # raised in its check: final now
                    done(row)
            bar.set_description(f"{label}: timing")
            _time(inputs, group, plan, peaks, done)
            bar.update()
            rows += group
            _speedups(rows)
            del inputs, group
    finally:
        bar.close()
    return rows
