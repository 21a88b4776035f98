"""Where the streaming AMAD loss's time goes, and how it compares with another version of the library.

Inputs: the last layers' recorded Q/K of ``train_step.py``'s models (BERT-style Teacher 768/12 heads,
Student 512/8 heads, 2 layers, batch 1, every token real) at ``--seq``, with the query masks the
Distiller derives from the batch. One torch thread; times are process CPU time (the work done, not
the waiting for a core on a shared machine). The loss is ``amad-mse`` streaming, forward + backward
to the Student's Q and K, default block size.

  --ab PATH   interleaved A/B: this tree's loss against the ``amad`` package under PATH (e.g. an
              older checkout's ``src``), loaded under another name in the same process; the two
              alternate, in alternating order, ``--rounds`` times. First checks that both give the
              same loss and gradients. Reports each side's median and the median of the per-round
              ratios with their range, and the host reads of tensor values of one forward+backward
              (``bool()``, ``.item()``, ``.tolist()``: each a host-device synchronisation on a GPU).
  --parts     the same pass split into its parts: the library's per-block operations mirrored here
              with a CPU timer around each group; the mirror's total is printed beside the library's
              so that a drift of the mirror shows.
  --compile   the mirrored per-block functions under ``torch.compile`` (inductor) against eager:
              compile time and the ratio of a whole pass's CPU time (``--rounds`` interleaved pairs).
  --blocks N [N ...]  the library's loss with these query rows per block, interleaved; ratios to the first.
  --recorder  the Teacher's recorded attention layer alone (no_grad), with and without AttentionRecorder,
              interleaved: recording must not add a second attention computation.
  --joint     the mirrored pass with both models' probabilities in one buffer ``U`` per block: the three
              Gram statistics from one ``U U^T`` and ``dL/dS_b`` from one product with ``U``, against the
              mirror as the library runs it (``--rounds`` interleaved pairs).
  --fused-layer  what handing the loss the Student layer's own attention could save at most: that layer's
              SDPA forward + backward, against the work a fused layer + loss pass would add to the loss
              (``O_b = P_b V``, ``dP_b += dO_b V^T``, ``dV += P_b^T dO_b``), interleaved.
  --step      one training step of ``kd`` and of ``streaming`` (train_step.py's models) and the loss alone,
              interleaved: whether the step's extra time is the loss's.

    PYTHONPATH=src .venv/bin/python benchmarks/streaming_time.py --ab /path/to/old/src --rounds 10
    PYTHONPATH=src .venv/bin/python benchmarks/streaming_time.py --parts
    PYTHONPATH=src .venv/bin/python benchmarks/streaming_time.py --compile --rounds 6
    PYTHONPATH=src .venv/bin/python benchmarks/streaming_time.py --blocks 170 32 64 341 2048
    PYTHONPATH=src .venv/bin/python benchmarks/streaming_time.py --recorder --rounds 20
    PYTHONPATH=src .venv/bin/python benchmarks/streaming_time.py --joint --fused-layer --step
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace

import torch

from train_step import build  # same directory: the same models and batch

LAYER = "bert.encoder.layer.1.attention.self"


def recorded_inputs(seq: int):
    """Teacher (detached) and Student inputs of the last layers, query masks as the Distiller sets them."""
    from amad import AttentionRecorder
    from amad.distiller import query_mask_for

    teacher, student, batch, _ = build("kd", seq)
    with AttentionRecorder(teacher, LAYER) as t_rec, torch.no_grad():
        teacher(**batch)
    with AttentionRecorder(student, LAYER) as s_rec:
        student(**batch)
    t_in, s_in = t_rec.inputs(LAYER).detach(), s_rec.inputs(LAYER)
    return (replace(t_in, query_mask=query_mask_for(t_in, batch)),
            replace(s_in, query_mask=query_mask_for(s_in, batch)))


def loss_pass(package, teacher, student, block_size: int | None = None):
    """``() -> (loss, dQ, dK)`` of the streaming amad-mse of ``package`` (``amad`` or a copy of another version)."""
    losses = importlib.import_module(f"{package}.losses")
    inputs_type = importlib.import_module(f"{package}.attention").AttentionInputs
    fields = ("query", "key", "scaling", "value", "bias", "mask", "causal", "query_mask")
    t, s = (inputs_type(**{f: getattr(x, f) for f in fields}) for x in (teacher, student))
    loss = losses.get("amad-mse")

    def run():
        value = loss.from_inputs(t, s, streaming=True, block_size=block_size)
        return (value.detach(), *torch.autograd.grad(value, [s.query, s.key]))

    return run


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def interleaved(fns: dict, rounds: int) -> dict[str, list[float]]:
    """CPU seconds of each function per round, the order reversed every other round."""
    times = {name: [] for name in fns}
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            times[name].append(cpu_seconds(fns[name]))
    return times


def report_ratio(times: dict[str, list[float]], new: str, old: str) -> None:
    for name, values in times.items():
        print(f"  {name}: median {statistics.median(values):.3f} s CPU (min {min(values):.3f}, max {max(values):.3f})")
    ratios = [a / b for a, b in zip(times[new], times[old])]
    print(f"  {new} / {old}: median {statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}] "
          f"over {len(ratios)} rounds; load average {os.getloadavg()[0]:.1f}")


def host_reads(fn) -> int:
    """How many times ``fn()`` reads a tensor's value on the host (``aten::_local_scalar_dense``, ``tolist``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    count = 0

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal count
            count += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        nonlocal count
        count += 1
        return tolist(self)

    torch.Tensor.tolist = counted_tolist
    try:
        with Count():
            fn()
    finally:
        torch.Tensor.tolist = tolist
    return count


