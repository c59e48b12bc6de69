"""The impl="triton" step of `AsFTAdamW`: which groups take it, and the glue from param groups to
the fused kernels of `asft_optim.kernels` (launch tables cached by names and addresses, c slots
carried between steps, exact reductions after a load or `resync()`)."""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch
from torch import Tensor

from . import distributed as _dist
from .functional import storage_w0

__all__ = ["TritonStep"]


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_signature(group: dict[str, Any]) -> tuple | None:
    """What a cached impl="triton" launch plan depends on: the options that shape it, which
    parameters have gradients, and the addresses and layouts of those parameters and gradients
    (None for a sparse gradient: the full path reports it)."""
    entries = []
    for p in group["params"]:
        g = p.grad
        if g is None:
            entries.append(None)
        elif g.layout != torch.strided:
            return None
        else:
            entries.append((p.data_ptr(), g.data_ptr(), g.stride(), g.dtype))
    return group["asft_lambda"], group["penalty"], group["amsgrad"], tuple(entries)


def _triton_hyper(group: dict[str, Any]) -> dict[str, Any]:
    """A group's hyper-parameters as the fused kernel takes them (read at every step; a tensor lr
    or beta is read with float(), a host sync when it lives on the GPU)."""
    lr, (beta1, beta2) = group["lr"], group["betas"]
    return dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=group["eps"],
                weight_decay=group["weight_decay"], amsgrad=group["amsgrad"], maximize=group["maximize"],
                coef=(-2.0 if group["maximize"] else 2.0) * group["asft_lambda"])


def _increment_steps(buf: Tensor, positions: Tensor | None) -> list[float]:
    """Add 1 to the step counts at `positions` (all when None) of a group's step buffer; return all."""
    if positions is None:
        buf.add_(1)
    else:
        buf.index_add_(0, positions, torch.ones(positions.numel(), dtype=buf.dtype))
    return buf.tolist()


