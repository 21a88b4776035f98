"""The arithmetic floor of the step-time ratio: matrix-product FLOPs of the KD step and of KD + AMAD (streaming).

Counts, with ``torch.utils.flop_counter.FlopCounterMode``, the floating-point operations of the matrix
products (``mm``, ``bmm``, ``addmm``, ...) in one forward + backward of ``train_step.py``'s configurations
``kd`` and ``streaming`` (same models, batch and loss), for the 2/2- and 12/6-layer pairs. The models run with
eager attention here, so that their ``Q K^T`` and ``P V`` products are counted (PyTorch's counter has no formula
for the CPU SDPA kernel that the timed benchmark uses; it does the same products). Softmax, exponentials and
the optimizer step are not counted, so ``streaming / kd`` here is a lower bound of the time ratio that an exact
loss running at the models' own arithmetic throughput would reach:

    .venv/bin/python benchmarks/step_flops.py [--seq 2048] [--layers 2 2 --layers 12 6]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def step_flops(config: str, seq: int, layers: tuple[int, int]) -> int:
    """Matrix-product FLOPs of one forward + backward of ``config`` (eager attention), after a first one."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import train_step

    torch.manual_seed(0)
    _, _, batch, (loss_of, _) = train_step.build(config, seq, layers, impl="eager")
    loss_of(batch).backward()  # the first step also checks the loss weights' balance (extra gradients): not counted
    with FlopCounterMode(display=False) as counter:
        loss_of(batch).backward()
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--layers", type=int, nargs=2, action="append", metavar=("TEACHER", "STUDENT"))
    args = parser.parse_args(argv)
    print("| layers (Teacher/Student) | kd GFLOP | streaming GFLOP | loss GFLOP | streaming / kd |")
    print("|---|---|---|---|---|")
    for teacher, student in args.layers or [(2, 2), (12, 6)]:
        kd, streaming = (step_flops(c, args.seq, (teacher, student)) for c in ("kd", "streaming"))
        print(f"| {teacher}/{student} | {kd / 1e9:.1f} | {streaming / 1e9:.1f} | {(streaming - kd) / 1e9:.1f} | "
              f"{streaming / kd:.3f} |")


if __name__ == "__main__":
    main()
