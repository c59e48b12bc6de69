"""Triton kernels and their launchers for AsFTAdamW (installed as `asft_optim.kernels`)."""
