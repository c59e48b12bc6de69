"""Test session setup. Triton kernels run in its CPU interpreter unless ASFT_TEST_DEVICE=cuda; the
variable must be set before anything (transformers, peft) imports triton, hence here."""

import os

import pytest

if os.environ.get("ASFT_TEST_DEVICE", "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one torch thread is fastest and leaves the other core free; restored after."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
