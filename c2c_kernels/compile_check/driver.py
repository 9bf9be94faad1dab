"""The stand-in Triton driver and the CUDA-looking meta tensors (see the package docstring).

The driver stands in for an H200 (sm_90a) by default, or for any GPU of ``occupancy.ARCHS``
(an A100 for sm_80). It reads each compiled kernel's cubin the way the CUDA driver would on
loading it (registers, local memory), so ``n_regs``/``n_spills`` and the recorded launches carry
real figures."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

H200 = dict(capability=(9, 0), max_shared_mem=232448, multiprocessor_count=132, max_num_regs=65536,
            warpSize=32, sm_clock_rate=1980000, mem_clock_rate=2619000, mem_bus_width=6144,
            name="NVIDIA H200 (stand-in)", total_memory=141 * 2**30)
A100 = dict(capability=(8, 0), max_shared_mem=166912, multiprocessor_count=108, max_num_regs=65536,
            warpSize=32, sm_clock_rate=1410000, mem_clock_rate=1593000, mem_bus_width=5120,
            name="NVIDIA A100 (stand-in)", total_memory=80 * 2**30)
GPUS = {"sm_90a": H200, "sm_80": A100}

_FAKE_BASE = 1 << 40  # address of the first stand-in storage; 16-byte aligned, never 0
_STORAGE_SPAN = 1 << 36  # each storage gets its own address range (views of one storage share it)
_bases: dict[int, int] = {}


def _storage_address(meta: torch.Tensor) -> int:
    key = meta.untyped_storage()._cdata
    if key not in _bases:
        _bases[key] = _FAKE_BASE + len(_bases) * _STORAGE_SPAN
    return _bases[key]


@dataclass
class Launch:
    kernel: str
    grid: tuple
    constexprs: dict
    signature: str
    num_warps: int
    num_stages: int
    shared: int  # dynamic shared memory (Triton's metadata.shared)
    registers: int | None = None
    spills: int | None = None  # local memory per thread (stack frame + local), bytes: the spills
    static_shared: int = 0
    gemm: bool | None = None  # the kernel's TTIR holds a tt.dot
    mma: tuple = ()  # matrix instructions of its PTX: "wgmma" (wgmma.mma_async), "mma" (mma.sync)
    hash: str = ""  # Triton's compile hash: one compiled binary


@dataclass
class _Function:
    """What load_binary hands Triton as the kernel's function: the cubin's resources."""
    name: str
    registers: int
    local_bytes: int  # stack frame + local memory per thread
    static_shared: int


def _load(name, cubin) -> _Function:
    from .resources import cubin_resources

    found = cubin_resources(cubin, threads=False)
    r = found.get(name) or next(iter(found.values()), None)
    if r is None:
        raise RuntimeError(f"stand-in driver: cuobjdump found no function in the cubin of {name}")
    return _Function(name, r.registers, r.spill_bytes, r.static_shared)


def _compiled_text(metadata, suffix: str) -> str | None:
    """A file Triton kept for this compiled kernel (its .ptx or .ttir) in its cache."""
    from triton.runtime.cache import get_cache_manager

    try:
        path = get_cache_manager(metadata.hash).get_file(f"{metadata.name}.{suffix}")
    except Exception:  # noqa: BLE001  (a cache without files: report unknown)
        return None
    if not path or not isinstance(path, str):
        return None
    with open(path) as f:
        return f.read()


class _Utils:
    def __init__(self, driver):
        self._driver = driver

    def get_device_properties(self, device):
        return dict(self._driver.gpu)

    def load_binary(self, name, kernel, shared, device):
        # (module, function, registers, spills, max threads per block), as the CUDA driver
        # answers (spills: local bytes / 4); nothing is loaded.
        function = _load(name, kernel)
        return None, function, function.registers, function.local_bytes // 4, 1024

    def unload_module(self, module):
        pass


class _Launcher:
    def __init__(self, driver, src, metadata):
        self._driver, self._src, self._metadata = driver, src, metadata

    def __call__(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata,
                 enter_hook, exit_hook, *args):
        md = self._metadata
        if not hasattr(self, "_code"):  # once per compiled kernel
            ttir, ptx = _compiled_text(md, "ttir"), _compiled_text(md, "ptx")
            self._code = (None if ttir is None else "tt.dot" in ttir,
                          () if ptx is None else tuple(m for m, op in (("wgmma", "wgmma.mma_async"),
                                                                       ("mma", "mma.sync")) if op in ptx))
        f = function if isinstance(function, _Function) else None
        self._driver.launches.append(Launch(
            md.name, (grid_x, grid_y, grid_z), _constexprs(self._src),
            ",".join(str(v) for v in getattr(self._src, "signature", {}).values()),
            md.num_warps, md.num_stages, md.shared,
            registers=f and f.registers, spills=f and f.local_bytes, static_shared=f.static_shared if f else 0,
            gemm=self._code[0], mma=self._code[1], hash=getattr(md, "hash", "")))


def _constexprs(src) -> dict:
    names = getattr(getattr(src, "fn", None), "arg_names", None) or []
    out = {}
    for path, value in getattr(src, "constants", {}).items():
        key = names[path[0]] if isinstance(path, tuple) and len(path) == 1 and path[0] < len(names) else str(path)
        out[key] = value
    return out


class StandInDriver:
    """A Triton driver for a GPU that is not there (an H200 unless told): compiles, never runs."""

    def __init__(self, gpu: dict = H200):
        from triton.backends.compiler import GPUTarget

        self.gpu = dict(gpu)
        major, minor = gpu["capability"]
        self.target = GPUTarget("cuda", 10 * major + minor, 32)
        self.utils = _Utils(self)
        self.launches: list[Launch] = []
        self.benchmarked: list[str] = []  # autotune configs the autotuner would have timed

    # --- what triton.runtime asks of a driver
    def launcher_cls(self, src, metadata):
        return _Launcher(self, src, metadata)

    @staticmethod
    def is_active():
        return False

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cuda", 0)

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=None):
        return self.gpu["capability"]

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)

    def get_benchmarker(self):
        def bench(fn, quantiles=None, **kwargs):
            fn()  # compiles this config (its launch is recorded, not run)
            self.benchmarked.append(self.launches[-1].kernel if self.launches else "?")
            # Every config "takes" the same time: the autotuner keeps the first one.
            return [1.0, 1.0, 1.0] if quantiles else 1.0
        return bench

    def get_empty_cache_for_benchmark(self):
        return torch.empty(0)

    def clear_cache(self, cache):
        pass


class _StandInCuda(torch.Tensor):
    """A meta tensor that says it lives on cuda:0 and has an aligned data pointer."""

    @staticmethod
    def __new__(cls, meta: torch.Tensor):
        r = torch.Tensor._make_wrapper_subclass(
            cls, meta.shape, strides=meta.stride(), storage_offset=meta.storage_offset(), dtype=meta.dtype,
            device=torch.device("cuda", 0), requires_grad=False)
        r._meta = meta
        return r

    def data_ptr(self):
        return _storage_address(self._meta) + self._meta.storage_offset() * self._meta.element_size()

    def __repr__(self):
        return f"StandInCuda({list(self.shape)}, {self.dtype})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func.namespace == "c2c":
            # The package's own ops run their real host code on the stand-ins (their meta
            # kernel would only check shapes).
            keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
            with _FactoryMode():  # modes are popped while an op dispatches: push it again
                return func.redispatch(keys, *args, **(kwargs or {}))
        args, kwargs = tree_map(_to_meta, (args, kwargs or {}))
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            raise RuntimeError(f"the stand-in GPU has no data: {func} needs a value (a host sync)")
        return tree_map(_from_meta, func(*args, **kwargs))


def _to_meta(x):
    if isinstance(x, _StandInCuda):
        return x._meta
    if isinstance(x, torch.device) and x.type == "cuda":
        return torch.device("meta")
    return x


def _from_meta(x):
    return _StandInCuda(x) if isinstance(x, torch.Tensor) and x.device.type == "meta" else x


def _is_cuda(device) -> bool:
    return (isinstance(device, torch.device) and device.type == "cuda") or (
        isinstance(device, str) and device.startswith("cuda"))


class _FactoryMode(TorchFunctionMode):
    """``torch.empty(..., device="cuda")`` and friends make stand-in tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "pin_memory":  # host staging buffers: no driver to pin with
            return args[0]
        if _is_cuda(kwargs.get("device")):
            kwargs = dict(kwargs, device="meta")
            return tree_map(_from_meta, func(*args, **kwargs))
        if func in (torch.Tensor.to, torch.Tensor.cuda) and (
                func is torch.Tensor.cuda or any(_is_cuda(a) for a in args[1:]) or _is_cuda(kwargs.get("device"))):
            t = args[0]
            if isinstance(t, _StandInCuda):
                return t
            dtype = next((a for a in args[1:] if isinstance(a, torch.dtype)), kwargs.get("dtype", t.dtype))
            return _StandInCuda(torch.empty_strided(t.shape, t.stride(), dtype=dtype, device="meta"))
        if getattr(func, "__name__", "") not in _OWN and _has_stand_in((args, kwargs)) and not _is_c2c(func):
            # Tensor methods (indexing, views) on the meta tensors: torch's C++ indexing would
            # otherwise open a CUDA device guard.
            with torch._C.DisableTorchFunction():
                return tree_map(_from_meta, func(*tree_map(_to_meta, args), **tree_map(_to_meta, kwargs)))
        return func(*args, **kwargs)


