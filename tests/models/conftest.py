"""One torch thread for the model tests: on a shared 2-core machine, two threads that fight
other processes for cores are several times slower than one."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