def ab(path: str, seq: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(os.path.join(path, "amad"), os.path.join(tmp, "amad_baseline"))
        sys.path.insert(0, tmp)
        t_in, s_in = recorded_inputs(seq)
        fns = {"this tree": loss_pass("amad", t_in, s_in), "baseline": loss_pass("amad_baseline", t_in, s_in)}
        new, old = fns["this tree"](), fns["baseline"]()
        diffs = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(new, old)]
        print(f"seq {seq}: max relative difference of loss, dQ, dK: {', '.join(f'{d:.1e}' for d in diffs)}")
        print("  host reads of tensor values per forward+backward: "
              + ", ".join(f"{name} {host_reads(fn)}" for name, fn in fns.items()))
        report_ratio(interleaved(fns, rounds), "this tree", "baseline")


# -- the library's per-block operations, mirrored (amad.losses._blockwise, _gram) --------------------
def untimed(label: str):
    return contextlib.nullcontext()


def forward_block(qt, kt, qs, ks, st: float, ss: float, part=untimed):
    """Gram statistics of one block: ``T S^T``, ``S S^T``, ``|t|^2`` (``part(label)`` wraps each step)."""
    with part("Teacher map (Q K^T, softmax), forward"):
        t = torch.softmax(torch.matmul(qt * st, kt.mT), -1).flatten(2)
    with part("Student map, forward"):
        s = torch.softmax(torch.matmul(qs * ss, ks.mT), -1).flatten(2)
    with part("Gram products T S^T, S S^T, |t|^2"):
        return t @ s.mT, s @ s.mT, torch.linalg.vector_norm(t, dim=-1).square()


