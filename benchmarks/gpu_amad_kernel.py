"""GPU benchmark of the fused Triton AMAD loss against the torch streaming form and the materialised loss.

One Teacher layer (``H_t`` heads) against one Student layer (``H_s`` heads), self-attention
``q = k``, forward + backward from the recorded Q/K to the Student's query/key gradients:

* ``fused``: ``streaming.amad(..., kernel="triton")`` (the Triton kernels, ``amad.losses._triton_amad``);
* ``streaming``: ``streaming.amad(..., kernel="torch")`` (blockwise torch, default block size);
* ``materialised``: the registered loss on ``AttentionInputs.probs()`` (autograd through whole maps).

Methods are interleaved within every repeat (order rotated), after one untimed warm-up each
(Triton compiles there). Time: CUDA events around forward+backward; mean and spread (min-max)
over the repeats. Memory: peak ``torch.cuda.max_memory_allocated`` during the pass minus the
memory allocated before it (inputs already resident). The first repeat also records the largest
relative difference of the loss and gradients from the torch streaming form. Refuses to run
without CUDA (there is no CPU fallback worth timing; ``triton_compile_check.py`` compiles without one).

    python benchmarks/gpu_amad_kernel.py --sizes 1024 2048 4096 8192 --dtypes bf16 fp32 --variants mse kl
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from amad.attention import AttentionInputs
from amad.losses import _triton_amad, get, streaming

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
METHODS = ("fused", "streaming", "materialised")


def make_layers(batch: int, heads: tuple[int, int], q: int, dim: int, dtype: torch.dtype, causal: bool,
                padded: int, seed: int) -> tuple[AttentionInputs, AttentionInputs, list[torch.Tensor]]:
    """Random Teacher (no gradient) and Student inputs on CUDA; the last ``padded`` tokens of sample 0 are padding."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(h: int, grad: bool) -> torch.Tensor:
        x = torch.randn(batch, h, q, dim, device="cuda", generator=gen, dtype=torch.float32)
        return x.to(dtype).requires_grad_(grad)

    mask = query_mask = None
    if padded:
        mask = torch.ones(batch, 1, 1, q, dtype=torch.bool, device="cuda")
        mask[0, ..., q - padded:] = False
        query_mask = mask[:, 0, 0, :].clone()
    teacher = AttentionInputs(rand(heads[0], False), rand(heads[0], False), dim**-0.5, mask=mask, causal=causal,
                              query_mask=query_mask)
    student = AttentionInputs(rand(heads[1], True), rand(heads[1], True), dim**-0.5, mask=mask, causal=causal,
                              query_mask=query_mask)
    return teacher, student, [student.query, student.key]


def run_once(method: str, variant: str, teacher: AttentionInputs, student: AttentionInputs,
             leaves: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward + backward; returns the loss and the gradients of the Student's query and key."""
    if method == "materialised":
        loss = get(f"amad-{variant}").from_inputs(teacher, student, streaming=False)
    else:
        loss = streaming.amad(teacher, student, variant=variant, kernel="triton" if method == "fused" else "torch")
    return loss.detach(), list(torch.autograd.grad(loss, leaves))


def timed(method: str, variant: str, teacher, student, leaves) -> tuple[float, float, tuple]:
    """Milliseconds, peak extra MiB, and the (loss, grads) of one pass."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    result = run_once(method, variant, teacher, student, leaves)
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop), (torch.cuda.max_memory_allocated() - before) / 2**20, result


def relative_difference(got: tuple, want: tuple) -> float:
    """Largest ``max|a - b| / max|b|`` over the loss and the gradients."""
    pairs = [(got[0], want[0])] + list(zip(got[1], want[1]))
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item() for a, b in pairs)


def bench_cell(args, variant: str, dtype_name: str, q: int) -> list[str]:
    teacher, student, leaves = make_layers(args.batch, tuple(args.heads), q, args.dim, DTYPES[dtype_name],
                                           args.causal, args.padded, args.seed)
    methods = [m for m in args.methods if not (m == "materialised" and q > args.max_materialised)]
    times: dict[str, list[float]] = {m: [] for m in methods}
    peaks: dict[str, float] = {}
    results: dict[str, tuple] = {}
    failed: dict[str, str] = {}
    for method in methods:  # warm-up (Triton compiles on the first call); also catches out-of-memory
        try:
            run_once(method, variant, teacher, student, leaves)
        except torch.cuda.OutOfMemoryError:
            failed[method] = "out of memory"
        torch.cuda.empty_cache()
    live = [m for m in methods if m not in failed]
    for repeat in range(args.repeats):
        order = live[repeat % len(live):] + live[:repeat % len(live)] if live else []
        for method in order:
            ms, peak, result = timed(method, variant, teacher, student, leaves)
            times[method].append(ms)
            peaks[method] = max(peaks.get(method, 0.0), peak)
            if repeat == 0:
                results[method] = result
    rows = []
    reference = results.get("streaming")
    for method in args.methods:
        label = f"| {variant} | {dtype_name} | {q} | {method} |"
        if method not in methods:
            rows.append(f"{label} skipped (q > --max-materialised) | | |")
        elif method in failed:
            rows.append(f"{label} {failed[method]} | | |")
        else:
            t = times[method]
            spread = f"{min(t):.2f}-{max(t):.2f}"
            diff = ""
            if reference is not None and method != "streaming":
                diff = f"{relative_difference(results[method], reference):.1e}"
            rows.append(f"{label} {statistics.mean(t):.2f} ms ({spread}) | {peaks[method]:.0f} MiB | {diff} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="q = k")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--variants", nargs="+", default=["mse", "kl"], choices=["mse", "s2t", "kl"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--heads", type=int, nargs=2, default=[12, 8], metavar=("H_T", "H_S"))
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--causal", action="store_true", help="causal self-attention (both models)")
    parser.add_argument("--padded", type=int, default=0, help="pad the last N tokens of sample 0 (key + query mask)")
    parser.add_argument("--max-materialised", type=int, default=8192, help="skip materialised above this q")
    parser.add_argument("--tiles", type=int, nargs=4, default=None, metavar=("BM", "BN", "WARPS", "STAGES"),
                        help=f"fused kernel tiles (default {_triton_amad.TILES})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("gpu_amad_kernel.py times CUDA kernels and needs a CUDA GPU; torch.cuda.is_available() is False "
              f"(torch {torch.__version__}). To check only that the kernels compile, run "
              "benchmarks/triton_compile_check.py.", file=sys.stderr)
        return 2
    if "fused" in args.methods:
        teacher, student, _ = make_layers(1, tuple(args.heads), 32, args.dim, torch.float32, False, 0, 0)
        reason = _triton_amad.unsupported_reason(teacher, student, args.variants[0])
        if reason is not None:
            print(f"the fused kernels cannot run here: {reason}", file=sys.stderr)
            return 2
    if args.tiles:
        _triton_amad.TILES = tuple(args.tiles)

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, H_t={args.heads[0]}, H_s={args.heads[1]}, "
          f"d={args.dim}, B={args.batch}, causal={args.causal}, padded={args.padded}, repeats={args.repeats}, "
          f"tiles={_triton_amad.TILES}")
    print("| variant | dtype | q = k | method | fwd+bwd mean (min-max) | peak extra | max rel. diff vs streaming |")
    print("|---|---|---|---|---|---|---|")
    for variant in args.variants:
        for dtype_name in args.dtypes:
            for q in args.sizes:
                for row in bench_cell(args, variant, dtype_name, q):
                    print(row, flush=True)
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
