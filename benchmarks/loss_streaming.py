"""Streaming vs materialised AMAD (variant 1) at the loss level: forward+backward time and peak extra memory.

One Teacher layer (H_t = 12) and one Student layer (H_s = 8), head dim 64,
batch 1, self-attention with q = k. Methods:

* ``streaming``   ``amad.losses.streaming.amad`` on the recorded Q/K (default block size);
  (its backward forms ``dL/dS_block = dG_ts^T T_b + (dG_ss + dG_ss^T) S_b`` by hand);
* ``streaming-autograd`` the same pass with plain per-block checkpointing: the
  backward re-runs each block's Gram products under autograd;
* ``materialised`` ``amad.losses.amad`` on ``AttentionInputs.probs()`` (with autograd);
* ``plain``       the spec's equations written straightforwardly with einsum on whole maps.

Memory: every (method, q) runs in a fresh subprocess with glibc's mmap threshold
fixed (``MALLOC_MMAP_THRESHOLD_=65536``), so large tensors are returned to the
OS when freed and RSS follows live memory. Peak extra = ``ru_maxrss`` after the
first forward+backward minus the RSS just before it (inputs, libraries and a
small warm-up already resident). A run whose estimated need exceeds the budget
(or the memory available now) is reported as "does not fit (needs X GiB)";
estimates are extrapolated from the previous size's measurement (maps: ~q^2).

Time: the minimum over ``--repeats`` forward+backward passes after the first,
wall clock and (in brackets) CPU time of the process. On a shared machine use
``--threads 1``: then CPU time is close to the wall time of an idle machine,
while with several threads every operator's barrier waits for descheduled threads.

    .venv/bin/python benchmarks/loss_streaming.py [--sizes 512 2048 8192 16384] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

HEADS_T, HEADS_S, HEAD_DIM = 12, 8, 64
METHODS = ("streaming", "streaming-autograd", "materialised", "plain")
GIB = 2**30


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


# -- the methods -----------------------------------------------------------------------
def make_inputs(q: int, seed: int = 0):
    from amad.attention import AttentionInputs

    gen = torch.Generator().manual_seed(seed)
    scale = HEAD_DIM**-0.5

    def rand(h):
        return torch.randn(1, h, q, HEAD_DIM, generator=gen)

    teacher = AttentionInputs(rand(HEADS_T), rand(HEADS_T), scale)
    student = AttentionInputs(rand(HEADS_S).requires_grad_(), rand(HEADS_S).requires_grad_(), scale)
    return teacher, student


def plain_amad_mse(teacher, student) -> torch.Tensor:
    """Spec section 2 on whole maps, the way a paper's reference code writes it."""
    t = torch.softmax(teacher.query @ teacher.key.transpose(-1, -2) * teacher.scaling, dim=-1).flatten(2)
    s = torch.softmax(student.query @ student.key.transpose(-1, -2) * student.scaling, dim=-1).flatten(2)
    t_hat, s_hat = t / t.norm(dim=-1, keepdim=True), s / s.norm(dim=-1, keepdim=True)
    weights = torch.softmax(torch.einsum("bin,bjn->bij", t_hat, s_hat), dim=-1)
    mixed = torch.einsum("bij,bjn->bin", weights, s_hat)
    return ((t_hat - mixed / mixed.norm(dim=-1, keepdim=True)) ** 2).mean()


def streaming_autograd(teacher, student, block_size: int | None = None) -> torch.Tensor:
    """The library's streaming pass, but its backward re-runs each block's Gram products under autograd."""
    from amad.losses._blockwise import blockwise_sum, resolve_block_size
    from amad.losses.streaming import _mse_grams, explained_rows_loss

    block = resolve_block_size(block_size, teacher, student)
    g_ts, g_ss, t_sq = blockwise_sum(teacher, student, _mse_grams, block_size=block, dtype=torch.float32)
    n = student.q_len * student.k_len
    return explained_rows_loss(g_ts, g_ss, t_sq, 1.0).sum() / (student.batch_size * teacher.num_heads * n)


def loss_fn(method: str, block_size: int | None = None):
    from amad.losses import alignment, streaming

    return {
        "streaming": lambda t, s: streaming.amad(t, s, variant="mse", block_size=block_size),
        "streaming-autograd": lambda t, s: streaming_autograd(t, s, block_size),
        "materialised": lambda t, s: alignment.amad(t.probs(), s.probs(), variant="mse"),
        "plain": plain_amad_mse,
    }[method]


def worker(method: str, q: int, repeats: int, block_size: int | None) -> dict:
    """Runs in a fresh process: one measured fwd+bwd for memory, then ``repeats`` timed ones."""
    fn = loss_fn(method, block_size)
    small_t, small_s = make_inputs(64)
    fn(small_t, small_s).backward()  # load kernels and lazy imports outside the measurement
    teacher, student = make_inputs(q)
    before_peak, baseline = peak_rss_bytes(), rss_bytes()
    start = time.perf_counter()
    loss = fn(teacher, student)
    loss.backward()
    first = time.perf_counter() - start
    peak = peak_rss_bytes()
    times, cpu_times = [], []
    for _ in range(repeats):
        student.query.grad = student.key.grad = None
        start, cpu_start = time.perf_counter(), time.process_time()
        fn(teacher, student).backward()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "loss": loss.item(), "grad_query_norm": student.query.grad.norm().item(), "first_s": first,
        "time_s": min(times) if times else first, "cpu_s": min(cpu_times) if cpu_times else None,
        "peak_extra_bytes": peak - baseline,
        "peak_is_exact": peak > before_peak,
    }