def backward_block(qt, kt, qs, ks, st: float, ss: float, d_ts, d_ss, part=untimed):
    """``(dQ_b, dK contribution)`` of one block from ``dL/dG_ts``, ``dL/dG_ss``."""
    with part("Student map, backward (recomputed)"):
        p = torch.softmax(torch.matmul(qs * ss, ks.mT), -1)
    with part("Teacher map, backward (recomputed)"):
        t = torch.softmax(torch.matmul(qt * st, kt.mT), -1)
    with part("dL/dS_b = dG_ts^T T_b + (dG_ss + dG_ss^T) S_b"):
        dp = ((d_ss + d_ss.mT) @ p.flatten(2)).baddbmm_(d_ts.mT, t.flatten(2)).view(p.shape)
    with part("softmax backward"):
        dz = torch._softmax_backward_data(dp, p, -1, p.dtype)
    with part("dQ = s dZ K, dK += s dZ^T Q"):
        return torch.matmul(dz, ks).mul_(ss), dz.mT @ (qs * ss)


def mirrored_pass(t_in, s_in, block: int, fwd=forward_block, bwd=backward_block, **part):
    """The whole forward + closed-form backward, block by block (``dL/dG`` fixed at 1e-3)."""
    qt, kt, st = t_in.query, t_in.key, t_in.scaling
    qs, ks, ss = s_in.query.detach(), s_in.key.detach(), s_in.scaling
    q = qs.shape[2]
    totals = None
    for start in range(0, q, block):
        out = fwd(qt[:, :, start:start + block], kt, qs[:, :, start:start + block], ks, st, ss, **part)
        totals = list(out) if totals is None else [a + b for a, b in zip(totals, out)]
    d_ts, d_ss = torch.full_like(totals[0], 1e-3), torch.full_like(totals[1], 1e-3)
    grad_q, grad_k = torch.empty_like(qs), torch.zeros_like(ks)
    for start in range(0, q, block):
        rows = slice(start, start + block)
        dq, dk = bwd(qt[:, :, rows], kt, qs[:, :, rows], ks, st, ss, d_ts, d_ss, **part)
        grad_q[:, :, rows] = dq
        grad_k += dk
    return totals, grad_q, grad_k


def parts(seq: int, rounds: int) -> None:
    """CPU time of each part of the pass, summed over blocks, per pass."""
    from amad.losses._blockwise import resolve_block_size

    t_in, s_in = recorded_inputs(seq)
    block = resolve_block_size(None, t_in, s_in)
    acc: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(label: str):
        start = time.process_time()
        yield
        acc[label] = acc.get(label, 0.0) + time.process_time() - start

    fns = {"library": loss_pass("amad", t_in, s_in), "mirror": lambda: mirrored_pass(t_in, s_in, block, part=timed)}
    for fn in fns.values():
        fn()
    acc.clear()
    times = interleaved(fns, rounds)
    print(f"seq {seq}, {block} rows per block, {rounds} rounds: library {statistics.median(times['library']):.3f} s "
          f"CPU, mirror {statistics.median(times['mirror']):.3f} s (medians); load average {os.getloadavg()[0]:.1f}")
    total = sum(acc.values())
    for label, seconds in sorted(acc.items(), key=lambda kv: -kv[1]):
        print(f"  {label}: {seconds / rounds:.3f} s ({100 * seconds / total:.0f} %)")


def block_sizes(seq: int, rounds: int, sizes: list[int]) -> None:
    t_in, s_in = recorded_inputs(seq)
    fns = {f"{rows} rows": loss_pass("amad", t_in, s_in, rows) for rows in sizes}
    for fn in fns.values():
        fn()
    times = interleaved(fns, rounds)
    first = f"{sizes[0]} rows"
    print(f"seq {seq}, block sizes (query rows per block), {rounds} rounds; ratios to {first}:")
    for name, values in times.items():
        ratios = [a / b for a, b in zip(values, times[first])]
        print(f"  {name}: median {statistics.median(values):.3f} s CPU; ratio median {statistics.median(ratios):.3f} "
              f"[{min(ratios):.3f}, {max(ratios):.3f}]")
    print(f"  load average {os.getloadavg()[0]:.1f}")


