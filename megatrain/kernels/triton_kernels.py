"""Triton kernels behind megatrain.model.kernels (imported only where Triton is installed).

Each kernel reads its inputs once and writes its outputs once; arithmetic is
fp32 in registers whatever the storage dtype. The launchers and autograd
wrappers live in :mod:`megatrain.kernels.ops` and
:mod:`megatrain.kernels.linear_ce`; the plain-PyTorch references they must
match live in :mod:`megatrain.model.kernels`.
"""

from __future__ import annotations

import triton
import triton.language as tl


# --------------------------------------------------------------------------- RMSNorm


@triton.jit
def rms_norm_fwd_kernel(X, DELTA, S, W, Y, RSTD, stride_x, stride_d, stride_s, stride_y, C, eps,
                        BLOCK: tl.constexpr, HAS_DELTA: tl.constexpr):
    """One row per program: y = w * cast(x * rstd). The cast to x's dtype before the weight
    multiply is Hugging Face's order, so bf16 results round where the reference rounds.
    With ``HAS_DELTA`` the row is first x + delta (the residual add), rounded to x's dtype and
    stored to S: the sum is written once and never read back for the norm."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < C
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        x = (x.to(tl.float32) + tl.load(DELTA + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(S.dtype.element_ty)
        tl.store(S + row * stride_s + cols, x, mask=mask)
    x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps)
    xhat = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * xhat).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PART, DS, stride_dy, stride_x, stride_dx, stride_ds, N, C,
                        BLOCK: tl.constexpr, HAS_DS: tl.constexpr):
    """Rows pid, pid + G, pid + 2G ... per program (G programs): dx per row, and this program's
    partial sum of dw (summed over programs by the caller, in fp32). With ``HAS_DS`` the gradient
    arriving along the residual stream is added to dx here instead of in a separate pass."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < C
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, tl.cdiv(N - pid, nprog)):
        r = pid.to(tl.int64) + i * nprog
        x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r)
        xhat = x * rstd
        dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / C))
        if HAS_DS:
            dx += tl.load(DS + r * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + r * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PART + pid * C + cols, dw, mask=mask)


# --------------------------------------------------------------------------- SwiGLU