# What a stand-in answers itself (where its meta tensor would say "meta" or 0).
_OWN = {"data_ptr", "device", "is_cuda", "is_meta", "get_device", "__repr__", "__format__", "__get__",
        "untyped_storage"}


def _has_stand_in(tree) -> bool:
    found = []
    tree_map(lambda x: found.append(x) if isinstance(x, _StandInCuda) else None, tree)
    return bool(found)


def _is_c2c(func) -> bool:
    name = getattr(func, "_qualified_op_name", None) or getattr(func, "namespace", None) or ""
    return name == "c2c" or name.startswith("c2c::")


def stand_in_tensor(shape, dtype=torch.float32, stride=None) -> torch.Tensor:
    meta = (torch.empty(shape, dtype=dtype, device="meta") if stride is None
            else torch.empty_strided(shape, stride, dtype=dtype, device="meta"))
    return _StandInCuda(meta)


def stand_in_h200():
    """Within: Triton compiles for the stand-in H200 and records launches; ``device="cuda"``
    tensors are stand-ins; torch.cuda reports one H200. Yields the driver."""
    return stand_in_gpu(H200)


@contextlib.contextmanager
def stand_in_gpu(gpu: dict = H200):
    """:func:`stand_in_h200` for any GPU of ``GPUS`` (``gpu`` is one of its dicts). One GPU per
    process: a Triton function keeps the target it was first compiled for."""
    from unittest import mock

    from triton.runtime.driver import driver as config

    driver = StandInDriver(gpu)
    major, minor = gpu["capability"]
    props = type("Props", (), dict(multi_processor_count=gpu["multiprocessor_count"], major=major, minor=minor,
                                   name=gpu["name"], total_memory=gpu["total_memory"],
                                   shared_memory_per_block_optin=gpu["max_shared_mem"]))()
    previous = config._active
    config.set_active(driver)
    try:
        with contextlib.ExitStack() as stack:
            for name, value in (("is_available", lambda: True), ("device_count", lambda: 1),
                                ("current_device", lambda: 0), ("is_current_stream_capturing", lambda: False),
                                ("get_device_properties", lambda device=None: props),
                                ("get_device_capability", lambda device=None: gpu["capability"])):
                stack.enter_context(mock.patch.object(torch.cuda, name, value))
            stack.enter_context(_FactoryMode())
            yield driver
    finally:
        config._active = previous


def as_stand_in(t: torch.Tensor) -> torch.Tensor:
    """A stand-in with ``t``'s shape, strides, storage offset and dtype (no data)."""
    meta = torch.empty(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype, device="meta")
    return _StandInCuda(meta.as_strided(t.shape, t.stride(), t.storage_offset()))
