"""Runs a TVM artifact: the compiled Relax VM plus its weights, kept in their storage dtype on CPU."""
from __future__ import annotations

import os
import sys
import threading
import weakref

import numpy as np
from typing_extensions import override

from toolkit.artifact import Manifest
from toolkit.backends import ArtifactBackend, Shared, load_shared
from toolkit.errors import ToolkitError
from toolkit.host import isa_flags, missing_tvm_extension
from toolkit.memory import return_freed_memory
from toolkit.tvm_amx import request_tiles

_importing = threading.Lock()
RUNTIME_LIB = "TVM_USE_RUNTIME_LIB"  # TVM's switch: "1" loads libtvm_runtime alone, without the compiler library


def import_tvm(compiler: bool = False):
    """`tvm`, imported once per process as lean as its first user allows.

    - Without PyTorch where nothing has imported it yet: `tvm_ffi` imports torch whenever it is installed, for tensor
      exchange that a runtime passing numpy arrays never uses (200 MB resident). torch stays importable afterwards.
    - Without TVM's compiler library unless `compiler` is asked for (110 MB resident, LLVM included), or the user set
      TVM_USE_RUNTIME_LIB themselves. Running an artifact needs only the runtime; the library TVM loads is fixed for
      the process, so a process that ran an artifact first cannot compile afterwards (refused with the fix)."""
    with _importing:
        if "tvm" not in sys.modules:
            hide_torch = "tvm_ffi" not in sys.modules and "torch" not in sys.modules
            runtime_only = not compiler and RUNTIME_LIB not in os.environ
            if hide_torch:
                sys.modules["torch"] = None  # `import torch` raises ImportError, which tvm_ffi takes as "not installed"
            if runtime_only:
                os.environ[RUNTIME_LIB] = "1"
            try:
                import tvm
            finally:
                if hide_torch:
                    del sys.modules["torch"]
                if runtime_only:
                    del os.environ[RUNTIME_LIB]  # read once at import; child processes choose for themselves
    import tvm
    if compiler and tvm.base._RUNTIME_ONLY:
        raise ToolkitError("this process loaded TVM's runtime library alone, to run artifacts; compiling (or checking "
                           "the CPU of an artifact built where the CPU's flags could not be read) takes the compiler "
                           f"library: do it in a new process, or set {RUNTIME_LIB}=0 in the environment of a process "
                           "that both runs artifacts and compiles")
    return tvm


def check_host(manifest: Manifest) -> None:
    """An llvm artifact is built for one CPU, a bf16 or int8 one also for an instruction set extension; refuse to run
    it where its instructions may be missing (the process would die of SIGILL, with no message). The artifact records
    its build CPU's extensions and this host must have them all; an artifact built where they could not be read, or a
    host whose flags cannot be read, is held to LLVM's name for the CPU instead (which takes TVM's compiler library)."""
    target = manifest.target
    if (target.tvm_target or {}).get("kind") != "llvm":
        return
    if host_check_needs_compiler(manifest):
        from tvm.target import codegen

        host = codegen.llvm_get_system_cpu()
        if target.tvm_target.get("mcpu") not in (None, host):
            raise ToolkitError(f"this TVM artifact was compiled for CPU {target.tvm_target['mcpu']!r}, this host is "
                               f"{host!r}; recompile it here with `toolkit compile ... --backend tvm`")
    elif missing := sorted(set(target.cpu_flags) - set(isa_flags())):
        raise ToolkitError(f"this TVM artifact was compiled on a CPU ({target.tvm_target.get('mcpu')}) with "
                           f"{', '.join(missing)}, which this one lacks (see /proc/cpuinfo); recompile it here with "
                           "`toolkit compile ... --backend tvm`")
    if missing := missing_tvm_extension(manifest.dtype):
        feature, instead = missing
        raise ToolkitError(f"this TVM {manifest.dtype} artifact needs a CPU with {feature}, which this one lacks (see "
                           f"/proc/cpuinfo); build one for it with `toolkit compile ... {instead}`")


