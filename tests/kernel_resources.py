"""Registers, shared memory and local memory (spills) of compiled GPU kernels, read with
``cuobjdump --dump-resource-usage``, checked against the limits of the GPUs pyvae targets.

    python tests/kernel_resources.py [FILE...]

With no FILE it reads the CUDA kernels of this install's build: ``pyvae._C`` itself when it was
built with CUDA, else the objects of the build's compile-only CUDA check (build/cmake-*/, see
CMakeLists.txt). Prints one line per kernel and architecture; exits 1 if a kernel is above a
limit. tests/triton_gpu_compile.py checks the Triton kernels with the same functions.

Register spills show as stack and local memory (``STACK`` / ``LOCAL``; so does an array indexed
at run time, which ``nvcc -Xptxas -v`` tells apart): a kernel using any is listed, not failed (slow,
not wrong). cuobjdump comes from the CUDA toolkit, or else the copy Triton ships. Shared memory is
what the binary declares (sm_90 builds count the 1 KiB the runtime reserves per block) plus, for
Triton, the dynamic shared memory it requests at launch.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

KIB = 1024


@dataclass(frozen=True)
class Limits:
    shared: int                    # bytes of shared memory one block may use (static + dynamic, opted in)
    registers: int = 255           # per thread
    register_file: int = 64 * KIB  # 32-bit registers per block (threads x registers)


# Per-block limits by compute capability (CUDA programming guide, "Technical Specifications").
LIMITS = {80: Limits(shared=163 * KIB), 90: Limits(shared=227 * KIB)}


@dataclass(frozen=True)
class Usage:
    arch: int       # compute capability, e.g. 90 (sm_90a gives 90)
    kernel: str     # the (mangled) function name
    registers: int  # per thread
    shared: int     # bytes per block
    stack: int      # bytes per thread of stack frame (spills, local arrays)
    local: int      # bytes per thread of local memory

    def problems(self, threads: int | None = None) -> list[str]:
        """Why this kernel cannot launch on its architecture (``threads`` per block, when known)."""
        limits = LIMITS[self.arch]
        found = []
        if self.shared > limits.shared:
            found.append(f"shared {self.shared} B > {limits.shared} B")
        if self.registers > limits.registers:
            found.append(f"{self.registers} registers per thread > {limits.registers}")
        if threads is not None and self.registers * threads > limits.register_file:
            found.append(f"{self.registers} registers x {threads} threads > {limits.register_file} per block")
        return found

    def describe(self) -> str:
        local = f"  LOCAL MEMORY: stack {self.stack} B, local {self.local} B" if self.uses_local_memory else ""
        return f"sm_{self.arch} {self.registers:3d} regs {self.shared / KIB:7.1f} KiB shared{local}"

    @property
    def uses_local_memory(self) -> bool:
        """Register spills, or an array indexed at run time (``ptxas -v`` tells which)."""
        return bool(self.stack or self.local)


def cuobjdump() -> str:
    """The cuobjdump of the CUDA toolkit, else Triton's copy; RuntimeError if there is neither."""
    found = shutil.which("cuobjdump") or (os.path.exists("/usr/local/cuda/bin/cuobjdump") and "/usr/local/cuda/bin/cuobjdump")
    if not found:
        try:
            from triton import knobs
            found = knobs.nvidia.cuobjdump.path
        except Exception:  # no Triton, or one without an NVIDIA backend
            found = None
    if not found:
        raise RuntimeError("cuobjdump not found (neither the CUDA toolkit's nor Triton's)")
    return found


_ARCH = re.compile(r"^arch = sm_(\d+)")
_FUNCTION = re.compile(r"^\s*Function (\S+):$")
_FIELDS = re.compile(r"(\w+)(?:\[\d+\])?:(\d+)")


def parse(text: str, arch: int | None = None) -> list[Usage]:
    """The kernels in ``cuobjdump --dump-resource-usage`` output. A fat binary names each ELF's
    architecture (``arch = sm_90a``); a bare cubin does not, and then ``arch`` is given."""
    usages, kernel = [], None
    for line in text.splitlines():
        if m := _ARCH.match(line):
            arch = int(m.group(1))
        elif m := _FUNCTION.match(line):
            kernel = m.group(1)
        elif kernel is not None and "REG:" in line:
            fields = {k: int(v) for k, v in _FIELDS.findall(line)}
            if arch is None:
                raise ValueError(f"no architecture for {kernel}: pass arch for a bare cubin")
            usages.append(Usage(arch, kernel, fields["REG"], fields["SHARED"], fields["STACK"], fields["LOCAL"]))
            kernel = None
    return usages


def resource_usage(path: str, arch: int | None = None) -> list[Usage]:
    """Every kernel's usage in a binary (a cubin, an object file or a shared library with a fat binary)."""
    done = subprocess.run([cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"cuobjdump failed on {path}: {done.stderr.strip()}")
    return parse(done.stdout, arch)


def short_names(names: list[str]) -> dict[str, str]:
    """Mangled kernel name -> a readable one (``likelihood_kernel<(Loss)2, 16>``: demangled by
    c++filt where there is one, without return type, namespaces and parameter list)."""
    demangled = list(names)
    if shutil.which("c++filt") and names:
        done = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
        if done.returncode == 0 and len(done.stdout.splitlines()) == len(names):
            demangled = done.stdout.splitlines()
    readable = {}
    for name, plain in zip(names, demangled):
        plain = re.sub(r"^void ", "", plain).replace("pyvae::cuda::(anonymous namespace)::", "").replace("pyvae::", "")
        readable[name] = re.sub(r"\((?:[^()]|\([^()]*\))*\)$", "", plain)
    return readable


def build_binaries() -> list[str]:
    """The files holding this install's CUDA kernels (see the module docstring); [] if none."""
    try:
        import pyvae._C as ext
    except ImportError:
        ext = None
    if ext is not None and ext.has_cuda:
        return [ext.__file__]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    objects = glob.glob(os.path.join(root, "build", "cmake-*", "CMakeFiles", "pyvae_cuda_check.dir", "**", "*.o"),
                        recursive=True)
    newest = max((os.path.dirname(o) for o in objects), key=os.path.getmtime, default=None)
    return sorted(o for o in objects if os.path.dirname(o) == newest)


def report(usages: list[Usage], threads: int | None = None, label: str = "") -> int:
    """Prints one line per kernel (FAIL where it is above a limit), named ``label`` or by its
    readable name; returns the number above a limit."""
    names = short_names([u.kernel for u in usages]) if not label else {}
    failed = 0
    for u in usages:
        problems = u.problems(threads)
        failed += bool(problems)
        print(f"{'FAIL' if problems else 'ok  '} {u.describe()}  {label or names[u.kernel]}"
              + (f"  <- {'; '.join(problems)}" if problems else ""))
    return failed


def main(argv: list[str]) -> int:
    files = argv or build_binaries()
    if not files:
        print("no CUDA kernels built here (build with nvcc on PATH; see CMakeLists.txt)")
        return 1
    failed = total = 0
    local = set()
    for path in files:
        usages = resource_usage(path)
        print(f"{path}:")
        failed += report(usages)
        total += len(usages)
        local |= {u.kernel for u in usages if u.uses_local_memory}
    print(f"{total} CUDA kernel builds, {len(local)} kernels using local memory (spills or run-time-indexed "
          f"arrays), {failed} above a limit")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
