"""Test session setup. Triton kernels run in its CPU interpreter unless ASFT_TEST_DEVICE=cuda; the
variable must be set before anything (transformers, peft) imports triton, hence here."""

import os

if os.environ.get("ASFT_TEST_DEVICE", "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