def accuracy(q: int) -> None:
    """Relative error of the float32 losses against the float64 materialised loss on the same Q/K."""
    from amad.losses import alignment, streaming

    teacher, student = make_inputs(q)
    with torch.no_grad():
        exact = alignment.amad(teacher.to(torch.float64).probs(), student.to(torch.float64).probs()).item()
        for label, value in (
            ("streaming float32", streaming.amad(teacher, student).item()),
            ("materialised float32", alignment.amad(teacher.probs(), student.probs()).item()),
        ):
            print(f"q=k={q} {label}: relative error {abs(value - exact) / exact:.1e} (float64 loss {exact:.6e})")


# -- the driver ---------------------------------------------------------------------------
def estimate_bytes(method: str, q: int, measured: dict) -> int:
    """Extrapolate from the largest smaller size already measured (maps grow as q^2; streaming ~ q)."""
    smaller = [(size, r) for (m, size), r in measured.items() if m == method and size < q and "peak_extra_bytes" in r]
    if smaller:
        size, r = max(smaller)
        power = 1 if method.startswith("streaming") else 2
        return int(r["peak_extra_bytes"] * (q / size) ** power)
    map_bytes = (HEADS_T + HEADS_S) * q * q * 4
    return map_bytes if method.startswith("streaming") else 8 * map_bytes


def run_one(method: str, q: int, args, measured: dict) -> dict:
    need = estimate_bytes(method, q, measured)
    room = min(args.budget_gib * GIB, available_bytes())
    if need > 0.9 * room:
        return {"does_not_fit_gib": need / GIB}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, __file__, "--worker", method, str(q), "--repeats", str(args.repeats)]
    if args.block_size is not None:
        cmd += ["--block-size", str(args.block_size)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"failed": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cell(r: dict, key: str) -> str:
    if "does_not_fit_gib" in r:
        return f"does not fit (needs ~{r['does_not_fit_gib']:.0f} GiB)"
    if "failed" in r:
        return f"failed: {r['failed']}"
    if key == "time_s":
        return f"{r['time_s']:.2f} s" + (f" ({r['cpu_s']:.2f} s CPU)" if r.get("cpu_s") is not None else "")
    return f"{r['peak_extra_bytes'] / 2**20:,.0f} MiB" + ("" if r["peak_is_exact"] else " (lower bound)")


def ratio(a: dict, b: dict, key: str) -> str:
    if key in a and key in b and b[key] > 0:
        return f"{a[key] / b[key]:.3f}"
    return "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 8192, 16384])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--budget-gib", type=float, default=24.0)
    parser.add_argument("--block-size", type=int, help="query rows per block (streaming; default: the library's)")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "Q"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--accuracy", type=int, metavar="Q", help="only compare float32 losses with float64 at q=k=Q")
    args = parser.parse_args()
    if args.accuracy:
        accuracy(args.accuracy)
        return
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.repeats, args.block_size)))
        return
    print(f"# torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, load {os.getloadavg()}, "
          f"H_t={HEADS_T} H_s={HEADS_S} d={HEAD_DIM} B=1 float32, block size {args.block_size or 'default'}")
    measured: dict = {}
    for q in args.sizes:
        for method in args.methods:
            measured[(method, q)] = run_one(method, q, args, measured)
            print(f"q=k={q:>6} {method:>19}: {json.dumps(measured[(method, q)])}", flush=True)
    print(f"# load at the end {os.getloadavg()}\n")
    print("| q = k | " + " | ".join(f"{m} time | {m} peak extra" for m in args.methods) + " |")
    print("|---" * (1 + 2 * len(args.methods)) + "|")
    for q in args.sizes:
        row = [cell(measured[(m, q)], k) for m in args.methods for k in ("time_s", "peak")]
        print(f"| {q} | " + " | ".join(row) + " |")
    print("\n| q = k | streaming / materialised CPU time | streaming / materialised peak | "
          "autograd / streaming CPU time | streaming / plain peak |")
    print("|---|---|---|---|---|")
    for q in args.sizes:
        get = lambda m: measured.get((m, q), {})  # noqa: E731
        print(f"| {q} | {ratio(get('streaming'), get('materialised'), 'cpu_s')} | "
              f"{ratio(get('streaming'), get('materialised'), 'peak_extra_bytes')} | "
              f"{ratio(get('streaming-autograd'), get('streaming'), 'cpu_s')} | "
              f"{ratio(get('streaming'), get('plain'), 'peak_extra_bytes')} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"method": m, "q": q, **r} for (m, q), r in measured.items()], f, indent=1)


if __name__ == "__main__":
    main()