class TritonStep:
    """The impl="triton" part of `AsFTAdamW` (a mixin; state lives on the optimizer)."""

    def _resolve_impl(self, group: dict[str, Any]) -> str:
        """The implementation a group's step runs: impl=None means triton on CUDA when importable."""
        impl = group["impl"]
        if impl is None:
            explicit_torch = group["foreach"] or group["fused"] or group["capturable"]
            if (explicit_torch or not all(p.is_cuda and not _dist.is_dtensor(p) for p in group["params"])
                    or not _triton_importable()):
                return "torch"
            return "triton"
        if impl == "triton":
            for key in ("foreach", "fused", "capturable"):
                if group[key]:
                    raise ValueError(f"impl='triton' cannot honour {key}=True (it runs its own fused "
                                     f"kernel); pass {key}=None or impl='torch'")
            if not _triton_importable():
                raise ValueError("impl='triton' needs the triton package (pip install 'asft_optim[triton]')")
            from .kernels import is_interpreted
            on_cpu = [n for n, p in zip(group["param_names"], group["params"]) if not p.is_cuda]
            if on_cpu and not is_interpreted():
                raise ValueError(f"impl='triton' runs on CUDA tensors, or on CPU only under "
                                 f"TRITON_INTERPRET=1 (set before triton is imported); '{on_cpu[0]}' is on "
                                 f"{group['params'][group['param_names'].index(on_cpu[0])].device}")
        return impl

    def _step_triton(self, group_index: int, group: dict[str, Any]) -> None:
        """One group's step with the fused Triton kernels: one update (+ one fold) launch per
        (device, dtypes, penalised) subset; an exact c pass first where c is not known.

        The launches are kept as a plan; while the same parameters have gradients at the same
        addresses and c stays valid, the next step reuses it without building any lists.
        """
        from .kernels import CSlots, exact_c_, fused_step_, make_table
        if "_triton_c" not in self.__dict__:
            self._triton_c = CSlots()
            self._triton_pending: list[tuple[str, Tensor]] = []
            self._triton_tables: dict[tuple, tuple[tuple, Any]] = {}
            self._triton_v_checked: set[str] = set()
            self._triton_plans: dict[int, dict[str, Any]] = {}
            self._triton_step_bufs: dict[int, Tensor] = {}
        cs = self._triton_c
        signature = _triton_signature(group)
        plan = self._triton_plans.get(group_index)
        if plan is not None and plan["signature"] == signature and plan["epoch"] == cs.epoch:
            steps = _increment_steps(plan["steps"], plan["positions"])
            hyper = _triton_hyper(group)
            for table, c_buf, penalty, positions in plan["launches"]:
                fused_step_(table, c_buf, [steps[j] for j in positions], penalty=penalty, **hyper)
            return
        fresh = {n for n, p in zip(group["param_names"], group["params"])
                 if p.grad is not None and "w0" not in self.state.get(p, {})}
        names, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, _ = self._gather(group)
        if not params:
            return
        self._check_missing(group, names)
        # state["step"] of every parameter is a view into one buffer per group: one add per step
        positions = [j for j, p in enumerate(group["params"]) if p.grad is not None]
        buf = self._triton_step_bufs.get(group_index)
        if buf is None or buf.numel() != len(group["params"]) or buf.dtype != state_steps[0].dtype:
            buf = self._triton_step_bufs[group_index] = torch.zeros(len(group["params"]),
                                                                    dtype=state_steps[0].dtype)
        for j, step_t in zip(positions, state_steps):
            if step_t._base is not buf or step_t.storage_offset() != j:
                buf[j] = step_t
                self.state[group["params"][j]]["step"] = buf[j]
        positions_t = None if len(positions) == buf.numel() else torch.tensor(positions)
        all_steps = _increment_steps(buf, positions_t)
        steps = [all_steps[j] for j in positions]
        amsgrad, lam, penalty = group["amsgrad"], group["asft_lambda"], group["penalty"]
        subsets: dict[tuple, list[int]] = {}
        rows: list[list[Tensor | None]] = []
        reusable = True
        for i, (name, p, g) in enumerate(zip(names, params, grads)):
            bound = self._direction(name, p) if lam > 0 else None
            # bf16 where exact: fewer bytes per step (not for shards: every rank must launch alike)
            if bound is not None and name not in self._triton_v_checked and name not in self._sharded:
                bound.v = storage_w0(bound.v)
                self._triton_v_checked.add(name)
            if g.stride() != p.stride():
                g = torch.empty_like(p).copy_(g)
                reusable = False  # the table points at this temporary
            reusable &= not _dist.is_dtensor(p)
            w0 = self.state[p]["w0"] if bound is not None else None
            row = [p, g, exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsgrad else None, w0,
                   None if bound is None else bound.v]
            row = [None if x is None else _dist.local(x) for x in row]  # DTensors: their local shards
            rows.append(row)
            key = (p.device, bound is not None) + tuple(None if x is None else x.dtype for x in row)
            subsets.setdefault(key, []).append(i)
        hyper = _triton_hyper(group)
        launches = []
        for key, idx in subsets.items():
            device, penalised = key[0], key[1]
            sub_names = [names[i] for i in idx]
            sub_rows = [rows[i] for i in idx]
            cache_key = (tuple(sub_names), tuple(tuple(r[0].shape) for r in sub_rows),
                         tuple(r[1].stride() for r in sub_rows),
                         tuple(0 if x is None else x.data_ptr() for r in sub_rows for x in r))
            slots = cs.slots(sub_names, device) if penalised else [0] * len(idx)
            cached = self._triton_tables.get((group_index, key))
            if cached is None or cached[0] != cache_key:
                inv = [self._bound[n].inv_nv2 if penalised else 0.0 for n in sub_names]
                cached = (cache_key, make_table(sub_rows, slots, inv, sub_names))
                self._triton_tables[(group_index, key)] = cached
            table = cached[1]
            needs_c = penalised and penalty != "full"
            c_buf = cs.buffers[device] if penalised else table.partials
            stale = [n for n in sub_names if n not in cs.valid] if needs_c else []
            if stale and set(stale) <= fresh:  # first step: p = W0, so c = 0
                c_buf.index_fill_(0, torch.tensor([cs.slot[n] for n in stale], device=device), 0.0)
            elif stale:
                exact_c_(table, c_buf)
                self._reduce_c_slots([(names[i], params[i]) for i in idx])
            fused_step_(table, c_buf, [steps[i] for i in idx], penalty=penalty if penalised else None,
                        **hyper)
            launches.append((table, c_buf, penalty if penalised else None, [positions[i] for i in idx]))
            if needs_c:
                cs.valid.update(sub_names)
                self._triton_pending += [(names[i], params[i]) for i in idx if _dist.is_dtensor(params[i])]
        if reusable and signature is not None:
            self._triton_plans[group_index] = dict(signature=signature, epoch=cs.epoch, steps=buf,
                                                   positions=positions_t, launches=launches)
        else:
            self._triton_plans.pop(group_index, None)
