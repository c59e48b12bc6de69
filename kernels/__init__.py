"""Triton kernels and their launchers for AsFTAdamW (installed as `asft_optim.kernels`).

Importing this package imports triton; `asft_optim.optimizer` imports it only for impl="triton".
"""
from .adamw import (BLOCK, OTHER_ROLES, PENALTY_CODES, ROLES, CSlots, LaunchTable, Row, all_aligned, exact_c_,
                    fused_step_, is_interpreted, launch_counter, make_table, row_pointers, split_pointers)

__all__ = ["BLOCK", "OTHER_ROLES", "PENALTY_CODES", "ROLES", "CSlots", "LaunchTable", "Row", "all_aligned",
           "exact_c_", "fused_step_", "is_interpreted", "launch_counter", "make_table", "row_pointers",
           "split_pointers"]