@triton.jit
def swiglu_fwd_kernel(GU, Y, F, stride_gu, stride_y, BLOCK: tl.constexpr):
    """y = cast(silu(gate)) * up for a row laid out [gate | up] (the reference rounds silu first)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    g = tl.load(GU + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * stride_gu + F + cols, mask=mask, other=0.0).to(tl.float32)
    s = (g * tl.sigmoid(g)).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (s * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_bwd_kernel(DY, GU, DGU, F, stride_dy, stride_gu, stride_dgu, BLOCK: tl.constexpr):
    """d gate = dy * up * silu'(gate), d up = dy * silu(gate), written side by side like the input."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GU + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * stride_gu + F + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DGU + row * stride_dgu + cols, dg.to(DGU.dtype.element_ty), mask=mask)
    tl.store(DGU + row * stride_dgu + F + cols, (dy * silu).to(DGU.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- RoPE


@triton.jit
def rope_kernel(X, COS, SIN, Y, T, NH, stride_xb, stride_xt, stride_xh, stride_yb, stride_yt, stride_yh,
                stride_cos_b, stride_cos, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr):
    """All heads of one (b, t) per program, "rotate half" layout: y1 = x1 c - x2 s, y2 = x2 c + x1 s.
    The backward pass is the inverse rotation (s -> -s), the transpose of this orthogonal map.
    ``stride_cos_b`` is 0 for one (T, D) table, or the batch stride of per-sample (B, T, D) tables."""
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HALF)[None, :]
    mask = h < NH
    c = tl.load(COS + b * stride_cos_b + t * stride_cos + d).to(tl.float32)
    s = tl.load(SIN + b * stride_cos_b + t * stride_cos + d).to(tl.float32)
    if BACKWARD:
        s = -s
    xp = X + b * stride_xb + t * stride_xt + h * stride_xh + d
    x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
    yp = Y + b * stride_yb + t * stride_yt + h * stride_yh + d
    tl.store(yp, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(yp + HALF, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- cross-entropy over logits rows


@triton.jit
def ce_stats_kernel(Z, LABELS, MAX, SUMEXP, TARGET, stride_z, V, vocab_start, ignore_index,
                    BLOCK: tl.constexpr):
    """Per row of local logits: max, sum(exp(z - max)) (online, one pass) and the target logit
    (0 where the label is ignored or lives on another TP rank's slice of the vocabulary).
    The running max is a scalar per row, so each logit costs one exp (a per-lane running max
    would rescale every lane at every block: twice the exps, and this pass is exp-bound)."""
    row = tl.program_id(0).to(tl.int64)
    base = Z + row * stride_z
    cols = tl.arange(0, BLOCK)
    # fp32 scalars (loop-carried values keep one type); the first block always holds a real logit
    m = tl.max(tl.full((BLOCK,), float("-inf"), tl.float32), axis=0)
    acc = tl.sum(tl.zeros((BLOCK,), tl.float32), axis=0)
    for start in range(0, V, BLOCK):
        z = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    label = tl.load(LABELS + row).to(tl.int64)
    local = label - vocab_start
    inside = (label != ignore_index) & (local >= 0) & (local < V)
    target = tl.load(base + tl.where(inside, local, 0)).to(tl.float32)
    tl.store(MAX + row, m)
    tl.store(SUMEXP + row, acc)
    tl.store(TARGET + row, tl.where(inside, target, 0.0))


@triton.jit
def ce_grad_kernel(Z, LABELS, LSE, SCALE, stride_z, V, vocab_start, ignore_index, BLOCK: tl.constexpr):
    """In place: z <- (softmax(z) - onehot(label)) * scale, rows with an ignored label <- 0.
    ``lse`` is the global log-sum-exp (all TP ranks), ``scale`` a one-element device tensor
    (1 / number of counted tokens), so no value ever travels to the host."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    label = tl.load(LABELS + row).to(tl.int64)
    lse = tl.load(LSE + row)
    scale = tl.load(SCALE)
    keep = label != ignore_index
    z = tl.load(Z + row * stride_z + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.exp(z - lse) - tl.where(cols == label - vocab_start, 1.0, 0.0)
    g = tl.where(keep, g * scale, 0.0)
    tl.store(Z + row * stride_z + cols, g.to(Z.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- fused QKV split + RoPE


@triton.jit
def qkv_rope_kernel(QKV, COS, SIN, Q, K, V, T, R2, NROWS, stride_b, stride_t, sqb, sqt, sqh, skb, skt, skh,
                    svb, svt, svh, stride_cos_b, stride_cos, HALF: tl.constexpr, BLOCK_R: tl.constexpr,
                    BACKWARD: tl.constexpr):
    """One (b, t) per program over the fused projection's rows ``(K, r + 2, D)``: slot s < r of group g is
    query head g r + s, slot r the key of group g, slot r + 1 its value (not rotated).

    Forward reads the QKV row once and writes q, k (rotated) and v. Backward (``BACKWARD``) reads dq, dk, dv
    and writes the whole dQKV row once, with the inverse rotation: no zero-filled slices to sum."""
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    j = tl.arange(0, BLOCK_R)[:, None]  # row of (K, r+2) flattened
    d = tl.arange(0, HALF)[None, :]
    g = j // R2
    slot = j % R2
    live = j < NROWS
    is_q = live & (slot < R2 - 2)
    is_k = live & (slot == R2 - 2)
    is_v = live & (slot == R2 - 1)
    c = tl.load(COS + b * stride_cos_b + t * stride_cos + d).to(tl.float32)
    s = tl.load(SIN + b * stride_cos_b + t * stride_cos + d).to(tl.float32)
    c = tl.where(is_v, 1.0, c)  # values pass through unrotated
    s = tl.where(is_v, 0.0, s)
    if BACKWARD:
        s = -s
    qp = Q + b * sqb + t * sqt + (g * (R2 - 2) + slot) * sqh + d
    kp = K + b * skb + t * skt + g * skh + d
    vp = V + b * svb + t * svt + g * svh + d
    rowp = QKV + b * stride_b + t * stride_t + j * (2 * HALF) + d
    if BACKWARD:
        x1 = (tl.load(qp, mask=is_q, other=0.0).to(tl.float32) + tl.load(kp, mask=is_k, other=0.0).to(tl.float32)
              + tl.load(vp, mask=is_v, other=0.0).to(tl.float32))
        x2 = (tl.load(qp + HALF, mask=is_q, other=0.0).to(tl.float32)
              + tl.load(kp + HALF, mask=is_k, other=0.0).to(tl.float32)
              + tl.load(vp + HALF, mask=is_v, other=0.0).to(tl.float32))
        tl.store(rowp, (x1 * c - x2 * s).to(QKV.dtype.element_ty), mask=live)
        tl.store(rowp + HALF, (x2 * c + x1 * s).to(QKV.dtype.element_ty), mask=live)
    else:
        x1 = tl.load(rowp, mask=live, other=0.0).to(tl.float32)
        x2 = tl.load(rowp + HALF, mask=live, other=0.0).to(tl.float32)
        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s
        tl.store(qp, y1.to(Q.dtype.element_ty), mask=is_q)
        tl.store(qp + HALF, y2.to(Q.dtype.element_ty), mask=is_q)
        tl.store(kp, y1.to(K.dtype.element_ty), mask=is_k)
        tl.store(kp + HALF, y2.to(K.dtype.element_ty), mask=is_k)
        tl.store(vp, y1.to(V.dtype.element_ty), mask=is_v)
        tl.store(vp + HALF, y2.to(V.dtype.element_ty), mask=is_v)
