"""CUDA drivers of conv2d and max/avg pooling (the backend interface's signatures).

conv2d is im2col + cuBLAS, on chunks of images in a channel-major layout (csrc/conv2d.cu):

* forward: im2col of the chunk into ``cols`` [C*KH*KW, nb*L], one strided-batched GEMM over
  the groups ``yT_g = w_g @ cols_g`` (C3), then ``yT`` back to NCHW with the bias added (C4);
* backward: ``dyT`` = the chunk of dy in the channel-major layout, the columns (the forward's,
  kept when one chunk held every image, else im2col again), ``dW_g += dyT_g @ cols_g^T`` (CB2:
  images inside the GEMM's reduction, split into fixed slices whose partials a GEMM sums, chunks
  accumulated in order), ``dcols_g = w_g^T @ dyT_g`` (CB3, into the columns' buffer), and
  col2im as a gather (CB4, CB5); the bias gradient is two GEMMs with vectors of ones (CB1);
* 1x1 kernels with stride 1 and no padding on images of POINTWISE_MIN_L positions or more:
  no im2col, GEMMs straight on the NCHW arrays (the pointwise rule below).

No atomics anywhere: results are bitwise reproducible run to run (same GPU, same CuPy/CUDA).
Pooling is one gather kernel per direction (csrc/pool2d.cu). Everything runs on CuPy's current
stream, on the device of the inputs. Step numbers refer to fastrnn/reference/conv2d.py and
pool2d.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastrnn._cuda._runtime import runtime
from fastrnn.context import Context

# Workspace rule: a chunk holds at most as many images as fit WORKSPACE_BYTES of workspace
# ((C*KH*KW + F) * OH*OW elements per image: its columns and its channel-major output), and at
# least one image; the N images are cut into the fewest chunks that respect that bound, all of
# the same size but the last (ceil(N / chunks) images each: 33 images that fit 32 per chunk run
# as 17 + 16, not 32 + 1, whose one-image GEMMs would be badly shaped). The two buffers are
# allocated once per call (from CuPy's memory pool, which reuses them across calls) and reused
# by every chunk. Larger chunks only lengthen the GEMMs' N dimension, which stops paying off
# well before this size; it is large enough that a whole batch of common shapes is one chunk,
# whose columns backward can reuse (below): 32 images of 64 x 56 x 56 with a 3x3 kernel and 64
# filters take 245 MiB. The split-K partials of dW (below) are bounded separately.
WORKSPACE_BYTES = 256 * 2**20
# When one chunk holds every image (so at most WORKSPACE_BYTES), a training forward keeps its
# columns in the context and the first backward reads them instead of running im2col again
# (C2 written once, not twice); that backward then overwrites them with the column gradient
# (CB3) and drops them from the context, so a second backward on the same context recomputes
# them. The cost: up to WORKSPACE_BYTES per conv2d held from forward to backward.

# Split-K rule of the weight gradient (CB2). dW_g (Fg, K) = dyT_g (Fg, RL) @ cols_g^T is a GEMM
# with a small output and a very long reduction (RL = images * OH*OW, ~1e5): cuBLAS's kernels
# tile the output (about 128 x 128 per thread block), so unless cuBLAS picks a split-K kernel of
# its own, 64 x 576 gives 5 blocks for 132 SMs. The reduction is therefore cut into S slices of
# R consecutive columns (the last slice may be shorter), each slice's product written to its
# own partial [F, K] (strided batched GEMMs), and the partials are summed by one GEMM with a
# vector of ones into dW (beta = 1 after the first chunk): no atomics, and the same GEMMs, so
# the same order of additions (cuBLAS is deterministic on a given GPU), every run. S is the
# smallest count that gives about DW_TARGET_BLOCKS output tiles in all, at most
# RL // DW_MIN_SLICE (a slice shorter than that does too little work per tile) and at most
# DW_PARTIAL_BYTES of partials; S = 1 (one GEMM straight into dW) for small problems. The rule
# depends on the shapes only, never on the device, so a given call always sums in the same
# order.
# The slice length R is ceil(RL / S) rounded up to a multiple of DW_SLICE_ALIGN elements, so
# that every slice starts 128-byte aligned (cuBLAS's vectorised kernels need aligned operands);
# the count of slices actually run is then ceil(RL / R) <= S.
DW_TILE = 128
DW_TARGET_BLOCKS = 264  # two waves of an H100's 132 SMs
DW_MIN_SLICE = 256
DW_PARTIAL_BYTES = 32 * 2**20
DW_SLICE_ALIGN = 32


def images_per_chunk(N: int, per_image_elements: int, itemsize: int) -> int:
    """The workspace rule above: images per chunk, in 1..N (1 when N is 0)."""
    fit = max(1, WORKSPACE_BYTES // max(1, per_image_elements * itemsize))
    if N <= fit:
        return max(1, N)
    chunks = -(-N // fit)
    return -(-N // chunks)


def dw_slices(G: int, Fg: int, K: int, RL: int, itemsize: int) -> int:
    """The split-K rule above: the number of slices S >= 1 of dW's reduction of length RL."""
    tiles = G * -(-Fg // DW_TILE) * -(-K // DW_TILE)
    want = -(-DW_TARGET_BLOCKS // max(1, tiles))
    fit = DW_PARTIAL_BYTES // max(1, G * Fg * K * itemsize)
    return max(1, min(want, RL // DW_MIN_SLICE, fit))


def dw_slice_length(RL: int, S: int) -> int:
    """The slice length R of the split-K rule above (RL when S is 1)."""
    if S <= 1:
        return RL
    R = -(-RL // S)
    return -(-R // DW_SLICE_ALIGN) * DW_SLICE_ALIGN


def _weight_grad(ops, G, Fg, K, RL, S, dyT, cols, part, ones_s, dw, beta) -> None:
    """CB2 for one chunk: dW_g (Fg, K) (+)= dyT_g (Fg, RL) @ cols_g^T (RL, K) for every group,
    with the reduction over RL cut into S slices (the split-K rule above). ``part`` holds
    S partials [F, K] (group g at rows g*Fg ..), ``ones_s`` S ones."""
    F = G * Fg
    if S == 1:
        # One strided batched GEMM over the groups, straight into dW.
        ops.gemm(
            False, True, Fg, K, RL, 1.0, dyT, 0, RL, cols, 0, RL, beta, dw, 0, K,
            batch=G, stride_a=Fg * RL, stride_b=K * RL, stride_c=Fg * K,
        )  # fmt: skip
        return
    R = dw_slice_length(RL, S)
    full, rem = divmod(RL, R)  # full slices of R columns, then one of rem < R (if rem > 0)
    if full > 0:
        if G <= full:
            # Per group: one GEMM batched over the slices (R columns apart).
            for g in range(G):
                ops.gemm(
                    False, True, Fg, K, R, 1.0, dyT, g * Fg * RL, RL, cols, g * K * RL, RL,
                    0.0, part, g * Fg * K, K,
                    batch=full, stride_a=R, stride_b=R, stride_c=F * K,
                )  # fmt: skip
        else:
            # Per slice: one GEMM batched over the groups.
            for q in range(full):
                ops.gemm(
                    False, True, Fg, K, R, 1.0, dyT, q * R, RL, cols, q * R, RL,
                    0.0, part, q * F * K, K,
                    batch=G, stride_a=Fg * RL, stride_b=K * RL, stride_c=Fg * K,
                )  # fmt: skip
    P = full
    if rem > 0:
        ops.gemm(
            False, True, Fg, K, rem, 1.0, dyT, full * R, RL, cols, full * R, RL,
            0.0, part, full * F * K, K,
            batch=G, stride_a=Fg * RL, stride_b=K * RL, stride_c=Fg * K,
        )  # fmt: skip
        P += 1
    # dW (1, F*K) (+)= ones (1, P) @ part (P, F*K): the sum of the partials.
    ops.gemm(False, False, 1, F * K, P, 1.0, ones_s, 0, P, part, 0, F * K, beta, dw, 0, F * K)


# Pointwise rule: a 1x1 kernel with stride 1 and no padding (any dilation) reads each image as
# it is: x[n] viewed (C, H*W) is already that image's column matrix. When the image has at
# least POINTWISE_MIN_L positions such convs skip im2col, col2im, the layout kernels and the
# workspace: y[n] = w @ x[n] and dx[n] = w^T @ dy[n] are strided batched GEMMs over the images
# straight into NCHW, and dW = sum_n dy[n] @ x[n]^T is split-K over the images (one partial
# per image, at most DW_PARTIAL_BYTES of them at a time, summed by a GEMM with ones). Smaller
# images take the general path, whose one GEMM over the chunk beats many tiny per-image GEMMs.
POINTWISE_MIN_L = 256


def _is_pointwise(geometry: tuple[int, ...]) -> bool:
    _, _, _, KH, KW, OH, OW, sh, sw, ph, pw, _, _ = geometry
    return KH == KW == 1 and sh == sw == 1 and ph == pw == 0 and OH * OW >= POINTWISE_MIN_L


def _gemm_images_groups(ops, N, G, transa, transb, M, Nc, K, A, a, lda, B, b, ldb, beta, C, c,
                        ldc) -> None:  # fmt: skip
    """One row-major GEMM per (image, group) pair; ``a``, ``b``, ``c`` are (base offset,
    stride between images, stride between groups) of each operand. Batched over the larger of
    images and groups, looping over the smaller."""
    if G <= N:
        for g in range(G):
            ops.gemm(
                transa, transb, M, Nc, K, 1.0, A, a[0] + g * a[2], lda, B, b[0] + g * b[2], ldb,
                beta, C, c[0] + g * c[2], ldc, batch=N, stride_a=a[1], stride_b=b[1],
                stride_c=c[1],
            )  # fmt: skip
    else:
        for n in range(N):
            ops.gemm(
                transa, transb, M, Nc, K, 1.0, A, a[0] + n * a[1], lda, B, b[0] + n * b[1], ldb,
                beta, C, c[0] + n * c[1], ldc, batch=G, stride_a=a[2], stride_b=b[2],
                stride_c=c[2],
            )  # fmt: skip


def _pointwise_forward(rt, x, w, b, G, y) -> None:
    """C1-C4 of a pointwise conv (the rule above): y[n]_g = w_g @ x[n]_g, the bias first."""
    xp = rt.xp
    N, C, H, W = x.shape
    F, Cg = w.shape[:2]
    Fg, L = F // G, H * W
    ones_l = None if b is None else xp.ones((L,), dtype=x.dtype)

    def body(ops) -> None:
        if b is not None:
            # C4 as the GEMM's starting value: y[n] (F, L) = b (F, 1) @ ones (1, L).
            ops.gemm(False, False, F, L, 1, 1.0, b, 0, 1, ones_l, 0, L, 0.0, y, 0, L,
                    batch=N, stride_a=0, stride_b=0, stride_c=F * L)  # fmt: skip
        # C3: y[n]_g (Fg, L) (+)= w_g (Fg, Cg) @ x[n]_g (Cg, L).
        _gemm_images_groups(
            ops, N, G, False, False, Fg, L, Cg, w, (0, 0, Fg * Cg), Cg,
            x, (0, C * L, Cg * L), L, float(b is not None), y, (0, F * L, Fg * L), L,
        )  # fmt: skip

    arrays = [a for a in (x, w, b, y, ones_l) if a is not None]
    key = ("conv2d-1x1", x.dtype.char, N, C, L, F, G, *map(rt.ptr, arrays))
    rt.time_loop(key, [], lambda: rt.record(body))


def _pointwise_backward(rt, x, w, dy, dx, dw) -> tuple[Any, list[Any], int]:
    """CB2-CB5 of a pointwise conv (the rule above; CB1 is the caller's): the calls as a
    function of a recorder (:meth:`fastrnn._cuda._runtime.Runtime.record`), the workspace
    arrays, and the images per round of dW partials."""
    xp = rt.xp
    N, C, H, W = x.shape
    F, Cg = w.shape[:2]
    G = C // Cg
    Fg, L = F // G, H * W
    dtype = x.dtype
    # Images per round of dW partials (one [F, Cg] partial per image).
    nbp = max(1, min(N, DW_PARTIAL_BYTES // max(1, F * Cg * dtype.itemsize)))
    part = xp.empty((nbp * F * Cg,), dtype=dtype)
    ones_n = xp.ones((nbp,), dtype=dtype)

    def body(ops) -> None:
        # CB3-CB5: dx[n]_g (Cg, L) = w_g^T (Cg, Fg) @ dy[n]_g (Fg, L).
        _gemm_images_groups(
            ops, N, G, True, False, Cg, L, Fg, w, (0, 0, Fg * Cg), Cg,
            dy, (0, F * L, Fg * L), L, 0.0, dx, (0, C * L, Cg * L), L,
        )  # fmt: skip
        # CB2: part[n]_g (Fg, Cg) = dy[n]_g (Fg, L) @ x[n]_g^T (L, Cg), then dW (1, F*Cg)
        # (+)= ones (1, m) @ part (m, F*Cg), rounds of images in order.
        for n0 in range(0, N, nbp):
            m = min(nbp, N - n0)
            _gemm_images_groups(
                ops, m, G, False, True, Fg, Cg, L, dy, (n0 * F * L, F * L, Fg * L), L,
                x, (n0 * C * L, C * L, Cg * L), L, 0.0, part, (0, F * Cg, Fg * Cg), Cg,
            )  # fmt: skip
            ops.gemm(False, False, 1, F * Cg, m, 1.0, ones_n, 0, m, part, 0, F * Cg,
                    0.0 if n0 == 0 else 1.0, dw, 0, F * Cg)  # fmt: skip

    return body, [part, ones_n], nbp


def _out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def conv2d_forward(x, w, b, stride, padding, dilation, groups, training):
    """x (N,C,H,W); w (F,C/groups,KH,KW); b (F,) or None; pairs -> y (N,F,OH,OW), ctx."""
    rt = runtime()
    xp = rt.xp
    N, C, H, W = x.shape
    F, Cg, KH, KW = w.shape
    G = groups
    Fg = F // G
    OH = _out(H, KH, stride[0], padding[0], dilation[0])
    OW = _out(W, KW, stride[1], padding[1], dilation[1])
    L, K, CK = OH * OW, Cg * KH * KW, C * KH * KW
    geometry = (C, H, W, KH, KW, OH, OW, *stride, *padding, *dilation)
    dtype = x.dtype
    has_bias = int(b is not None)
    keep = None  # the columns kept for backward
    with rt.device_of(x):
        # Everything is allocated before the launches (a CUDA graph may record them).
        y = xp.empty((N, F, OH, OW), dtype=dtype)
        if _is_pointwise(geometry):
            _pointwise_forward(rt, x, w, b, G, y)
        else:
            nb = images_per_chunk(N, (CK + F) * L, dtype.itemsize)
            cols = xp.empty((CK * nb * L,), dtype=dtype)
            yT = xp.empty((F * nb * L,), dtype=dtype)
            bias = yT if b is None else b  # not read when has_bias is 0

            def body(ops) -> None:
                for n0 in range(0, N, nb):
                    m = min(nb, N - n0)
                    RL = m * L  # row length of the chunk's channel-major matrices
                    # C1, C2.
                    ops.launch("im2col", dtype, C * RL, (x, cols, n0, m, *geometry))
                    # C3: yT_g (Fg, RL) = w_g (Fg, K) @ cols_g (K, RL), one batched GEMM over
                    # the groups.
                    ops.gemm(
                        False, False, Fg, RL, K, 1.0, w, 0, K, cols, 0, RL, 0.0, yT, 0, RL,
                        batch=G, stride_a=Fg * K, stride_b=K * RL, stride_c=Fg * RL,
                    )  # fmt: skip
                    # C4 while going back to NCHW.
                    ops.launch(
                        "from_channel_major", dtype, m * F * L,
                        (yT, bias, y, n0, m, F, L, has_bias),
                    )  # fmt: skip

            key = ("conv2d", dtype.char, N, F, G, nb, has_bias, geometry,
                   *map(rt.ptr, (x, w, bias, y, cols, yT)))  # fmt: skip
            rt.time_loop(key, [], lambda: rt.record(body))
            if nb == N and N > 0:
                keep = cols
    ctx = None
    if training:
        ctx = Context(
            op="conv2d",
            backend="cuda",
            dtype=dtype,
            cupy=True,
            grad_shapes={"dy": (N, F, OH, OW)},
            saved=dict(x=x, w=w, has_bias=b is not None, geometry=geometry, groups=G),
        )
        if keep is not None:
            ctx.saved["cols"] = keep  # read (and consumed) by the first backward
    return y, ctx


def conv2d_backward(ctx, dy, input_grad=True):
    """dy (N,F,OH,OW) -> dx (N,C,H,W), dw (F,C/groups,KH,KW), db (F,) or None. dx is computed
    whatever ``input_grad`` says (the CUDA kernels compute it with dw)."""
    rt = runtime()
    xp = rt.xp
    s = ctx.saved
    x, w, geometry, G = s["x"], s["w"], s["geometry"], s["groups"]
    N, C, H, W = x.shape
    F, Cg, KH, KW = w.shape
    Fg = F // G
    OH, OW = geometry[5], geometry[6]
    L, K, CK = OH * OW, Cg * KH * KW, C * KH * KW
    dtype = x.dtype
    with rt.device_of(x):
        # Everything is allocated before the launches (a CUDA graph may record them).
        dx = xp.empty((N, C, H, W), dtype=dtype)
        dw = xp.empty((F, Cg, KH, KW), dtype=dtype)
        if N == 0:
            dw[...] = 0
        db = per_plane = ones_l = ones_n = None
        if s["has_bias"]:
            db = xp.empty((F,), dtype=dtype)
            per_plane = xp.empty((N * F,), dtype=dtype)
            ones_l = xp.ones((L,), dtype=dtype)
            ones_n = xp.ones((N,), dtype=dtype)
        if _is_pointwise(geometry):
            rest, rest_arrays, nb = _pointwise_backward(rt, x, w, dy, dx, dw)
            reuse, S_max = False, 0
        else:
            nb = images_per_chunk(N, (CK + F) * L, dtype.itemsize)
            # The forward's columns when it kept them (one chunk): no im2col; consumed here.
            cols = s.pop("cols", None)
            reuse = cols is not None and nb == N
            if not reuse:
                cols = xp.empty((CK * nb * L,), dtype=dtype)
            dyT = xp.empty((F * nb * L,), dtype=dtype)
            # Split-K partials of dW, sized for the largest chunk (S grows with the chunk).
            S_max = dw_slices(G, Fg, K, nb * L, dtype.itemsize) if N > 0 else 1
            part = ones_s = None
            if S_max > 1:
                part = xp.empty((S_max * F * K,), dtype=dtype)
                ones_s = xp.ones((S_max,), dtype=dtype)
            rest_arrays = [a for a in (cols, dyT, part, ones_s) if a is not None]

            def rest(ops) -> None:
                for n0 in range(0, N, nb):
                    m = min(nb, N - n0)
                    RL = m * L
                    ops.launch("to_channel_major", dtype, F * RL, (dy, dyT, n0, m, F, L))
                    if not reuse:  # C2 again
                        ops.launch("im2col", dtype, C * RL, (x, cols, n0, m, *geometry))
                    # CB2: dW (+)= dyT @ cols^T, split-K over the chunk's columns; the first
                    # chunk assigns, the later ones accumulate, in chunk order.
                    S = dw_slices(G, Fg, K, RL, dtype.itemsize)
                    _weight_grad(ops, G, Fg, K, RL, S, dyT, cols, part, ones_s, dw,
                                 0.0 if n0 == 0 else 1.0)  # fmt: skip
                    # CB3: dcols_g (K, RL) = w_g^T (K, Fg) @ dyT_g (Fg, RL), over the columns.
                    ops.gemm(
                        True, False, K, RL, Fg, 1.0, w, 0, K, dyT, 0, RL, 0.0, cols, 0, RL,
                        batch=G, stride_a=Fg * K, stride_b=Fg * RL, stride_c=K * RL,
                    )  # fmt: skip
                    # CB4, CB5: gather every input element's column entries.
                    ops.launch("col2im", dtype, m * C * H * W, (cols, dx, n0, m, *geometry))

        def body(ops) -> None:
            if db is not None:
                # CB1: db[f] = sum over n and positions of dy[n, f], as two GEMMs with vectors
                # of ones (deterministic, unlike an atomic reduction).
                ops.gemm(False, False, N * F, 1, L, 1.0, dy, 0, L, ones_l, 0, 1, 0.0,
                         per_plane, 0, 1)  # fmt: skip
                ops.gemm(False, False, 1, F, N, 1.0, ones_n, 0, N, per_plane, 0, F, 0.0,
                         db, 0, F)  # fmt: skip
            rest(ops)

        arrays = [dy, x, w, dx, dw, *rest_arrays]
        arrays += [a for a in (db, per_plane, ones_l, ones_n) if a is not None]
        key = ("conv2d-b", dtype.char, N, F, G, nb, S_max, reuse, geometry, *map(rt.ptr, arrays))
        rt.time_loop(key, [], lambda: rt.record(body))
    return dx, dw, db


# ------------------------------------------------------------------------------------------------
# pooling
# ------------------------------------------------------------------------------------------------


def _pool_geometry(x: Any, kernel_size, stride, padding) -> tuple[int, ...]:
    N, C, H, W = x.shape
    OH = (H + 2 * padding[0] - kernel_size[0]) // stride[0] + 1
    OW = (W + 2 * padding[1] - kernel_size[1]) // stride[1] + 1
    return (N * C, H, W, OH, OW, *kernel_size, *stride, *padding)


def _pool_context(op: str, x: Any, y: Any, geometry: tuple[int, ...], **saved: Any) -> Context:
    return Context(
        op=op,
        backend="cuda",
        dtype=x.dtype,
        cupy=True,
        grad_shapes={"dy": tuple(y.shape)},
        saved=dict(x_shape=tuple(x.shape), geometry=geometry, **saved),
    )


def max_pool2d_forward(x, kernel_size, stride, padding, training):
    """x (N,C,H,W); pairs -> y (N,C,OH,OW), ctx (P1-P3)."""
    rt = runtime()
    xp = rt.xp
    g = _pool_geometry(x, kernel_size, stride, padding)
    N, C = x.shape[:2]
    with rt.device_of(x):
        y = xp.empty((N, C, g[3], g[4]), dtype=x.dtype)
        # The argmax (offset h*W + w in its plane) is only kept for backward.
        arg = xp.empty(y.shape if training else (1,), dtype=np.int64)
        rt.launch("max_pool2d_forward", x.dtype, y.size, (x, y, arg, *g, int(training)))
    ctx = _pool_context("max_pool2d", x, y, g, arg=arg) if training else None
    return y, ctx


def max_pool2d_backward(ctx, dy):
    """dy (N,C,OH,OW) -> dx (N,C,H,W) (PB1, PB3)."""
    rt = runtime()
    s = ctx.saved
    with rt.device_of(dy):
        dx = rt.xp.empty(s["x_shape"], dtype=dy.dtype)
        rt.launch("max_pool2d_backward", dy.dtype, dx.size, (dy, s["arg"], dx, *s["geometry"]))
    return dx


def avg_pool2d_forward(x, kernel_size, stride, padding, training):
    """x (N,C,H,W); pairs -> y (N,C,OH,OW), ctx (P1, P2, P4)."""
    rt = runtime()
    g = _pool_geometry(x, kernel_size, stride, padding)
    N, C = x.shape[:2]
    with rt.device_of(x):
        y = rt.xp.empty((N, C, g[3], g[4]), dtype=x.dtype)
        rt.launch("avg_pool2d_forward", x.dtype, y.size, (x, y, *g))
    ctx = _pool_context("avg_pool2d", x, y, g) if training else None
    return y, ctx


def avg_pool2d_backward(ctx, dy):
    """dy (N,C,OH,OW) -> dx (N,C,H,W) (PB2, PB3)."""
    rt = runtime()
    s = ctx.saved
    with rt.device_of(dy):
        dx = rt.xp.empty(s["x_shape"], dtype=dy.dtype)
        rt.launch("avg_pool2d_backward", dy.dtype, dx.size, (dy, dx, *s["geometry"]))
    return dx
