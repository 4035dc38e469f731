"""Triton kernels of fused-rlvr, installed as `fused_rlvr.kernels` (never as a top-level `kernels`).

Import the kernel modules through `fused_rlvr._kernels.kernel_module`, which picks the compiled or the
interpreted copy; importing this package itself imports no Triton.
"""
