"""Triton kernels of the fused streaming AMAD loss; imported only by ``_triton_amad`` when Triton is used.

Per sample ``b``, query rows ``i``, keys ``j``, Teacher heads ``h``, Student heads ``g``:
``P = exp(Q K^T * scaling + bias - lse)`` on the keys a model may attend (key mask,
causality), 0 elsewhere; ``V`` = entries valid for both models (both attendable masks
and both query masks); ``T = P_t V``, ``S = P_s V``. A program owns a block of ``BM``
query rows (or of ``BN`` keys) of one sample and every head at once: tiles are
``(heads, rows, keys)`` with the head count padded to ``HP`` (a power of two >= 16,
the smallest ``tl.dot`` operand), padded heads and rows are exactly 0.

* :func:`lse_kernel`: ``lse = log sum_j exp(logits)`` per head and row (online max/sum);
  ``+inf`` for a row with no attendable key, so its ``P`` is 0.
* :func:`gram_kernel`: per query row the Grams ``X_ts[i] = sum_j T_:ij S_:ij^T``,
  ``X_ss[i]`` (and ``X_tt[i]``), ``sum_j T^2`` and the row sums ``sum_j T``, ``sum_j S``.
* :func:`kl_rows_kernel`: variant 2 with ``M = W S`` (``W = A / s_sum``), ``t = T / rowsum``,
  ``m = M / rowsum``: the per-row KL sums (forward), or ``beta_hi = sum_j a_hij m_hij`` and
  ``Y[i] = sum_j a_:ij S_:ij^T`` with ``a = -(t + eps) / (m + eps)`` (backward).
* :func:`grad_query_kernel` / :func:`grad_key_kernel`: with ``D = dL/dS`` (see :func:`_student_grad`)
  and ``delta_gi = sum_j S_gij D_gij``, ``dlogits = P_s (V D - delta)``, then
  ``dQ = scaling dlogits K`` and ``dK = scaling dlogits^T Q``.
"""

from __future__ import annotations

from collections import namedtuple

import triton
import triton.language as tl

#: One model's side of the pair: contiguous ``q`` (B, H, Lq, d) and ``k`` (B, H, Lk, d); ``bias``/``mask``
#: with their (B, H, q, k) / (B, q, k) element strides (0 where broadcast); ``lse`` (B, H, Lq) float32.
Side = namedtuple("Side", ["q", "k", "bias", "mask", "lse", "bias_strides", "mask_strides", "heads", "dim", "scaling"])


@triton.jit
def _load_heads(ptr, b, heads, H, idx, L, dims, D):
    """``(HP, len(idx), BD)`` tile of a contiguous ``(B, H, L, D)`` tensor; zeros outside."""
    offs = ((b * H + heads[:, None, None]) * L + idx[None, :, None]) * D + dims[None, None, :]
    ok = (heads < H)[:, None, None] & (idx < L)[None, :, None] & (dims < D)[None, None, :]
    return tl.load(ptr + offs, mask=ok, other=0.0)


@triton.jit
def _row_vectors(ptr, b, heads, H, rows, Q_LEN, other):
    """``(HP, BM)`` tile of a contiguous ``(B, H, Q_LEN)`` float32 tensor."""
    ok = (heads < H)[:, None] & (rows < Q_LEN)[None, :]
    return tl.load(ptr + (b * H + heads[:, None]) * Q_LEN + rows[None, :], mask=ok, other=other)


@triton.jit
def _store_rows(ptr, x, b, heads, H, rows, Q_LEN):
    ok = (heads < H)[:, None] & (rows < Q_LEN)[None, :]
    tl.store(ptr + (b * H + heads[:, None]) * Q_LEN + rows[None, :], x, mask=ok)


@triton.jit
def _head_matrix(ptr, b, rows_idx, R, cols_idx, C):
    """``(len(rows_idx), len(cols_idx))`` tile of a contiguous ``(B, R, C)`` float32 tensor."""
    ok = (rows_idx < R)[:, None] & (cols_idx < C)[None, :]
    return tl.load(ptr + (b * R + rows_idx[:, None]) * C + cols_idx[None, :], mask=ok, other=0.0)