def recorder_cost(seq: int, rounds: int) -> None:
    from amad import AttentionRecorder

    teacher, _, _, _ = build("kd", seq)
    layer = teacher.eval().get_submodule(LAYER)
    hidden = torch.randn(1, seq, teacher.config.hidden_size)
    recorder = AttentionRecorder(teacher, LAYER)

    def plain():
        with torch.no_grad():
            layer(hidden)

    def recorded():
        with recorder, torch.no_grad():
            layer(hidden)

    recorded()
    with torch.profiler.profile() as prof:
        recorded()
    watched = ("aten::bmm", "aten::_softmax")
    calls = {e.key: e.count for e in prof.key_averages() if "attention" in e.key or e.key in watched}
    print(f"seq {seq}: operators of one recorded call: {calls}")
    report_ratio(interleaved({"recorded": recorded, "plain": plain}, rounds), "recorded", "plain")


def compiled(seq: int, rounds: int, dynamic: bool) -> None:
    from amad.losses._blockwise import resolve_block_size

    t_in, s_in = recorded_inputs(seq)
    block = resolve_block_size(None, t_in, s_in)
    fwd, bwd = torch.compile(forward_block, dynamic=dynamic), torch.compile(backward_block, dynamic=dynamic)
    wall, cpu = time.perf_counter(), time.process_time()
    got = mirrored_pass(t_in, s_in, block, fwd=fwd, bwd=bwd)
    print(f"seq {seq}, dynamic={dynamic}: compile + first pass {time.perf_counter() - wall:.1f} s wall, "
          f"{time.process_time() - cpu:.1f} s CPU of this process (inductor's compile workers not counted)")
    want = mirrored_pass(t_in, s_in, block)
    diffs = [float((a - b).abs().max() / b.abs().max()) for a, b in zip((got[0][0], *got[1:]), (want[0][0], *want[1:]))]
    print(f"  max relative difference of G_ts, dQ, dK: {', '.join(f'{d:.1e}' for d in diffs)}")
    fns = {"compiled": lambda: mirrored_pass(t_in, s_in, block, fwd=fwd, bwd=bwd),
           "eager": lambda: mirrored_pass(t_in, s_in, block)}
    report_ratio(interleaved(fns, rounds), "compiled", "eager")


def joint_pass(t_in, s_in, block: int):
    """The mirrored pass with one buffer ``U = [T_b; S_b]`` per block (see ``--joint``)."""
    heads = t_in.num_heads

    def probabilities(qt, kt, qs, ks, st, ss):
        u = torch.empty(qt.shape[0], heads + qs.shape[1], qt.shape[2], kt.shape[2])
        torch._softmax(torch.matmul(qt * st, kt.mT), -1, False, out=u[:, :heads])  # contiguous slices: batch 1
        torch._softmax(torch.matmul(qs * ss, ks.mT), -1, False, out=u[:, heads:])
        return u

    def fwd(qt, kt, qs, ks, st, ss):
        f = probabilities(qt, kt, qs, ks, st, ss).flatten(2)
        g = f @ f.mT
        return g[:, :heads, heads:], g[:, heads:, heads:], torch.diagonal(g[:, :heads, :heads], dim1=-2, dim2=-1)

    def bwd(qt, kt, qs, ks, st, ss, d_ts, d_ss):
        u = probabilities(qt, kt, qs, ks, st, ss)
        p = u[:, heads:]
        dp = (torch.cat([d_ts.mT, d_ss + d_ss.mT], -1) @ u.flatten(2)).view(p.shape)
        dz = torch._softmax_backward_data(dp, p, -1, p.dtype)
        return torch.matmul(dz, ks).mul_(ss), dz.mT @ (qs * ss)

    return mirrored_pass(t_in, s_in, block, fwd=fwd, bwd=bwd)


