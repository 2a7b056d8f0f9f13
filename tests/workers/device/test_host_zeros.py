"""host_zeros, the CPU KV cache's allocation: zeros of any dtype over the kernel's lazily zeroed pages, its own
mapping, given back when the tensor goes."""

from __future__ import annotations

import gc
import os

import pytest
import torch

from shardserve.workers.device import get_backend
from shardserve.workers.device.base import host_zeros

MiB = 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
def test_zeros_of_each_dtype_are_writable_and_separate(dtype):
    a, b = host_zeros((5, 16, 3, 64), dtype), host_zeros((5, 16, 3, 64), dtype)
    assert a.shape == (5, 16, 3, 64) and a.dtype == dtype and a.is_contiguous()
    assert a.data_ptr() % 4096 == 0  # page-aligned: more than any vector load asks
    assert torch.equal(a, torch.zeros_like(a))
    a[2, 7].fill_(3)
    assert int(a[2, 7].sum()) == 3 * 3 * 64 and int(a.count_nonzero()) == 3 * 64
    assert int(b.count_nonzero()) == 0  # its own pages, not a's


def test_empty_shape():
    assert host_zeros((0, 16, 3, 64), torch.float32).shape == (0, 16, 3, 64)


def test_pages_are_taken_on_first_write_and_given_back_with_the_tensor():
    gc.collect()
    before = _rss()
    t = host_zeros((256, MiB // 4), torch.float32)  # 256 MiB
    assert _rss() - before < 16 * MiB  # nothing written, nothing resident (torch.zeros: all 256 MiB)
    t[:64].fill_(1.0)
    assert 60 * MiB < _rss() - before < 96 * MiB  # the quarter written
    del t
    gc.collect()
    assert _rss() - before < 16 * MiB  # unmapped with the tensor


def test_the_backend_zeros_elsewhere_with_torch():
    backend = get_backend("cpu")
    assert backend.zeros((2, 3), torch.bfloat16, torch.device("meta")).device.type == "meta"
    host = backend.zeros((2, 3), torch.bfloat16, torch.device("cpu"))
    assert host.device.type == "cpu" and not host.any()