@triton.jit
def _store_row_grams(ptr, x, b, rows, Q_LEN, ha, HA, hb, HB):
    """Store ``(BM, HAP, HBP)`` per-row Grams into a contiguous ``(B, Q_LEN, HA, HB)`` tensor."""
    offs = ((b * Q_LEN + rows[:, None, None]) * HA + ha[None, :, None]) * HB + hb[None, None, :]
    ok = (rows < Q_LEN)[:, None, None] & (ha < HA)[None, :, None] & (hb < HB)[None, None, :]
    tl.store(ptr + offs, x, mask=ok)


@triton.jit
def _attendable(side, b, rows, cols, Q_LEN, K_LEN, FLAGS: tl.constexpr):
    """``(BM, BN)``: keys the model may attend (in range, causal ``j <= i + K_LEN - Q_LEN``, key mask)."""
    ok = (rows < Q_LEN)[:, None] & (cols < K_LEN)[None, :]
    if FLAGS[2]:
        ok = ok & (cols[None, :] <= rows[:, None] + (K_LEN - Q_LEN))
    if FLAGS[1]:
        st = side.mask_strides
        offs = b * st[0] + rows[:, None] * st[1] + cols[None, :] * st[2]
        ok = ok & (tl.load(side.mask + offs, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _logits(side, b, heads, rows, cols, ok, Q_LEN, K_LEN, FLAGS: tl.constexpr, PREC: tl.constexpr,
            DC: tl.constexpr):
    """``(HP, BM, BN)`` float32 ``Q K^T * scaling + bias`` (bias read only where ``ok``).

    Q and K are read ``DC`` head dimensions at a time, so no ``(HP, rows, d)`` tile stays live.
    """
    x = tl.zeros((heads.shape[0], rows.shape[0], cols.shape[0]), tl.float32)
    for start in range(0, side.dim, DC):
        dims = start + tl.arange(0, DC)
        qc = _load_heads(side.q, b, heads, side.heads, rows, Q_LEN, dims, side.dim)
        kc = _load_heads(side.k, b, heads, side.heads, cols, K_LEN, dims, side.dim)
        x += tl.dot(qc, tl.permute(kc, (0, 2, 1)), input_precision=PREC)
    x = x * side.scaling
    if FLAGS[0]:
        st = side.bias_strides
        offs = b * st[0] + heads[:, None, None] * st[1] + rows[None, :, None] * st[2] + cols[None, None, :] * st[3]
        in_range = (heads < side.heads)[:, None, None] & ok[None, :, :]
        x += tl.load(side.bias + offs, mask=in_range, other=0.0).to(tl.float32)
    return x


@triton.jit
def _probs(side, b, heads, rows, cols, ok, Q_LEN, K_LEN, FLAGS: tl.constexpr, PREC: tl.constexpr, DC: tl.constexpr):
    """``(HP, BM, BN)`` probabilities ``exp(logits - lse)`` where attendable, else 0."""
    lse = _row_vectors(side.lse, b, heads, side.heads, rows, Q_LEN, float("inf"))
    x = _logits(side, b, heads, rows, cols, ok, Q_LEN, K_LEN, FLAGS, PREC, DC)
    return tl.where(ok[None, :, :], tl.exp(x - lse[:, :, None]), 0.0)


@triton.jit
def _pair(t, s, b, ht, hs, rows, cols, QMASK, Q_LEN, K_LEN, TF: tl.constexpr, SF: tl.constexpr,
          HAS_QMASK: tl.constexpr, PREC_T: tl.constexpr, PREC_S: tl.constexpr, DC: tl.constexpr):
    """``T = P_t V`` ``(HTP, BM, BN)``, ``P_s`` ``(HSP, BM, BN)`` (not multiplied by V) and ``V`` ``(BM, BN)``."""
    ok_t = _attendable(t, b, rows, cols, Q_LEN, K_LEN, TF)
    ok_s = _attendable(s, b, rows, cols, Q_LEN, K_LEN, SF)
    valid = ok_t & ok_s
    if HAS_QMASK:
        valid = valid & (tl.load(QMASK + b * Q_LEN + rows, mask=rows < Q_LEN, other=0) != 0)[:, None]
    p_t = _probs(t, b, ht, rows, cols, ok_t, Q_LEN, K_LEN, TF, PREC_T, DC)
    p_s = _probs(s, b, hs, rows, cols, ok_s, Q_LEN, K_LEN, SF, PREC_S, DC)
    return tl.where(valid[None, :, :], p_t, 0.0), p_s, valid


@triton.jit
def _mix(w, x):
    """``(HA, BM, BN)`` = ``w (HA, HB) @ x (HB, BM, BN)`` over the first axis, in float32."""
    hb: tl.constexpr = x.shape[0]
    bm: tl.constexpr = x.shape[1]
    bn: tl.constexpr = x.shape[2]
    ha: tl.constexpr = w.shape[0]
    flat = tl.dot(w, tl.reshape(x, (hb, bm * bn)), input_precision="ieee")
    return tl.reshape(flat, (ha, bm, bn))


@triton.jit
def _row_grams(x, y):
    """``(BM, HXP, HYP)``: per query row ``sum_j x_:ij y_:ij^T`` of ``(HXP, BM, BN)`` and ``(HYP, BM, BN)`` tiles."""
    return tl.dot(tl.permute(x, (1, 0, 2)), tl.permute(y, (1, 2, 0)), input_precision="ieee")


@triton.jit
def _kl_rows(W, RST, RSS, BETA, b, ht, hs, HT, HS, rows, Q_LEN):
    """``W`` ``(HTP, HSP)``; Teacher row sums ``rt``, mixture row sums ``r = W rs_s`` and ``beta`` ``(HTP, BM)``."""
    w = _head_matrix(W, b, ht, HT, hs, HS)
    rt = _row_vectors(RST, b, ht, HT, rows, Q_LEN, 0.0)
    rs = _row_vectors(RSS, b, hs, HS, rows, Q_LEN, 0.0)
    beta = _row_vectors(BETA, b, ht, HT, rows, Q_LEN, 0.0)
    return w, rt, tl.dot(w, rs, input_precision="ieee"), beta


@triton.jit
def _kl_parts(w, rt, r, t, s, valid, ht, HT, EPS):
    """Target ``t = T / rt``, prediction ``m = W S / r`` and where an element counts."""
    keep = valid[None, :, :] & (ht < HT)[:, None, None]
    tn = tl.where(rt[:, :, None] > 0, t / tl.where(rt > 0, rt, 1.0)[:, :, None], 0.0)
    mn = tl.where(r[:, :, None] > 0, _mix(w, s) / tl.where(r > 0, r, 1.0)[:, :, None], 0.0)
    return tn, mn, keep


@triton.jit
def _grad_operands(MT, MS, C, WG, b, ht, hs, HT, HS, KL: tl.constexpr):
    """The ``(HSP, HTP)`` ``Mt``, ``(HSP, HSP)`` ``Ms``, ``(HSP,)`` ``c`` and, for variant 2, ``WG^T``."""
    mt = _head_matrix(MT, b, hs, HS, ht, HT)
    wgt = mt
    if KL:
        wgt = tl.trans(_head_matrix(WG, b, ht, HT, hs, HS))
    return mt, _head_matrix(MS, b, hs, HS, hs, HS), tl.load(C + b * HS + hs, mask=hs < HS, other=0.0), wgt


@triton.jit
def _student_grad(t, s, valid, ht, HT, ops, kl, KL: tl.constexpr, EPS):
    """``D = dL/dS`` ``(HSP, BM, BN)``: ``Mt T + Ms S + c`` and, for variant 2, ``WG^T (a - beta) / r``."""
    mt, ms, c, wgt = ops
    d = c[:, None, None] + tl.zeros(s.shape, tl.float32)
    if KL:
        w, rt, r, beta = kl
        tn, mn, keep = _kl_parts(w, rt, r, t, s, valid, ht, HT, EPS)
        a = -(tn + EPS) / (mn + EPS)
        dm = tl.where(keep & (r[:, :, None] > 0), (a - beta[:, :, None]) / tl.where(r > 0, r, 1.0)[:, :, None], 0.0)
        d += _mix(wgt, dm)
    return d + _mix(mt, t) + _mix(ms, s)


@triton.jit
def _causal_end(start, BLOCK, Q_LEN, K_LEN, CAUSAL: tl.constexpr):
    """One past the last key a causal block of rows ``start:start+BLOCK`` may attend."""
    if CAUSAL:
        return tl.maximum(tl.minimum(K_LEN, start + BLOCK + K_LEN - Q_LEN), 0)
    return K_LEN


# ---------------------------------------------------------------------------------------------------------
@triton.jit
def lse_kernel(side, Q_LEN, K_LEN, FLAGS: tl.constexpr, HP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               PREC: tl.constexpr, DC: tl.constexpr):
    """``side.lse[b, h, i] = log sum_j exp(logits_hij)`` over attendable keys (``+inf`` if none)."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    heads = tl.arange(0, HP)
    peak = tl.full((HP, BM), float("-inf"), tl.float32)
    total = tl.zeros((HP, BM), tl.float32)
    for start in range(0, _causal_end(tl.program_id(1) * BM, BM, Q_LEN, K_LEN, FLAGS[2]), BN):
        cols = start + tl.arange(0, BN)
        ok = _attendable(side, b, rows, cols, Q_LEN, K_LEN, FLAGS)
        x = _logits(side, b, heads, rows, cols, ok, Q_LEN, K_LEN, FLAGS, PREC, DC)
        x = tl.where(ok[None, :, :], x, float("-inf"))
        new_peak = tl.maximum(peak, tl.max(x, axis=2))
        shift = tl.where(new_peak == float("-inf"), 0.0, new_peak)
        total = total * tl.exp(peak - shift) + tl.sum(tl.exp(x - shift[:, :, None]), axis=2)
        peak = new_peak
    lse = tl.where(total > 0, peak + tl.log(tl.where(total > 0, total, 1.0)), float("inf"))
    _store_rows(side.lse, lse, b, heads, side.heads, rows, Q_LEN)


@triton.jit
def gram_kernel(t, s, QMASK, XTS, XSS, XTT, TSQ, RST, RSS, Q_LEN, K_LEN,
                TF: tl.constexpr, SF: tl.constexpr, HAS_QMASK: tl.constexpr, NEED_TT: tl.constexpr,
                HTP: tl.constexpr, HSP: tl.constexpr, BDS: tl.constexpr, DC: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, PREC_T: tl.constexpr, PREC_S: tl.constexpr):
    """Per query row: ``X_ts``, ``X_ss`` (``X_tt``), ``sum_j T^2``, ``sum_j T``, ``sum_j S``."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    ht, hs = tl.arange(0, HTP), tl.arange(0, HSP)
    x_ts = tl.zeros((BM, HTP, HSP), tl.float32)
    x_ss = tl.zeros((BM, HSP, HSP), tl.float32)
    x_tt = tl.zeros((BM, HTP, HTP), tl.float32)
    t_sq, t_sum = tl.zeros((HTP, BM), tl.float32), tl.zeros((HTP, BM), tl.float32)
    s_sum = tl.zeros((HSP, BM), tl.float32)
    for start in range(0, _causal_end(tl.program_id(1) * BM, BM, Q_LEN, K_LEN, TF[2] or SF[2]), BN):
        cols = start + tl.arange(0, BN)
        tp, p_s, valid = _pair(t, s, b, ht, hs, rows, cols, QMASK, Q_LEN, K_LEN, TF, SF, HAS_QMASK, PREC_T, PREC_S, DC)
        sp = tl.where(valid[None, :, :], p_s, 0.0)
        x_ts += _row_grams(tp, sp)
        x_ss += _row_grams(sp, sp)
        if NEED_TT:
            x_tt += _row_grams(tp, tp)
        t_sq += tl.sum(tp * tp, axis=2)
        t_sum += tl.sum(tp, axis=2)
        s_sum += tl.sum(sp, axis=2)
    _store_row_grams(XTS, x_ts, b, rows, Q_LEN, ht, t.heads, hs, s.heads)
    _store_row_grams(XSS, x_ss, b, rows, Q_LEN, hs, s.heads, hs, s.heads)
    if NEED_TT:
        _store_row_grams(XTT, x_tt, b, rows, Q_LEN, ht, t.heads, ht, t.heads)
    _store_rows(TSQ, t_sq, b, ht, t.heads, rows, Q_LEN)
    _store_rows(RST, t_sum, b, ht, t.heads, rows, Q_LEN)
    _store_rows(RSS, s_sum, b, hs, s.heads, rows, Q_LEN)


@triton.jit
def kl_rows_kernel(t, s, QMASK, W, RST, RSS, OUT, BETA, Y, EPS, Q_LEN, K_LEN, BACKWARD: tl.constexpr,
                   TF: tl.constexpr, SF: tl.constexpr, HAS_QMASK: tl.constexpr,
                   HTP: tl.constexpr, HSP: tl.constexpr, BDS: tl.constexpr, DC: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, PREC_T: tl.constexpr, PREC_S: tl.constexpr):
    """Forward: ``OUT[b, block] = sum (t + eps)(log(t + eps) - log(m + eps))`` over valid elements.

    Backward: ``BETA[b, h, i] = sum_j a_hij m_hij`` and ``Y[b, i] = sum_j a_:ij S_:ij^T``.
    """
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    ht, hs = tl.arange(0, HTP), tl.arange(0, HSP)
    w, rt, r, _ = _kl_rows(W, RST, RSS, RST, b, ht, hs, t.heads, s.heads, rows, Q_LEN)
    total = tl.zeros((HTP, BM), tl.float32)
    y = tl.zeros((BM, HTP, HSP), tl.float32)
    for start in range(0, _causal_end(tl.program_id(1) * BM, BM, Q_LEN, K_LEN, TF[2] or SF[2]), BN):
        cols = start + tl.arange(0, BN)
        tp, p_s, valid = _pair(t, s, b, ht, hs, rows, cols, QMASK, Q_LEN, K_LEN, TF, SF, HAS_QMASK, PREC_T, PREC_S, DC)
        sp = tl.where(valid[None, :, :], p_s, 0.0)
        tn, mn, keep = _kl_parts(w, rt, r, tp, sp, valid, ht, t.heads, EPS)
        if BACKWARD:
            a = tl.where(keep, -(tn + EPS) / (mn + EPS), 0.0)
            total += tl.sum(a * mn, axis=2)
            y += _row_grams(a, sp)
        else:
            total += tl.sum(tl.where(keep, (tn + EPS) * (tl.log(tn + EPS) - tl.log(mn + EPS)), 0.0), axis=2)
    if BACKWARD:
        _store_rows(BETA, total, b, ht, t.heads, rows, Q_LEN)
        _store_row_grams(Y, y, b, rows, Q_LEN, ht, t.heads, hs, s.heads)
    else:
        tl.store(OUT + b * tl.num_programs(1) + tl.program_id(1), tl.sum(tl.sum(total, axis=1), axis=0))


@triton.jit
def _dlogits(t, s, b, ht, hs, rows, cols, QMASK, Q_LEN, K_LEN, ops, kl, delta, EPS, KL: tl.constexpr,
             TF: tl.constexpr, SF: tl.constexpr, HAS_QMASK: tl.constexpr, PREC_T: tl.constexpr, PREC_S: tl.constexpr,
             DC: tl.constexpr):
    """``(HSP, BM, BN)`` gradient of the Student's logits: ``P_s (V D - delta)``."""
    tp, p_s, valid = _pair(t, s, b, ht, hs, rows, cols, QMASK, Q_LEN, K_LEN, TF, SF, HAS_QMASK, PREC_T, PREC_S, DC)
    d = _student_grad(tp, tl.where(valid[None, :, :], p_s, 0.0), valid, ht, t.heads, ops, kl, KL, EPS)
    return p_s * (tl.where(valid[None, :, :], d, 0.0) - delta[:, :, None])


@triton.jit
def grad_query_kernel(t, s, QMASK, MT, MS, C, DELTA, W, WG, BETA, RST, RSS, EPS, DQ, Q_LEN, K_LEN,
                      KL: tl.constexpr, TF: tl.constexpr, SF: tl.constexpr, HAS_QMASK: tl.constexpr,
                      HTP: tl.constexpr, HSP: tl.constexpr, BDS: tl.constexpr, DC: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, PREC_T: tl.constexpr, PREC_S: tl.constexpr):
    """``DQ[b, :, rows] = scaling * sum_j P_s (V D - delta) K_s`` (float32)."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    ht, hs, ds = tl.arange(0, HTP), tl.arange(0, HSP), tl.arange(0, BDS)
    dq = tl.zeros((HSP, BM, BDS), tl.float32)
    ops = _grad_operands(MT, MS, C, WG, b, ht, hs, t.heads, s.heads, KL)
    kl = ops
    if KL:
        kl = _kl_rows(W, RST, RSS, BETA, b, ht, hs, t.heads, s.heads, rows, Q_LEN)
    delta = _row_vectors(DELTA, b, hs, s.heads, rows, Q_LEN, 0.0)
    for start in range(0, _causal_end(tl.program_id(1) * BM, BM, Q_LEN, K_LEN, SF[2]), BN):
        cols = start + tl.arange(0, BN)
        dlogits = _dlogits(t, s, b, ht, hs, rows, cols, QMASK, Q_LEN, K_LEN, ops, kl, delta, EPS, KL, TF, SF,
                           HAS_QMASK, PREC_T, PREC_S, DC)
        keys = _load_heads(s.k, b, hs, s.heads, cols, K_LEN, ds, s.dim)
        dq += tl.dot(dlogits.to(keys.dtype), keys, input_precision=PREC_S)
    offs = ((b * s.heads + hs[:, None, None]) * Q_LEN + rows[None, :, None]) * s.dim + ds[None, None, :]
    ok = (hs < s.heads)[:, None, None] & (rows < Q_LEN)[None, :, None] & (ds < s.dim)[None, None, :]
    tl.store(DQ + offs, dq * s.scaling, mask=ok)


@triton.jit
def grad_key_kernel(t, s, QMASK, MT, MS, C, DELTA, W, WG, BETA, RST, RSS, EPS, DK, Q_LEN, K_LEN,
                    KL: tl.constexpr, TF: tl.constexpr, SF: tl.constexpr, HAS_QMASK: tl.constexpr,
                    HTP: tl.constexpr, HSP: tl.constexpr, BDS: tl.constexpr, DC: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, PREC_T: tl.constexpr, PREC_S: tl.constexpr):
    """``DK[b, :, cols] = scaling * sum_i (P_s (V D - delta))^T Q_s`` (float32)."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    ht, hs, ds = tl.arange(0, HTP), tl.arange(0, HSP), tl.arange(0, BDS)
    dk = tl.zeros((HSP, BN, BDS), tl.float32)
    ops = _grad_operands(MT, MS, C, WG, b, ht, hs, t.heads, s.heads, KL)
    first = 0
    if SF[2]:  # causal Student: rows before (first key - (K_LEN - Q_LEN)) attend none of these keys
        first = tl.maximum(tl.program_id(1) * BN - (K_LEN - Q_LEN), 0) // BM * BM
    for start in range(first, Q_LEN, BM):
        rows = start + tl.arange(0, BM)
        kl = ops
        if KL:
            kl = _kl_rows(W, RST, RSS, BETA, b, ht, hs, t.heads, s.heads, rows, Q_LEN)
        delta = _row_vectors(DELTA, b, hs, s.heads, rows, Q_LEN, 0.0)
        dlogits = _dlogits(t, s, b, ht, hs, rows, cols, QMASK, Q_LEN, K_LEN, ops, kl, delta, EPS, KL, TF, SF,
                           HAS_QMASK, PREC_T, PREC_S, DC)
        queries = _load_heads(s.q, b, hs, s.heads, rows, Q_LEN, ds, s.dim)
        dk += tl.dot(tl.permute(dlogits, (0, 2, 1)).to(queries.dtype), queries, input_precision=PREC_S)
    offs = ((b * s.heads + hs[:, None, None]) * K_LEN + cols[None, :, None]) * s.dim + ds[None, None, :]
    ok = (hs < s.heads)[:, None, None] & (cols < K_LEN)[None, :, None] & (ds < s.dim)[None, None, :]
    tl.store(DK + offs, dk * s.scaling, mask=ok)


__all__ = ["Side", "lse_kernel", "gram_kernel", "kl_rows_kernel", "grad_query_kernel", "grad_key_kernel", "triton"]
