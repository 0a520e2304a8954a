"""fastrnn.dlpack: zero-copy exchange between NumPy, CuPy, PyTorch and JAX."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CUDA

import fastrnn
from fastrnn import dlpack

torch = pytest.importorskip("torch")

gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (CUDA and torch.cuda.is_available()),
        reason="needs cupy.is_available() and torch.cuda.is_available()",
    ),
]


def _ptr(a):
    return a.__array_interface__["data"][0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_numpy_torch_round_trip_shares_memory(dtype):
    a = np.arange(24, dtype=dtype).reshape(2, 3, 4)
    t = dlpack.to_torch(a)
    assert isinstance(t, torch.Tensor) and t.data_ptr() == _ptr(a)
    assert t.dtype == torch.from_numpy(a).dtype and tuple(t.shape) == a.shape
    b = dlpack.to_numpy(t)
    assert _ptr(b) == _ptr(a)
    t[0, 0, 0] = 100  # writes are visible on both sides: one buffer
    assert a[0, 0, 0] == 100 and b[0, 0, 0] == 100


def test_numpy_is_returned_as_is():
    a = np.ones((3, 4))
    assert dlpack.to_numpy(a) is a
    assert dlpack.to_kernel_array(a) is a


def test_tensor_that_requires_grad_is_detached_not_copied():
    t = torch.randn(5, 6, requires_grad=True)
    a = dlpack.to_numpy(t)
    assert _ptr(a) == t.data_ptr()
    assert dlpack.to_torch(t).data_ptr() == t.data_ptr()
    assert not dlpack.to_torch(t).requires_grad


def test_negatively_strided_numpy_is_made_contiguous_before_export():
    a = np.arange(12.0).reshape(3, 4)[::-1]
    assert not dlpack.is_zero_copy_compatible(a)
    t = dlpack.to_torch(a)  # exporting the view itself would crash some PyTorch releases
    np.testing.assert_array_equal(t.numpy(), a)
    assert t.is_contiguous()


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(12.0).reshape(3, 4).t(),
        lambda: torch.arange(24.0).reshape(4, 6)[:, ::2],
        lambda: torch.arange(12.0).reshape(3, 4).flip(0),
    ],
    ids=["transposed", "step_slice", "flipped"],
)
def test_non_contiguous_tensor_becomes_a_contiguous_array(make):
    t = make()
    a = dlpack.to_numpy(t)
    assert a.flags.c_contiguous
    np.testing.assert_array_equal(a, t.numpy())


def test_non_contiguous_numpy_to_torch():
    a = np.arange(24.0).reshape(4, 6).T
    assert not dlpack.is_zero_copy_compatible(a)
    t = dlpack.to_torch(a)
    assert t.is_contiguous()
    np.testing.assert_array_equal(t.numpy(), a)


def test_zero_copy_compatible():
    assert dlpack.is_zero_copy_compatible(np.ones((2, 3)))
    assert dlpack.is_zero_copy_compatible(torch.ones(2, 3))
    assert not dlpack.is_zero_copy_compatible(torch.ones(2, 3).t())


def test_kernel_array_feeds_fastrnn_without_copies():
    """Output arrays of a kernel called on the views land back in tensors without copies."""
    T, N, D, H = 3, 2, 4, 5
    ts = [torch.randn(*s, dtype=torch.float64) for s in [(T, N, D), (N, H), (4 * H, D), (4 * H, H)]]
    x, h0, w_ih, w_hh = (dlpack.to_kernel_array(t) for t in ts)
    assert [_ptr(a) for a in (x, h0, w_ih, w_hh)] == [t.data_ptr() for t in ts]
    y, *_ = fastrnn.lstm_forward(x, h0, h0, w_ih, w_hh, np.zeros(4 * H), training=False)
    assert dlpack.to_torch(y).data_ptr() == _ptr(y)


def test_host_and_device_never_mix_silently():
    with pytest.raises(ValueError, match="host"):
        dlpack.to_cupy(np.ones(3))
    with pytest.raises(ValueError, match="host"):
        dlpack.to_cupy(torch.ones(3))


def test_unsupported_objects_raise_type_error():
    with pytest.raises(TypeError, match="x"):
        dlpack.to_numpy([1.0, 2.0])
    with pytest.raises(TypeError, match="x"):
        dlpack.to_torch(3.0)
    with pytest.raises(TypeError, match="x"):
        dlpack.array_library(object())
    with pytest.raises(TypeError, match="x"):
        dlpack.to_numpy(torch.ones(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="device"):
        dlpack.to_numpy(torch.ones(3, device="meta"))


def test_array_library():
    assert dlpack.array_library(np.ones(2)) == "numpy"
    assert dlpack.array_library(torch.ones(2)) == "torch"


# ------------------------------------------------------------------------------------------------
# JAX (only where it is installed)
# ------------------------------------------------------------------------------------------------


def test_jax_cpu_exchange():
    jnp = pytest.importorskip("jax.numpy")
    j = jnp.arange(12.0, dtype=jnp.float32).reshape(3, 4)
    assert dlpack.array_library(j) == "jax"
    a = dlpack.to_numpy(j)
    np.testing.assert_array_equal(a, np.arange(12.0, dtype=np.float32).reshape(3, 4))
    t = dlpack.to_torch(j)
    assert t.data_ptr() == _ptr(a)  # both views of JAX's buffer
    back = dlpack.to_jax(np.arange(6.0).reshape(2, 3)[::-1])
    np.testing.assert_array_equal(np.asarray(back), np.arange(6.0).reshape(2, 3)[::-1])


# ------------------------------------------------------------------------------------------------
# CUDA (visibly skipped without a GPU)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_cuda_exchange_shares_device_memory(device):
    import cupy

    t = torch.randn(4, 5, device=device)
    c = dlpack.to_cupy(t)
    assert isinstance(c, cupy.ndarray) and c.data.ptr == t.data_ptr()
    assert dlpack.to_kernel_array(t).data.ptr == t.data_ptr()
    back = dlpack.to_torch(c)
    assert back.data_ptr() == t.data_ptr() and back.device == t.device
    with pytest.raises(ValueError, match="GPU"):
        dlpack.to_numpy(t)
    with pytest.raises(ValueError, match="GPU"):
        dlpack.to_numpy(c)
    nc = dlpack.to_cupy(t.t())
    assert nc.flags.c_contiguous
    cupy.testing.assert_array_equal(nc, cupy.asarray(t.t().cpu().numpy()))
