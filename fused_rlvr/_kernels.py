"""Import the Triton kernel modules, compiled (GPU) or run by the Triton interpreter (CPU tensors).

`triton.jit` decides when a function is defined whether it is compiled or interpreted, Triton's own
library functions included, so interpretation is a process-wide choice made before triton is imported
(TRITON_INTERPRET=1). On a machine without CUDA that is the only way Triton kernels can run, so the first
CPU use of backend="triton" turns it on if triton has not been imported yet. Nothing here runs at import:
the package imports without Triton or CUDA.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _enable_interpreter() -> None:
    if interpreter_on():
        return
    import torch

    if "triton" in sys.modules or torch.cuda.is_available():
        raise RuntimeError(
            "backend='triton' on CPU tensors runs the Triton interpreter, which must be switched on before "
            "triton is imported: set TRITON_INTERPRET=1 in the environment, or pass CUDA tensors, or use "
            "backend='torch'"
        )
    os.environ["TRITON_INTERPRET"] = "1"


def kernel_module(name: str, interpret: bool) -> ModuleType:
    """The module `fused_rlvr.kernels.<name>`; `interpret` asks for kernels that run on CPU tensors."""
    if not triton_available():
        raise RuntimeError("backend='triton' needs the 'triton' package; install it or use backend='torch'")
    if interpret:
        _enable_interpreter()
    return importlib.import_module(f"fused_rlvr.kernels.{name}")
