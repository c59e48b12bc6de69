"""Triton kernels and their launchers for AsFTAdamW (installed as `asft_optim.kernels`).

Importing this package imports triton; `asft_optim.optimizer` imports it only for impl="triton".

This folder sits at the top of the repository, so Python also finds it as a top-level `kernels`
whenever a clone's root is on `sys.path` (`python -m ...` or pytest run there), where it would
shadow the `kernels` distribution that transformers ≥ 5 and bitsandbytes import. Imported under
that name it steps aside: the import gives that distribution when it is installed, and otherwise an
empty namespace module (no `__file__`, no attributes), what Python gives for a folder without
`__init__.py` and what transformers' availability check reads as "not installed".
"""
import sys

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is None or _spec.loader is None:
        _spec = importlib.machinery.ModuleSpec("kernels", None, is_package=True)
        _spec.submodule_search_locations = []
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # what `import kernels` returns (the import system reads it back)
    if _spec.loader is not None:
        _spec.loader.exec_module(_module)
else:
    from .adamw import (BLOCK, OTHER_ROLES, PENALTY_CODES, ROLES, CSlots, LaunchTable, Row, all_aligned,
                        exact_c_, fused_step_, is_interpreted, launch_counter, make_table, row_pointers,
                        split_pointers)

    __all__ = ["BLOCK", "OTHER_ROLES", "PENALTY_CODES", "ROLES", "CSlots", "LaunchTable", "Row", "all_aligned",
               "exact_c_", "fused_step_", "is_interpreted", "launch_counter", "make_table", "row_pointers",
               "split_pointers"]