def joint(seq: int, rounds: int) -> None:
    from amad.losses._blockwise import resolve_block_size

    t_in, s_in = recorded_inputs(seq)
    block = resolve_block_size(None, t_in, s_in)
    got, want = joint_pass(t_in, s_in, block), mirrored_pass(t_in, s_in, block)
    diffs = [float((a - b).abs().max() / b.abs().max()) for a, b in zip((*got[0], *got[1:]), (*want[0], *want[1:]))]
    print(f"seq {seq}: one buffer per block; max relative difference of G_ts, G_ss, |t|^2, dQ, dK: "
          f"{', '.join(f'{d:.1e}' for d in diffs)}")
    fns = {"one buffer": lambda: joint_pass(t_in, s_in, block), "as the library": lambda: mirrored_pass(t_in, s_in, block)}
    report_ratio(interleaved(fns, rounds), "one buffer", "as the library")


def fused_layer(seq: int, rounds: int) -> None:
    from amad.losses._blockwise import resolve_block_size

    t_in, s_in = recorded_inputs(seq)
    block = resolve_block_size(None, t_in, s_in)
    q, k, v = (torch.randn_like(s_in.query).requires_grad_() for _ in range(3))
    d_out = torch.randn_like(q)
    blocks = [torch.softmax(torch.randn(*q.shape[:2], min(block, seq - s), seq), -1) for s in range(0, seq, block)]
    batch_heads = q.shape[0] * q.shape[1]

    def sdpa():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        torch.autograd.grad(out, (q, k, v), d_out)

    def added_work():
        values, d_values = v.detach(), torch.zeros_like(v)
        for start, probs in zip(range(0, seq, block), blocks):
            rows = d_out[:, :, start:start + probs.shape[2]]
            probs @ values
            (rows @ values.mT).add_(probs)
            d_values.view(batch_heads, seq, -1).baddbmm_(probs.reshape(batch_heads, -1, seq).mT,
                                                         rows.reshape(batch_heads, -1, rows.shape[-1]))

    print(f"seq {seq}: the Student layer's SDPA forward+backward against the work fusing it into the loss adds")
    report_ratio(interleaved({"added work": added_work, "SDPA fwd+bwd": sdpa}, rounds), "added work", "SDPA fwd+bwd")


def step_and_loss(seq: int, rounds: int) -> None:
    from train_step import training_step

    t_in, s_in = recorded_inputs(seq)
    fns = {"kd": training_step("kd", seq, [2, 2]), "streaming": training_step("streaming", seq, [2, 2]),
           "loss": loss_pass("amad", t_in, s_in)}
    for fn in fns.values():  # warm-up (the first Distiller step checks alpha's balance)
        fn()
    times = interleaved(fns, rounds)
    extra = [s - k for s, k in zip(times["streaming"], times["kd"])]
    rest = [e - loss for e, loss in zip(extra, times["loss"])]
    for name, values in {**times, "streaming - kd": extra, "streaming - kd - loss": rest}.items():
        print(f"  {name}: median {statistics.median(values):.3f} s CPU (per round {[round(x, 2) for x in values]})")
    print(f"  load average {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ab", metavar="PATH", help="directory holding the baseline's amad package (its src/)")
    parser.add_argument("--parts", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--static", action="store_true", help="--compile with dynamic=False")
    parser.add_argument("--blocks", type=int, nargs="+", metavar="ROWS")
    parser.add_argument("--recorder", action="store_true")
    parser.add_argument("--joint", action="store_true")
    parser.add_argument("--fused-layer", action="store_true")
    parser.add_argument("--step", action="store_true")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, load average at start {os.getloadavg()[0]:.1f}")
    if args.ab:
        ab(args.ab, args.seq, args.rounds)
    if args.parts:
        parts(args.seq, args.rounds)
    if args.compile:
        compiled(args.seq, args.rounds, dynamic=not args.static)
    if args.blocks:
        block_sizes(args.seq, args.rounds, args.blocks)
    if args.recorder:
        recorder_cost(args.seq, args.rounds)
    if args.joint:
        joint(args.seq, args.rounds)
    if args.fused_layer:
        fused_layer(args.seq, args.rounds)
    if args.step:
        step_and_loss(args.seq, args.rounds)


if __name__ == "__main__":
    main()
