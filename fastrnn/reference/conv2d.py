"""2-D convolution reference: readable NumPy, PyTorch's conv2d (cross-correlation), NCHW.

The numbered steps (C1..C4 forward, CB1..CB5 backward) are cited by the CPU and CUDA kernels.
``K = Cg * KH * KW`` is the length of one column (Cg = C / groups input channels per group,
Fg = F / groups output channels per group), ``L = OH * OW`` the number of output positions::

    C1  xp  = x zero-padded by (ph, pw) on each side                       (N,C,Hp,Wp)
    C2  im2col: cols[n, c, i, j, oh, ow] = xp[n, c, oh*sh + i*dh, ow*sw + j*dw]  (N,C,KH,KW,OH,OW)
    C3  per group g: y[n, g] = w[g] (Fg, K) @ cols[n, g] (K, L)       (one GEMM per image and group)
    C4  y += b[f]

    CB1 db[f]  = sum over n, oh, ow of dy[n, f, oh, ow]
    CB2 per group g: dw[g] = sum over n of dy[n, g] (Fg, L) @ cols[n, g]^T (L, K)
    CB3 per group g: dcols[n, g] = w[g]^T (K, Fg) @ dy[n, g] (Fg, L)
    CB4 col2im: dxp[n, c, oh*sh + i*dh, ow*sw + j*dw] += dcols[n, c, i, j, oh, ow]
        (the transpose of C2: every tap (i, j) adds into its own strided slice)
    CB5 dx = dxp without the padding

The backward recomputes the columns from the saved ``x`` (C2) instead of keeping them.
"""

from __future__ import annotations

from typing import Any

from fastrnn.context import Context
from fastrnn.reference._common import get_xp


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _tap(i: int, j: int, OH: int, OW: int, stride, dilation) -> tuple[slice, slice]:
    """The (rows, cols) slice of the padded input that kernel tap (i, j) reads (C2, CB4)."""
    sh, sw = stride
    dh, dw = dilation
    rows = slice(i * dh, i * dh + sh * (OH - 1) + 1, sh)
    cols = slice(j * dw, j * dw + sw * (OW - 1) + 1, sw)
    return rows, cols


def _im2col(xp: Any, x: Any, KH: int, KW: int, OH: int, OW: int, stride, padding, dilation):
    """C1 + C2: (N, C, H, W) -> cols (N, C, KH, KW, OH, OW)."""
    N, C, _, _ = x.shape
    ph, pw = padding
    xpad = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))  # C1
    cols = xp.empty((N, C, KH, KW, OH, OW), dtype=x.dtype)
    for i in range(KH):  # C2
        for j in range(KW):
            rows, cs = _tap(i, j, OH, OW, stride, dilation)
            cols[:, :, i, j] = xpad[:, :, rows, cs]
    return cols


def conv2d_forward(x, w, b=None, *, stride=1, padding=0, dilation=1, groups=1, training=True):
    """x (N,C,H,W); w (F,C/groups,KH,KW); b (F,) or None -> y (N,F,OH,OW), ctx."""
    xp = get_xp(x)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    N, C, H, W = x.shape
    F, Cg, KH, KW = w.shape
    G = int(groups)
    Fg = F // G
    OH = _out_size(H, KH, stride[0], padding[0], dilation[0])
    OW = _out_size(W, KW, stride[1], padding[1], dilation[1])
    K, L = Cg * KH * KW, OH * OW

    cols = _im2col(xp, x, KH, KW, OH, OW, stride, padding, dilation)  # C1, C2
    cols = cols.reshape(N, G, K, L)
    wg = w.reshape(G, Fg, K)
    y = xp.empty((N, G, Fg, L), dtype=x.dtype)
    for g in range(G):  # C3
        y[:, g] = xp.matmul(wg[g], cols[:, g])
    y = y.reshape(N, F, OH, OW)
    if b is not None:  # C4
        y += b.reshape(1, F, 1, 1)

    ctx = None
    if training:
        ctx = Context(
            op="conv2d",
            backend="numpy",
            dtype=x.dtype,
            cupy=xp.__name__ == "cupy",
            grad_shapes={"dy": y.shape},
            saved=dict(
                x=x,
                w=w,
                has_bias=b is not None,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=G,
            ),
        )
    return y, ctx


def conv2d_backward(ctx, dy):
    """dy (N,F,OH,OW) -> dx (N,C,H,W), dw (F,C/groups,KH,KW), db (F,) or None."""
    s = ctx.saved
    x, w = s["x"], s["w"]
    stride, padding, dilation, G = s["stride"], s["padding"], s["dilation"], s["groups"]
    xp = get_xp(x)
    N, C, H, W = x.shape
    F, Cg, KH, KW = w.shape
    _, _, OH, OW = dy.shape
    Fg = F // G
    K, L = Cg * KH * KW, OH * OW

    db = dy.sum(axis=(0, 2, 3)) if s["has_bias"] else None  # CB1

    cols = _im2col(xp, x, KH, KW, OH, OW, stride, padding, dilation).reshape(N, G, K, L)  # C2
    dyg = dy.reshape(N, G, Fg, L)
    wg = w.reshape(G, Fg, K)
    dw = xp.empty((G, Fg, K), dtype=x.dtype)
    dcols = xp.empty((N, G, K, L), dtype=x.dtype)
    for g in range(G):
        dw[g] = xp.tensordot(dyg[:, g], cols[:, g], axes=([0, 2], [0, 2]))  # CB2
        dcols[:, g] = xp.matmul(wg[g].T, dyg[:, g])  # CB3
    dw = dw.reshape(F, Cg, KH, KW)

    ph, pw = padding
    dxp = xp.zeros((N, C, H + 2 * ph, W + 2 * pw), dtype=x.dtype)
    dcols = dcols.reshape(N, C, KH, KW, OH, OW)
    for i in range(KH):  # CB4: within one tap the slice's positions are distinct, so += is exact
        for j in range(KW):
            rows, cs = _tap(i, j, OH, OW, stride, dilation)
            dxp[:, :, rows, cs] += dcols[:, :, i, j]
    dx = dxp[:, :, ph : ph + H, pw : pw + W]  # CB5
    return xp.ascontiguousarray(dx), dw, db
