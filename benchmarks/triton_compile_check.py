"""Compile every fused-AMAD Triton kernel for a GPU architecture, without a GPU, and report its resources.

Runs the fused loss (forward and backward, variants mse / s2t / kl, float32 and bfloat16,
with and without masks, causality and bias) on small CPU tensors, but replaces the kernel
launch by ``JITFunction.warmup`` against a stand-in CUDA driver for ``--arch`` (default 90:
H100/H200), so each kernel specialisation a GPU run would use is compiled to a cubin by
Triton's own toolchain; nothing is executed and the numbers the loss returns are garbage.
For each compiled kernel it prints registers per thread, the per-thread stack frame (where
ptxas puts spilled registers and arrays it cannot keep in registers; cuobjdump's STACK), shared
memory and compile time, and exits non-zero if a stack frame exceeds ``--max-stack`` bytes or
the shared memory exceeds ``--max-shared-kib``. This checks compilation only: speed needs a GPU
(``gpu_amad_kernel.py``).

    python benchmarks/triton_compile_check.py [--arch 90] [--tiles 16 32 8 1] [--heads 12 8] [--dim 64]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch


class StandInCudaDriver:
    """What ``JITFunction.run(..., warmup=True)`` asks of the active driver: a device, a stream, a target."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        return self.target


def resource_usage(cubin: bytes) -> dict[str, int]:
    """``REG``, ``STACK`` (spills), ``SHARED`` (static) of a cubin, read by Triton's bundled cuobjdump."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    return {key: int(value) for key, value in (item.split(":")[:2] for item in line.split() if ":" in item)
            if value.isdigit()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100/H200)")
    parser.add_argument("--tiles", type=int, nargs=4, default=None, metavar=("BM", "BN", "WARPS", "STAGES"))
    parser.add_argument("--heads", type=int, nargs=2, default=(12, 8), metavar=("H_T", "H_S"))
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--variants", nargs="+", default=["mse", "s2t", "kl"], choices=["mse", "s2t", "kl"])
    parser.add_argument("--masking", nargs="+", default=["none", "all"], choices=["none", "all"],
                        help="none: no mask, bias or causality; all: key mask, query mask, bias and causal")
    parser.add_argument("--max-shared-kib", type=float, default=227.0, help="sm_90: 227 KiB per block")
    parser.add_argument("--max-stack", type=int, default=1024, help="largest acceptable stack frame, bytes/thread")
    args = parser.parse_args()

    from triton.runtime import driver

    driver.set_active(StandInCudaDriver(args.arch))
    from amad.attention import AttentionInputs
    from amad.losses import _triton_amad as fused

    tiles = tuple(args.tiles) if args.tiles else fused.TILES
    seen: dict[tuple, dict] = {}

    def compile_only(kernel, grid, tiles_, *kargs, **kwargs) -> None:
        start = time.perf_counter()
        compiled = kernel.warmup(*kargs, grid=grid, num_warps=tiles_[2], num_stages=tiles_[3], enable_fp_fusion=True,
                                 **kwargs)
        key = (kernel.fn.__name__, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in seen:
            usage = resource_usage(compiled.asm["cubin"])
            usage["dynamic_shared"] = compiled.metadata.shared
            usage["seconds"] = time.perf_counter() - start
            seen[key] = usage
            print(f"compiled {key[0]} in {usage['seconds']:.0f} s: REG {usage['REG']}, stack {usage['STACK']} B",
                  file=sys.stderr, flush=True)

    fused._launch = compile_only
    fused._check_finite = lambda *a, **k: None

    q = k = 64
    h_t, h_s = args.heads
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for dtype in (dtypes[name] for name in args.dtypes):
        for masked in (m == "all" for m in args.masking):
            def inputs(heads: int, grad: bool) -> AttentionInputs:
                mask = torch.ones(2, 1, 1, k, dtype=torch.bool) if masked else None
                bias = torch.zeros(1, heads, 1, k) if masked else None
                return AttentionInputs(torch.randn(2, heads, q, args.dim, dtype=dtype, requires_grad=grad),
                                       torch.randn(2, heads, k, args.dim, dtype=dtype, requires_grad=grad),
                                       args.dim**-0.5, bias=bias, mask=mask, causal=masked,
                                       query_mask=torch.ones(2, q, dtype=torch.bool) if masked else None)

            teacher, student = inputs(h_t, False), inputs(h_s, True)
            for variant in args.variants:
                alignment = "l1" if variant == "kl" else "cosine"
                per_sample = fused.fused_per_sample(teacher, student, variant=variant, alignment=alignment,
                                                    temperature=1.0, eps=1e-7, tiles=tiles)
                per_sample.sum().backward()

    limit = args.max_shared_kib * 1024
    print(f"sm_{args.arch}, tiles (BM, BN, warps, stages) = {tiles}, H_t={h_t}, H_s={h_s}, d={args.dim}")
    print(f"{'kernel':<18} {'specialisation':<58} {'REG':>4} {'stack B':>7} {'shared KiB':>10} {'compile s':>9}")
    failures = 0
    for (name, kwargs), usage in seen.items():
        options = dict(kwargs)
        spec = ", ".join(f"{k}={options[k]}" for k in ("PREC_T", "TF", "SF", "KL", "BACKWARD", "NEED_TT", "FLAGS")
                         if k in options)
        shared = usage["dynamic_shared"] + usage.get("SHARED", 0)
        bad = usage["STACK"] > args.max_stack or shared > limit
        failures += bad
        print(f"{name:<18} {spec:<58} {usage['REG']:>4} {usage['STACK']:>7} {shared / 1024:>10.1f} "
              f"{usage['seconds']:>9.1f}{'  <-- large stack frame or too much shared memory' if bad else ''}")
    print(f"{len(seen)} kernels compiled, {failures} with a stack frame over {args.max_stack} B "
          f"or over {args.max_shared_kib} KiB shared memory")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
