"""Fused Triton form of the streaming AMAD loss (variants ``"mse"``, ``"s2t"``, ``"kl"``) for GPUs.

Same value and Student gradients as the torch form of :func:`amad.losses.streaming.amad`,
which selects it (``kernel="auto"``) for CUDA tensors when Triton is installed. Each pass over
the ``(q, k)`` map is one kernel that recomputes both models' probabilities tile by tile from
Q/K (+ bias, key mask, causality) and keeps only per-row statistics, so no map is ever stored:

* forward: ``lse`` per head and row (online max/sum), then one pass giving per query row the
  Grams ``X_ts[i] = sum_j T_:ij S_:ij^T``, ``X_ss[i]`` (``X_tt[i]`` for s2t), ``sum_j T^2`` and the
  masked row sums; ``G = sum_i X[i]``. Variant 1 / s2t: ``explained_rows_loss`` on the Grams (torch).
  Variant 2: ``W = softmax(sim(G_ts) / temperature) / s_sum`` in torch, then a pass summing
  the per-row KL terms of ``T / rowsum`` against ``W S / rowsum``.
* backward: ``D = dL/dS = Mt T + Ms S + c`` (``Mt = dG_ts^T``, ``Ms = dG_ss + dG_ss^T`` (+ ``2 diag(d|s|^2)``),
  ``c = dL/ds_sum``; variant 2 adds ``W^T (a - beta) / rowsum``, which needs one more pass for
  ``beta`` and the per-row ``Y``); ``delta_gi = sum_j S_gij D_gij`` from the stored per-row
  Grams (no pass); then one kernel for ``dQ`` (programs over query rows) and one for ``dK``
  (programs over keys). The Student's bias gets no gradient here: a bias that requires one
  is left to the torch form (``"auto"``) or refused (``"triton"``).

Everything is computed in float32 (half-precision Q/K feed the tensor cores, accumulation in
float32); the torch form computes the logits of half inputs in half precision, so the two then
agree to half precision only. Memory: ``O(B q (H_t + H_s)^2)`` per-row statistics.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..attention import AttentionInputs
from ._blockwise import outer, safe_sqrt
from ._common import safe_normalize
from ._gram import explained_rows_loss

__all__ = ["KERNELS", "triton_available", "unsupported_reason", "use_fused", "fused_per_sample"]

KERNELS = ("auto", "triton", "torch")
FUSED_VARIANTS = ("mse", "s2t", "kl")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Largest head count and head dimension the kernels take. Every program holds all heads' tiles, so
#: ``"auto"`` uses them only up to what compiled for sm_90 without heavy spilling (16 heads of d <= 128;
#: 32 heads spilled up to 8 KiB per thread; benchmarks/triton_compile_check.py); ``"triton"`` allows more.
MAX_HEADS, MAX_HEADS_AUTO = 64, 16
MAX_HEAD_DIM, MAX_HEAD_DIM_AUTO = 256, 128
#: Query rows and keys per tile (powers of two >= 16, the smallest ``tl.dot`` operand), warps per
#: program and software-pipelining stages. Chosen by compiling for sm_90 with H_t = 12, H_s = 8, d = 64
#: (benchmarks/triton_compile_check.py): at most 255 registers and under 1 KiB of stack per thread,
#: under 100 KiB shared memory; 16 x 32 tiles spilled up to 7 KiB. Not yet tuned by timing on a GPU.
TILES = (16, 16, 8, 1)
#: Head dimensions per ``tl.dot`` of the logits (Q and K are read in chunks of this many).
DIM_CHUNK = 16


# -- dispatch ------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _triton_missing() -> str | None:
    """Why Triton cannot be imported (None when it can)."""
    try:
        import triton  # noqa: F401
    except Exception as error:  # ImportError, or a broken install raising something else
        return f"triton cannot be imported ({type(error).__name__}: {error}); install amad[kernels]"
    return None


def _interpreted() -> bool:
    """Whether the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` before they were imported)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    from triton.runtime.interpreter import InterpretedFunction

    from . import _triton_kernels

    return isinstance(_triton_kernels.lse_kernel, InterpretedFunction)


def unsupported_reason(teacher: AttentionInputs, student: AttentionInputs, variant: str) -> str | None:
    """Why the fused kernels cannot compute this pair (None when they can), whatever the device."""
    if variant not in FUSED_VARIANTS:
        return f"variant {variant!r} has no fused kernel (fused: {FUSED_VARIANTS})"
    missing = _triton_missing()
    if missing:
        return missing
    if teacher.query.device != student.query.device:
        return f"Teacher and Student inputs are on different devices ({teacher.query.device}, {student.query.device})"
    for label, x in (("Teacher", teacher), ("Student", student)):
        for part in (x.query, x.key):
            if part.dtype not in SUPPORTED_DTYPES:
                return f"{label} query/key dtype {part.dtype} is not one of {SUPPORTED_DTYPES}"
        if x.num_heads > MAX_HEADS:
            return f"{label} has {x.num_heads} heads; the fused kernels hold at most {MAX_HEADS}"
        if x.query.shape[-1] > MAX_HEAD_DIM:
            return f"{label} head dimension {x.query.shape[-1]} exceeds {MAX_HEAD_DIM}"
    if student.bias is not None and student.bias.requires_grad:
        return "the Student's attention bias requires a gradient, which the fused kernels do not compute"
    return None


def triton_available(teacher: AttentionInputs, student: AttentionInputs, variant: str = "mse") -> bool:
    """True when ``kernel="auto"`` uses the fused kernels: CUDA tensors, Triton importable, pair supported,
    at most ``MAX_HEADS_AUTO`` heads of at most ``MAX_HEAD_DIM_AUTO`` dimensions per model."""
    on_cuda = teacher.query.is_cuda and student.query.is_cuda
    small = all(x.num_heads <= MAX_HEADS_AUTO and x.query.shape[-1] <= MAX_HEAD_DIM_AUTO for x in (teacher, student))
    return on_cuda and small and unsupported_reason(teacher, student, variant) is None


def use_fused(kernel: str, teacher: AttentionInputs, student: AttentionInputs, variant: str, name: str) -> bool:
    """Resolve ``kernel`` (``"auto"``, ``"triton"``, ``"torch"``); a forced ``"triton"`` that cannot run is an error."""
    if kernel not in KERNELS:
        raise ValueError(f"{name}: kernel must be one of {KERNELS}; got {kernel!r}")
    if kernel == "torch":
        return False
    if kernel == "auto":
        return triton_available(teacher, student, variant)
    reason = unsupported_reason(teacher, student, variant)
    if reason is not None:
        raise ValueError(f"{name}: kernel='triton' cannot be used: {reason}; use kernel='torch' or 'auto'")
    if not teacher.query.is_cuda and not _interpreted():
        raise ValueError(
            f"{name}: kernel='triton' needs CUDA tensors (got {teacher.query.device}); on CPU it runs only in "
            "Triton's interpreter, which needs TRITON_INTERPRET=1 set before amad's kernels are first imported"
        )
    return True


# -- inputs as the kernels read them -------------------------------------------------------------------
def _pow2(n: int) -> int:
    return max(16, 1 << (max(n, 1) - 1).bit_length())


@dataclass
class _Pair:
    """Both sides as ``Side`` tuples plus the compile-time options shared by the kernels."""

    t: tuple
    s: tuple
    qmask: Tensor | None
    batch: int
    q_len: int
    k_len: int
    tiles: tuple[int, int, int, int]
    consts: dict

    def grid(self, over_keys: bool = False) -> tuple[int, int]:
        length, block = (self.k_len, self.tiles[1]) if over_keys else (self.q_len, self.tiles[0])
        return self.batch, -(-length // block)

    def launch(self, kernel, *args, over_keys: bool = False, **consts) -> None:
        qmask = self.dummy if self.qmask is None else self.qmask
        _launch(kernel, self.grid(over_keys), self.tiles, self.t, self.s, qmask, *args, self.q_len, self.k_len,
                **consts, **self.consts)

    @property
    def dummy(self) -> Tensor:
        return self.t.q


def _launch(kernel, grid: tuple[int, int], tiles: tuple[int, int, int, int], *args, **kwargs) -> None:
    """Run a kernel (the one place kernels are launched, so a compile-only check can replace it)."""
    kernel[grid](*args, **kwargs, num_warps=tiles[2], num_stages=tiles[3], enable_fp_fusion=True)


def _side(x: AttentionInputs, query: Tensor, key: Tensor):
    """``(Side, (has_bias, has_mask, causal), precision)`` of one model; broadcast bias/mask are not copied."""
    from ._triton_kernels import Side

    dtype = torch.promote_types(query.dtype, key.dtype)
    if dtype == torch.bfloat16 and _interpreted():
        dtype = torch.float32  # Triton 3.9's interpreter multiplies bfloat16 dot operands as raw uint16 bits
    q, k = query.detach().to(dtype).contiguous(), key.detach().to(dtype).contiguous()
    b, h, q_len, dim = q.shape
    full = (b, h, q_len, k.shape[2])
    bias, bias_strides = q, (0, 0, 0, 0)
    if x.bias is not None:
        bias = torch.broadcast_to(x.bias.detach(), full)
        bias_strides = tuple(bias.stride())
    mask, mask_strides = q, (0, 0, 0)
    if x.mask is not None:
        mask = torch.broadcast_to(x.mask.to(torch.uint8), (b, 1, q_len, full[3]))[:, 0]
        mask_strides = tuple(mask.stride())
    lse = torch.empty(b, h, q_len, device=q.device, dtype=torch.float32)
    side = Side(q, k, bias, mask, lse, bias_strides, mask_strides, h, dim, float(x.scaling))
    flags = (x.bias is not None, x.mask is not None, bool(x.causal))
    return side, flags, "ieee" if dtype == torch.float32 else "tf32"


def _pair(teacher: AttentionInputs, student: AttentionInputs, query: Tensor, key: Tensor, tiles) -> _Pair:
    t, t_flags, t_prec = _side(teacher, teacher.query, teacher.key)
    s, s_flags, s_prec = _side(student, query, key)
    masks = [m for m in (teacher.query_mask, student.query_mask) if m is not None]
    qmask = None
    if masks:
        qmask = (masks[0] & masks[-1]).to(device=query.device, dtype=torch.uint8).contiguous()
    consts = dict(TF=t_flags, SF=s_flags, HAS_QMASK=qmask is not None, HTP=_pow2(t.heads), HSP=_pow2(s.heads),
                  BDS=_pow2(s.dim), DC=DIM_CHUNK, BM=tiles[0], BN=tiles[1], PREC_T=t_prec, PREC_S=s_prec)
    return _Pair(t, s, qmask, query.shape[0], query.shape[2], key.shape[2], tiles, consts)


@dataclass
class _Stats:
    """Per query row statistics of the forward pass (float32)."""

    x_ts: Tensor  # (B, q, H_t, H_s)
    x_ss: Tensor  # (B, q, H_s, H_s)
    x_tt: Tensor | None  # (B, q, H_t, H_t), s2t only
    t_sq: Tensor  # (B, H_t, q)
    rs_t: Tensor  # (B, H_t, q) sum_j T
    rs_s: Tensor  # (B, H_s, q) sum_j S


def _forward_stats(pair: _Pair, need_tt: bool) -> _Stats:
    from ._triton_kernels import gram_kernel, lse_kernel

    c = pair.consts
    for side, flags, hp, prec in ((pair.t, c["TF"], c["HTP"], c["PREC_T"]), (pair.s, c["SF"], c["HSP"], c["PREC_S"])):
        _launch(lse_kernel, pair.grid(), pair.tiles, side, pair.q_len, pair.k_len, FLAGS=flags, HP=hp, BM=c["BM"],
                BN=c["BN"], PREC=prec, DC=c["DC"])
    b, q, ht, hs = pair.batch, pair.q_len, pair.t.heads, pair.s.heads
    new = lambda *shape: torch.empty(*shape, device=pair.t.q.device, dtype=torch.float32)  # noqa: E731
    stats = _Stats(new(b, q, ht, hs), new(b, q, hs, hs), new(b, q, ht, ht) if need_tt else None,
                   new(b, ht, q), new(b, ht, q), new(b, hs, q))
    pair.launch(gram_kernel, stats.x_ts, stats.x_ss, pair.dummy if stats.x_tt is None else stats.x_tt,
                stats.t_sq, stats.rs_t, stats.rs_s, NEED_TT=need_tt)
    _check_finite(pair, stats.x_ts, stats.x_ss, stats.rs_t)
    return stats


def _check_finite(pair: _Pair, *tensors: Tensor) -> None:
    if not all(bool(torch.isfinite(x).all()) for x in tensors):
        raise ValueError(
            f"fused amad: the Teacher ({pair.t.heads} heads) or Student ({pair.s.heads} heads) maps of "
            f"q={pair.q_len}, k={pair.k_len} contain NaN or infinite values (the attention logits overflow?)"
        )


@dataclass
class _KLGrad:
    """What the Student-gradient kernels need of variant 2: ``W``, ``WG = dL/dloss_b W``, ``beta``."""

    w: Tensor
    wg: Tensor
    beta: Tensor
    eps: float


def _student_backward(pair: _Pair, stats: _Stats, mt: Tensor, ms: Tensor, c: Tensor, delta: Tensor,
                      kl: _KLGrad | None, needs: tuple[bool, bool]) -> tuple[Tensor | None, Tensor | None]:
    """``dQ_s``, ``dK_s`` (float32) for ``D = Mt T + Ms S + c`` (+ the variant-2 term), given ``delta``."""
    from ._triton_kernels import grad_key_kernel, grad_query_kernel

    delta = delta + torch.einsum("bgh,bihg->bgi", mt, stats.x_ts) + torch.einsum("bgk,bigk->bgi", ms, stats.x_ss)
    delta = (delta + c[..., None] * stats.rs_s).contiguous()
    dummy = pair.dummy
    common = (mt.contiguous(), ms.contiguous(), c.contiguous(), delta,
              dummy if kl is None else kl.w, dummy if kl is None else kl.wg, dummy if kl is None else kl.beta,
              stats.rs_t, stats.rs_s, 0.0 if kl is None else kl.eps)
    grads: list[Tensor | None] = []
    for kernel, source, need, over_keys in ((grad_query_kernel, pair.s.q, needs[0], False),
                                            (grad_key_kernel, pair.s.k, needs[1], True)):
        out = torch.empty(source.shape, device=source.device, dtype=torch.float32) if need else None
        if need:
            pair.launch(kernel, *common, out, KL=kl is not None, over_keys=over_keys)
        grads.append(out)
    return grads[0], grads[1]


class _FusedGrams(torch.autograd.Function):
    """``(G_ts, G_ss, |t_i|^2, G_tt)`` of a pair; gradients for the Student's query and key."""

    @staticmethod
    def forward(ctx, pair: _Pair, need_tt: bool, query: Tensor, key: Tensor):
        stats = _forward_stats(pair, need_tt)
        ctx.pair, ctx.stats, ctx.dtypes = pair, stats, (query.dtype, key.dtype)
        g_tt = stats.x_tt.sum(dim=1) if need_tt else stats.t_sq.new_zeros(())
        ctx.mark_non_differentiable(g_tt)
        return stats.x_ts.sum(dim=1), stats.x_ss.sum(dim=1), stats.t_sq.sum(dim=-1), g_tt

    @staticmethod
    @once_differentiable
    def backward(ctx, d_ts: Tensor, d_ss: Tensor, _d_t_sq: Tensor, _d_tt: Tensor):
        pair, stats = ctx.pair, ctx.stats
        d_ts, d_ss = d_ts.float(), d_ss.float()
        zeros = stats.rs_s.new_zeros(pair.batch, pair.s.heads)
        dq, dk = _student_backward(pair, stats, d_ts.mT, d_ss + d_ss.mT, zeros, torch.zeros_like(stats.rs_s),
                                   None, ctx.needs_input_grad[2:4])
        return None, None, _cast(dq, ctx.dtypes[0]), _cast(dk, ctx.dtypes[1])


def _cast(grad: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if grad is None else grad.to(dtype)


def _kl_weights(g_ts: Tensor, t_sum: Tensor, s_sum: Tensor, t_sq: Tensor, s_sq: Tensor, cosine: bool,
                temperature: float) -> Tensor:
    """``W = A / s_sum`` with ``A = softmax_j(sim / temperature)``, ``sim = G_ts / (t_sum s_sum)`` or cosine."""
    scale = outer(safe_sqrt(t_sq), safe_sqrt(s_sq)) if cosine else outer(t_sum, s_sum)
    weights = torch.softmax(safe_normalize(g_ts, scale) / temperature, dim=-1)
    return safe_normalize(weights, s_sum[:, None, :])


class _FusedKL(torch.autograd.Function):
    """Per-sample variant-2 KL sums ``(B,)``; the small ``W`` graph is differentiated inside the backward."""

    @staticmethod
    def forward(ctx, pair: _Pair, cosine: bool, temperature: float, eps: float, query: Tensor, key: Tensor):
        from ._triton_kernels import kl_rows_kernel

        stats = _forward_stats(pair, need_tt=False)
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_() for x in
                      (stats.x_ts.sum(dim=1), stats.rs_s.sum(dim=-1), stats.x_ss.sum(dim=1).diagonal(dim1=1, dim2=2))]
            weights = _kl_weights(leaves[0], stats.rs_t.sum(dim=-1), leaves[1], stats.t_sq.sum(dim=-1), leaves[2],
                                  cosine, temperature)
        w = weights.detach().contiguous()
        out = torch.empty(pair.grid(), device=w.device, dtype=torch.float32)
        pair.launch(kl_rows_kernel, w, stats.rs_t, stats.rs_s, out, pair.dummy, pair.dummy, eps, BACKWARD=False)
        _check_finite(pair, out)
        ctx.pair, ctx.stats, ctx.graph, ctx.w, ctx.eps = pair, stats, (weights, leaves), w, eps
        ctx.dtypes = (query.dtype, key.dtype)
        return out.sum(dim=1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        from ._triton_kernels import kl_rows_kernel

        pair, stats, w, (weights, leaves) = ctx.pair, ctx.stats, ctx.w, ctx.graph
        beta = torch.empty_like(stats.rs_t)
        y = torch.empty_like(stats.x_ts)  # Y[b, i, h, g] = sum_j a_hij S_gij
        pair.launch(kl_rows_kernel, w, stats.rs_t, stats.rs_s, pair.dummy, beta, y, ctx.eps, BACKWARD=True)
        r = torch.einsum("bhg,bgi->bhi", w, stats.rs_s)
        inv_r = torch.where(r > 0, 1 / torch.where(r > 0, r, torch.ones_like(r)), torch.zeros_like(r))
        g = grad.float()[:, None, None]
        # dL/dW[h, g] = sum_i (Y[i, h, g] - beta_hi rs_gi) / r_hi, times dL/dloss_b
        d_w = g * (torch.einsum("bhi,bihg->bhg", inv_r, y) - torch.einsum("bhi,bgi->bhg", inv_r * beta, stats.rs_s))
        d_g_ts, d_s_sum, d_s_sq = (torch.zeros_like(x) if d is None else d for x, d in
                                   zip(leaves, torch.autograd.grad(weights, leaves, d_w, allow_unused=True)))
        wg = (g * w).contiguous()
        # sum_j S_gij (WG^T (a - beta) / r)_gij = sum_h WG[h, g] (Y[i, h, g] - beta_hi rs_gi) / r_hi
        delta = (torch.einsum("bhg,bhi,bihg->bgi", wg, inv_r, y)
                 - torch.einsum("bhg,bhi,bgi->bgi", wg, inv_r * beta, stats.rs_s))
        kl = _KLGrad(w, wg, beta, ctx.eps)
        dq, dk = _student_backward(pair, stats, d_g_ts.mT, torch.diag_embed(2 * d_s_sq), d_s_sum, delta, kl,
                                   ctx.needs_input_grad[4:6])
        return None, None, None, None, _cast(dq, ctx.dtypes[0]), _cast(dk, ctx.dtypes[1])


# -- entry points --------------------------------------------------------------------------------------
def fused_per_sample(teacher: AttentionInputs, student: AttentionInputs, *, variant: str, alignment: str,
                     temperature: float, eps: float, tiles: tuple[int, int, int, int] | None = None) -> Tensor:
    """Per-sample sums ``(B,)`` of the AMAD element losses (as the streaming form), in float32, by the kernels.

    Inputs must have been checked (``streaming.amad`` does it); ``tiles`` = (query rows, keys, warps,
    stages), default :data:`TILES`.
    """
    tiles = TILES if tiles is None else tiles

    if tiles[0] < 16 or tiles[1] < 16 or any(t & (t - 1) for t in tiles[:2]):
        raise ValueError(f"fused amad: tile sizes must be powers of two >= 16; got {tiles[:2]}")
    query, key = student.query, student.key
    pair = _pair(teacher.detach(), student, query, key, tiles)
    if variant == "kl":
        return _FusedKL.apply(pair, alignment == "cosine", temperature, eps, query, key)
    g_ts, g_ss, t_sq, g_tt = _FusedGrams.apply(pair, variant == "s2t", query, key)
    if variant == "s2t":
        return explained_rows_loss(g_ts.mT, g_tt, g_ss.diagonal(dim1=1, dim2=2), temperature)
    return explained_rows_loss(g_ts, g_ss, t_sq, temperature)
