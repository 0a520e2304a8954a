"""Helpers of the GPU tests (tests/test_cuda_*.py); importing this needs no GPU."""

from __future__ import annotations

from typing import Any


class BumpAllocator:
    """Hands out consecutive slices of one buffer and starts over on reset(): every
    iteration of a loop that allocates the same sizes gets the same addresses (CuPy's pool
    usually does too, but does not promise it)."""

    def __init__(self, nbytes: int) -> None:
        import cupy

        self.buffer = cupy.cuda.memory.alloc(nbytes)  # from the default pool, before the swap
        self.nbytes = nbytes
        self.offset = 0

    def reset(self) -> None:
        self.offset = 0

    def __call__(self, size: int) -> Any:
        import cupy

        size = (size + 255) // 256 * 256
        if self.offset + size > self.nbytes:
            raise MemoryError("test allocator exhausted")
        mem = cupy.cuda.UnownedMemory(self.buffer.ptr + self.offset, size, self.buffer)
        self.offset += size
        return cupy.cuda.MemoryPointer(mem, 0)