def host_check_needs_compiler(manifest: Manifest) -> bool:
    """Whether `check_host` asks LLVM for this CPU's name (TVM's compiler library): an llvm artifact without recorded
    flags, or a host whose flags cannot be read."""
    llvm = (manifest.target.tvm_target or {}).get("kind") == "llvm"
    return llvm and (manifest.target.cpu_flags is None or isa_flags() is None)


def as_stored(array: np.ndarray) -> np.ndarray:
    """numpy writes ml_dtypes' bfloat16 arrays as 2-byte voids (`|V2`); bf16 is the only such dtype we write."""
    import ml_dtypes

    return array.view(ml_dtypes.bfloat16) if array.dtype == np.dtype("V2") else array


_loaded: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # (params_sha256, device) → Shared(weights)


def load_weights(manifest: Manifest, vm, device) -> Shared:
    """The artifact's weights, transformed for `vm`. Artifacts whose manifests carry the same `params_sha256` (every
    SEQ of a bucket set, every instance of an engine) get the same tensors: loaded once per process while any of them
    is open (a 5-bucket 0.6B set: one 1.2 GB copy, not five)."""
    import tvm

    def load():
        with np.load(manifest.path / manifest.params_file) as npz:
            weights = [tvm.runtime.tensor(as_stored(npz[f"arr_{i}"]), device) for i in range(len(npz.files))]
        # What compile lifted out of `main` runs here once: nothing on CPU (weights stay the stored panels, read by
        # the matmuls as they are: resident 1.0x params.npz), fp32 copies for dlight's GPU kernels on CUDA.
        tensors = vm["main_transform_params"](weights)
        del weights
        return_freed_memory()  # numpy's read buffers
        return tensors

    digest = manifest.params_sha256
    return load_shared(_loaded, (digest, str(device)) if digest else None, load)


class TvmBackend(ArtifactBackend):
    """A `tvm` artifact on the Relax VM (llvm CPU or CUDA)."""

    def __init__(self, manifest: Manifest, threads: int | None = None, device_id: int = 0):
        # TVM sizes its CPU thread pool from TVM_NUM_THREADS when a thread first runs a kernel, and otherwise used a
        # single core on these VMs (kernels ran 2x slower). Engine sizes `threads` so instances share the cores.
        os.environ.setdefault("TVM_NUM_THREADS", str(threads or os.cpu_count() or 1))
        tvm = import_tvm(compiler=host_check_needs_compiler(manifest))
        from tvm.runtime.vm import VirtualMachine

        check_host(manifest)
        if manifest.amx_kernels:
            request_tiles()
        super().__init__(manifest)
        self.device = tvm.cpu() if manifest.target.device == "cpu" else tvm.cuda(device_id)
        executable = tvm.runtime.load_module(str(manifest.path / manifest.model_file))
        self.vm = VirtualMachine(executable, self.device)
        self.weights = load_weights(manifest, self.vm, self.device)  # held: shared while any backend uses them
        self._tensor = tvm.runtime.tensor

    @override
    def forward(self, input_ids, attention_mask):
        ids, mask = self._tensor(input_ids, self.device), self._tensor(attention_mask, self.device)
        return self.vm["main"](ids, mask, *self.weights.value).numpy()

    @override
    def close(self) -> None:
        """Let the VM and the weights go, and hand TVM's pooled buffers back to the OS: its allocator keeps every
        buffer a VM has freed, for any VM of the process, as long as the process lives (0.6B int8, one forward of
        each of 10 SEQs: 63 MB once all were closed). Backends still open allocate theirs again on their next run."""
        import tvm_ffi

        self.vm = self.weights = None
        tvm_ffi.get_global_func("vm.builtin.memory_manager.clear")()
        return_freed_memory()
