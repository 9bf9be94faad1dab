"""What a compiled kernel uses, read from its cubin or from ptxas: registers, local memory
(spills), static shared memory, threads per CTA (from ``__launch_bounds__``) and which matrix
instructions its SASS holds. The tools come with the triton wheel (``cuobjdump``) or the CUDA
toolkit; nothing needs a GPU."""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass


@dataclass
class Resources:
    registers: int
    local_bytes: int  # per thread: LOCAL (local arrays)
    static_shared: int
    max_threads: int | None = None  # __launch_bounds__, when the kernel declares it
    stack_bytes: int = 0  # per thread: the stack frame, where ptxas puts spilled registers

    @property
    def spill_bytes(self) -> int:
        """Local memory per thread (stack frame + local arrays): what the CUDA driver reports as
        the kernel's local size, and for kernels without calls or local arrays (Triton's) the
        registers ptxas spilled."""
        return self.stack_bytes + self.local_bytes


@functools.lru_cache(maxsize=None)
def tool(name: str) -> str | None:
    """``cuobjdump``/``nvdisasm``/``ptxas``: the triton wheel's, else the CUDA toolkit's, else PATH."""
    candidates = []
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    except ImportError:
        pass
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            candidates.append(os.path.join(root, "bin", name))
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return shutil.which(name)


def _cuobjdump(args: list[str], cubin: str) -> str:
    exe = tool("cuobjdump")
    if exe is None:
        raise RuntimeError("cuobjdump not found (neither in the triton wheel nor in CUDA_HOME/bin nor on PATH)")
    return subprocess.run([exe, *args, cubin], check=True, capture_output=True, text=True).stdout


_FUNCTION = re.compile(r"^\s*Function (\S+?):\s*$")
_FIELD = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")


def parse_resource_usage(text: str) -> dict[str, Resources]:
    """``cuobjdump --dump-resource-usage`` output, per function."""
    out, name = {}, None
    for line in text.splitlines():
        m = _FUNCTION.match(line)
        if m:
            name = m.group(1)
            continue
        if name is not None and "REG:" in line:
            f = {k: int(v) for k, v in _FIELD.findall(line)}
            out[name] = Resources(f.get("REG", 0), f.get("LOCAL", 0), f.get("SHARED", 0),
                                  stack_bytes=f.get("STACK", 0))
            name = None
    return out


def parse_max_threads(elf: str) -> dict[str, int]:
    """EIATTR_MAX_THREADS (``__launch_bounds__``) per function, from ``cuobjdump -elf``."""
    out, name, pending = {}, None, False
    for line in elf.splitlines():
        if line.startswith(".nv.info."):
            name, pending = line[len(".nv.info."):].strip(), False
        elif name and "EIATTR_MAX_THREADS" in line:
            pending = True
        elif pending and "Value:" in line:
            dims = [int(v, 16) for v in re.findall(r"0x[0-9a-fA-F]+", line)]
            if dims:
                out[name] = functools.reduce(lambda a, b: a * b, dims, 1)
            pending = False
    return out


def parse_sass_mma(sass: str) -> dict[str, set[str]]:
    """The matrix instructions per function of a SASS listing: ``HGMMA`` (warpgroup MMA, Hopper's
    wgmma), ``HMMA``/``IMMA`` (warp-level mma.sync)."""
    out, name = {}, None
    for line in sass.splitlines():
        m = re.match(r"^\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            out[name] = set()
        elif name is not None:
            for op in ("HGMMA", "HMMA", "IMMA"):
                if re.search(rf"\b{op}\.", line):
                    out[name].add(op)
    return out


def cubin_resources(cubin: bytes | str, *, threads=True) -> dict[str, Resources]:
    """Per function of a cubin (its bytes or its path)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = cubin
        if isinstance(cubin, (bytes, bytearray)):
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as f:
                f.write(cubin)
        found = parse_resource_usage(_cuobjdump(["--dump-resource-usage"], path))
        if threads:
            for name, count in parse_max_threads(_cuobjdump(["-elf"], path)).items():
                if name in found:
                    found[name].max_threads = count
    return found


def cubin_mma(path: str) -> dict[str, set[str]]:
    return parse_sass_mma(_cuobjdump(["-sass"], path))


# ptxas -v (nvcc -Xptxas -v): "Function properties for NAME" / "N bytes stack frame, N bytes
# spill stores, N bytes spill loads" / "Used N registers, ... N bytes smem ...".
_PROPS = re.compile(r"Function properties for (\S+)")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_COMPILING = re.compile(r"Compiling entry function '(\S+)' for '(\S+)'")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(text: str) -> dict[str, dict]:
    """Per entry function: registers, spill_stores, spill_loads, stack, smem (bytes)."""
    out: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        m = _COMPILING.search(line) or _PROPS.search(line)
        if m:
            current = out.setdefault(m.group(1), {})
            continue
        if current is None:
            continue
        m = _SPILL.search(line)
        if m:
            current.update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        m = _USED.search(line)
        if m:
            current["registers"] = int(m[1])
            s = _SMEM.search(line)
            current["smem"] = int(s[1]) if s else 0
    return {k: v for k, v in out.items() if "registers" in v}


def demangle(names: list[str]) -> dict[str, str]:
    """Itanium-demangled names (c++filt); without it, or when it fails, the names as they are."""
    exe = shutil.which("c++filt")
    if not exe or not names:
        return {n: n for n in names}
    proc = subprocess.run([exe], input="\n".join(names) + "\n", capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    if proc.returncode != 0 or len(lines) != len(names):
        return {n: n for n in names}
    return dict(zip(names, lines))


def split_kernel_name(demangled: str) -> tuple[str, str]:
    """``void ns::(anonymous namespace)::k<float, int>(Params<float>)`` -> (``k``, ``<float, int>``)."""
    text = demangled.strip()
    if text.startswith("void "):
        text = text[5:]
    depth, cut = 0, len(text)
    for i, ch in enumerate(text):  # the argument list starts at the first '(' outside <...>
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not text[i:].startswith("(anonymous namespace)"):
            cut = i
            break
    text = text[:cut]
    depth, start = 0, None
    for i, ch in enumerate(text):
        if ch == "<":
            if depth == 0:
                start = i
            depth += 1
        elif ch == ">":
            depth -= 1
    name, args = (text[:start], text[start:]) if start is not None else (text, "")
    return name.split("::")[-1], args
