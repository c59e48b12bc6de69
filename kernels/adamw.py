"""Fused AsFT + AdamW step: one multi-tensor Triton launch per group (plus a tiny fold launch).

Data flow for one launch (all tensors on one device, one dtype per role):

    pointer table  int64 [T, 6]   addresses of p, exp_avg, exp_avg_sq, max_exp_avg_sq, W0, v
    grad table     int64 [T]      addresses of the gradients (apart: they move every step when
                                  gradients are re-allocated, and are then the only upload)
    block table    int32, int64 [B]  (tensor index, first element) of each program's BLOCK elements
    c              fp32 [slots]   c = ⟨v, p - W0⟩/‖v‖² per tensor, read at each tensor's slot
    partials       fp32 [B]       ⟨v, p_new - W0⟩ of each program, from the values it stores

`_update_kernel` adds g̃ = g + coef·R(ΔW) (see `asft_optim.functional`) and takes the AdamW step on
every block, reading p, g, the moments, W0 and v once and writing p and the moments once. From the
new p *as stored* it also computes the block's ⟨v, p_new - W0⟩: a tensor of one block writes its c
for the next step directly; for larger tensors `_fold_kernel` sums the partials in a fixed order
(no float atomics: bitwise reproducible runs and DDP replicas). `_dot_kernel` is the exact
reduction of ⟨v, p - W0⟩ for the first step after a load or an outside write (`resync()`).

Hyper-parameters (lr, betas, eps, weight decay, λ, bias corrections) are runtime arguments, so a
scheduler never triggers a recompile; only on/off features and dtypes are `tl.constexpr`. Math is
fp32 and each store casts to its buffer's dtype. Parameters may be fp32, bf16 or fp16. The moments
are kept in whatever dtype the optimizer state holds: torch's AdamW creates them in the parameter's
dtype (bf16 moments for bf16 parameters), and so does AsFTAdamW, so that state_dicts interchange
with the torch path; the kernel reads fp32 moments of bf16 parameters just as well. W0 and v are
bf16 where that is exact (`asft_optim.functional.storage_w0`), else in the parameter's dtype.
Offsets are int64 (tensors above 2**31 elements); only each tensor's tail block is masked. A launch
whose base addresses are all 16-byte aligned takes vector hints: every stream is split into VEC
contiguous elements per access, VEC = 16 bytes / the widest element of the launch (4 when any
stream is fp32, 8 when all are 16-bit). All streams then share one register layout (fp32 moments
in 128-bit accesses, bf16 W0 and v in 64-bit ones): with 16-byte hints on every stream, bf16 streams
would take 8 elements per thread where fp32 ones take 4, and the layouts would be converted through
shared memory. The launch table keeps the shapes (block tables, built once per set of shapes) apart
from the addresses (the pointer table, uploaded again when a tensor moves). Launches run under a
device guard on the tensors' device.
"""

from __future__ import annotations

import array
import contextlib
import functools
import math
import operator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["BLOCK", "NUM_WARPS", "OTHER_ROLES", "PENALTY_CODES", "ROLES", "CSlots", "LaunchTable", "Row", "all_aligned",
           "make_table",
           "fused_step_", "exact_c_", "is_interpreted", "launch_counter", "row_pointers",
           "split_pointers"]

BLOCK = 2048      # elements per program of the update and dot kernels
NUM_WARPS = 8     # 8 elements per thread and stream: vector accesses of VEC elements each
FOLD_BLOCK = 4096  # partials summed per iteration of the fold kernel (256 iterations for 2**31 elements)
FOLD_WARPS = 8


class Row(NamedTuple):
    """One tensor's role tensors in a launch (None where a role is unused), in pointer-table order."""
    param: Tensor
    grad: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    max_exp_avg_sq: Tensor | None
    w0: Tensor | None
    direction: Tensor | None


ROLES = Row._fields
OTHER_ROLES = tuple(role for role in ROLES if role != "grad")  # the pointer table's columns
_OTHERS = [ROLES.index(role) for role in OTHER_ROLES]
PENALTY_CODES = {"orthogonal": 0, "parallel": 1, "full": 2}
_ALIGN = 16       # bytes; every base address must be a multiple for the vector-load hints

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

launch_counter = [0]  # kernels launched by this module since import (benchmarks read it)


def is_interpreted() -> bool:
    """True when Triton runs these kernels in its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_update_kernel, triton.runtime.JITFunction)


# ----------------------------------------------------------------------------------------- kernels
@triton.jit
def _addr(row, k: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Role k's base address from a pointer-table row (`OTHER_ROLES` order), typed; 16-byte aligned
    when ALIGNED."""
    ptr = tl.load(row + k).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _update_block(p_ptr, g_ptr, m_ptr, sq_ptr, x_ptr, w0_ptr, v_ptr, offs, n, c, coef, decay, omb1, beta2,
                  omb2, eps, step_size, bc2_sqrt, P_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr,
                  PENALTY: tl.constexpr, HAS_PEN: tl.constexpr, AMSGRAD: tl.constexpr,
                  MAXIMIZE: tl.constexpr, MASKED: tl.constexpr):
    """The step for BLOCK elements at `offs` of one tensor; returns ⟨v, p_new - W0⟩ over them (0
    without HAS_PEN).

    MASKED: the tensor's tail block (lanes past n are masked and add nothing to the dot, even where
    they compute 0/0 with eps = 0); otherwise no mask, so that aligned accesses are vectors.
    """
    if MASKED:
        mask = offs < n
        other = 0.0
    else:
        mask = None
        other = None
    p = tl.load(p_ptr + offs, mask=mask, other=other).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=other).to(tl.float32)
    part = 0.0
    if HAS_PEN:
        w0 = tl.load(w0_ptr + offs, mask=mask, other=other).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=other).to(tl.float32)
        dw = p - w0
        if PENALTY == 0:
            g = g + coef * (dw - c * v)
        elif PENALTY == 1:
            g = g + coef * (c * v)
        else:
            g = g + coef * dw
    if MAXIMIZE:
        g = -g
    m = tl.load(m_ptr + offs, mask=mask, other=other).to(tl.float32)
    sq = tl.load(sq_ptr + offs, mask=mask, other=other).to(tl.float32)
    m = (m + omb1 * (g - m)).to(M_DTYPE)
    sq = (sq * beta2 + omb2 * (g * g)).to(M_DTYPE)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(sq_ptr + offs, sq, mask=mask)
    if AMSGRAD:
        sq = tl.maximum(tl.load(x_ptr + offs, mask=mask, other=other), sq)
        tl.store(x_ptr + offs, sq, mask=mask)
    # the update reads the moments as stored, like torch's AdamW
    denom = tl.div_rn(tl.sqrt_rn(sq.to(tl.float32)), bc2_sqrt) + eps
    p_new = (p * decay - step_size * tl.div_rn(m.to(tl.float32), denom)).to(P_DTYPE)
    tl.store(p_ptr + offs, p_new, mask=mask)
    if HAS_PEN:
        prod = v * (p_new.to(tl.float32) - w0)  # the same expression as _dot_block
        if MASKED:
            prod = tl.where(mask, prod, 0.0)
        part = tl.sum(prod, axis=0)
    return part


@triton.jit
def _update_kernel(table, grad_table, numels, blk_tensor, blk_start, c_buf, cslot, inv_nv2, steps, partials,
                   coef, decay, omb1, beta2, omb2, eps, step_size, bc2_sqrt,
                   P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr,
                   W0_DTYPE: tl.constexpr, V_DTYPE: tl.constexpr, PENALTY: tl.constexpr,
                   HAS_PEN: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                   PER_TENSOR_STEP: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr,
                   BLOCK: tl.constexpr):
    """One program per block. c of a one-block tensor is written here; others go via partials."""
    pid = tl.program_id(0)
    t = tl.load(blk_tensor + pid)
    start = tl.load(blk_start + pid)  # int64: tensors above 2**31 elements
    n = tl.load(numels + t)
    # the addresses before the tail test: their loads do not wait for n
    row = table + t * 6
    p_ptr = _addr(row, 0, P_DTYPE, ALIGNED)
    g_ptr = _addr(grad_table + t, 0, G_DTYPE, ALIGNED)
    m_ptr = _addr(row, 1, M_DTYPE, ALIGNED)
    sq_ptr = _addr(row, 2, M_DTYPE, ALIGNED)
    x_ptr = sq_ptr
    if AMSGRAD:
        x_ptr = _addr(row, 3, M_DTYPE, ALIGNED)
    if HAS_PEN:
        w0_ptr = _addr(row, 4, W0_DTYPE, ALIGNED)
        v_ptr = _addr(row, 5, V_DTYPE, ALIGNED)
    else:  # not read
        w0_ptr = p_ptr
        v_ptr = p_ptr
    offs = start + tl.arange(0, BLOCK)
    if ALIGNED:  # VEC contiguous elements per access in every stream: one register layout for all
        offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), VEC)
    NEED_C: tl.constexpr = HAS_PEN and PENALTY != 2
    c = 0.0
    if NEED_C:
        slot = tl.load(cslot + t)
        c = tl.load(c_buf + slot)
    if PER_TENSOR_STEP:
        step_size = tl.load(steps + 2 * t)
        bc2_sqrt = tl.load(steps + 2 * t + 1)
    if start + BLOCK <= n:
        part = _update_block(p_ptr, g_ptr, m_ptr, sq_ptr, x_ptr, w0_ptr, v_ptr, offs, n, c, coef, decay, omb1,
                             beta2, omb2, eps, step_size, bc2_sqrt, P_DTYPE, M_DTYPE, PENALTY, HAS_PEN,
                             AMSGRAD, MAXIMIZE, False)
    else:
        part = _update_block(p_ptr, g_ptr, m_ptr, sq_ptr, x_ptr, w0_ptr, v_ptr, offs, n, c, coef, decay, omb1,
                             beta2, omb2, eps, step_size, bc2_sqrt, P_DTYPE, M_DTYPE, PENALTY, HAS_PEN,
                             AMSGRAD, MAXIMIZE, True)
    if NEED_C:
        if n <= BLOCK:  # this program saw the whole tensor: no fold needed
            tl.store(c_buf + slot, part * tl.load(inv_nv2 + t))
        else:
            tl.store(partials + pid, part)


@triton.jit
def _dot_block(p_ptr, w0_ptr, v_ptr, offs, n, MASKED: tl.constexpr):
    """⟨v, p - W0⟩ over BLOCK elements at `offs` of one tensor, in fp32 (masked lanes load 0)."""
    if MASKED:
        mask = offs < n
        other = 0.0
    else:
        mask = None
        other = None
    p = tl.load(p_ptr + offs, mask=mask, other=other)
    w0 = tl.load(w0_ptr + offs, mask=mask, other=other).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=other).to(tl.float32)
    return tl.sum(v * (p.to(tl.float32) - w0), axis=0)


@triton.jit
def _dot_kernel(table, numels, blk_tensor, blk_start, c_buf, cslot, inv_nv2, partials,
                P_DTYPE: tl.constexpr, W0_DTYPE: tl.constexpr, V_DTYPE: tl.constexpr,
                ALIGNED: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr):
    """The exact reduction pass: per block ⟨v, p - W0⟩, stored like `_update_kernel` stores it."""
    pid = tl.program_id(0)
    t = tl.load(blk_tensor + pid)
    start = tl.load(blk_start + pid)
    n = tl.load(numels + t)
    row = table + t * 6
    p_ptr = _addr(row, 0, P_DTYPE, ALIGNED)
    w0_ptr = _addr(row, 4, W0_DTYPE, ALIGNED)
    v_ptr = _addr(row, 5, V_DTYPE, ALIGNED)
    offs = start + tl.arange(0, BLOCK)
    if ALIGNED:
        offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), VEC)
    if start + BLOCK <= n:
        part = _dot_block(p_ptr, w0_ptr, v_ptr, offs, n, False)
    else:
        part = _dot_block(p_ptr, w0_ptr, v_ptr, offs, n, True)
    if n <= BLOCK:
        tl.store(c_buf + tl.load(cslot + t), part * tl.load(inv_nv2 + t))
    else:
        tl.store(partials + pid, part)


@triton.jit
def _fold_kernel(partials, fold_tensors, first_block, nblocks, cslot, inv_nv2, c_buf, FOLD: tl.constexpr):
    """c[slot(t)] = inv_nv2[t] · Σ partials of tensor t in a fixed order; one program per tensor
    of more than one block (`fold_tensors`)."""
    t = tl.load(fold_tensors + tl.program_id(0))
    first = tl.load(first_block + t)
    nb = tl.load(nblocks + t)
    acc = tl.zeros([FOLD], dtype=tl.float32)
    for i in range(0, nb, FOLD):
        idx = i + tl.arange(0, FOLD)
        acc += tl.load(partials + first + idx, mask=idx < nb, other=0.0)
    tl.store(c_buf + tl.load(cslot + t), tl.sum(acc, axis=0) * tl.load(inv_nv2 + t))


# ----------------------------------------------------------------------------------------- launchers
@dataclass
class LaunchTable:
    """Device tables for one multi-tensor launch (T tensors split into B blocks of `block` elements).

    pointers: int64 [T, 6] addresses per `OTHER_ROLES` (0 where a role is unused); grad_pointers:
    int64 [T] the gradients'. `upload` replaces them when tensors move; everything else depends on
    the shapes only.
    numels: int64 [T]. blk_tensor: int32 [B]. blk_start: int64 [B] (first element of each block).
    first_block, nblocks: int32 [T] (each tensor's blocks are contiguous in the block table).
    fold_tensors: int32 [F] the tensors of more than one block (their c is folded from partials).
    cslot: int32 [T] index of each tensor's c. inv_nv2: fp32 [T] 1/‖v‖².
    partials: fp32 [B] per-block dots. dtypes: torch dtype per role (None where unused).
    host_grads, host_others: the addresses both tables hold, as flat lists (T, T·6);
    grads_aligned, others_aligned: each list's addresses are multiples of 16 bytes.
    vec: elements per vector access of every stream: 16 bytes / the widest dtype of the launch.
    """
    pointers: Tensor
    grad_pointers: Tensor
    numels: Tensor
    blk_tensor: Tensor
    blk_start: Tensor
    first_block: Tensor
    nblocks: Tensor
    fold_tensors: Tensor
    cslot: Tensor
    inv_nv2: Tensor
    partials: Tensor
    dtypes: tuple[torch.dtype | None, ...]
    host_grads: list[int]
    host_others: list[int]
    grads_aligned: bool
    others_aligned: bool
    block: int

    @property
    def num_blocks(self) -> int:
        return self.blk_tensor.numel()

    @property
    def device(self) -> torch.device:
        return self.pointers.device

    @property
    def vec(self) -> int:
        return _ALIGN // max(d.itemsize for d in self.dtypes if d is not None)

    def upload(self, grads: list[int], others: list[int]) -> None:
        """Replace the addresses in the tables where they differ (`split_pointers`' layout; the
        caller has checked that the tensors have the shapes, strides, dtypes and device this table
        was built for) and recompute `aligned`."""
        if grads != self.host_grads:
            self.grad_pointers.copy_(_host_int64(grads, self.grad_pointers.is_cuda), non_blocking=True)
            self.host_grads, self.grads_aligned = grads, all_aligned(grads)
        if others != self.host_others:
            self.pointers.copy_(_host_int64(others, self.pointers.is_cuda).view(self.pointers.shape),
                                non_blocking=True)
            self.host_others, self.others_aligned = others, all_aligned(others)

    @property
    def aligned(self) -> bool:
        """Every base address is a multiple of 16 bytes (enables the vector hints)."""
        return self.grads_aligned and self.others_aligned


def _host_int64(values: list[int], pin: bool) -> Tensor:
    """`values` as an int64 CPU tensor (through a C array: a quarter of `torch.tensor`'s time), in
    pinned memory when `pin`: a non-blocking copy from there is queued without waiting for the
    stream, and torch's caching host allocator keeps the block until the copy has run."""
    t = torch.frombuffer(array.array("q", values), dtype=torch.int64)
    return t.pin_memory() if pin else t


def all_aligned(ptrs: list[int]) -> bool:
    """Every address in `ptrs` is a multiple of 16 bytes (unused roles are 0)."""
    return not functools.reduce(operator.or_, ptrs, 0) % _ALIGN


def row_pointers(row: Row) -> list[int]:
    """The 7 addresses of a row, in `ROLES` order (0 where a role is unused)."""
    return [0 if x is None else x.data_ptr() for x in row]


def split_pointers(rows: list[Row]) -> tuple[list[int], list[int]]:
    """The gradients' addresses (T) and the other roles' (T·6, `OTHER_ROLES` order)."""
    others: list[int] = []
    for r in rows:
        others += (0 if r[k] is None else r[k].data_ptr() for k in _OTHERS)
    return [r.grad.data_ptr() for r in rows], others


def make_table(roles: list[Row], cslots: list[int], inv_nv2: list[float],
               names: list[str], block: int = BLOCK) -> LaunchTable:
    """Build the device tables for tensors `roles[i]` (a `Row`; None where a role is unused).

    All tensors of one role must share a dtype and, within one tensor i, every role must have p's
    shape and strides and be dense (then all are walked as flat memory in the same order).
    Raises ValueError naming the parameter otherwise.
    """
    if not roles:
        raise ValueError("make_table needs at least one tensor")
    device = roles[0][0].device
    dtypes = tuple(None if x is None else x.dtype for x in roles[0])
    for row, name in zip(roles, names, strict=True):
        p = row[0]
        if not _dense(p):
            raise ValueError(f"impl='triton' needs dense parameters; '{name}' has shape {tuple(p.shape)} "
                             f"and strides {p.stride()}")
        for k, x in enumerate(row):
            want = dtypes[k]
            if (x is None) != (want is None) or (x is not None and x.dtype != want):
                raise ValueError(f"'{name}': {ROLES[k]} dtype {None if x is None else x.dtype} differs "
                                 f"from {want} of the other tensors in this launch")
            if x is not None and (x.device != device or x.shape != p.shape or x.stride() != p.stride()):
                raise ValueError(f"'{name}': {ROLES[k]} has device/shape/strides {x.device}/"
                                 f"{tuple(x.shape)}/{x.stride()}, the parameter {p.device}/"
                                 f"{tuple(p.shape)}/{p.stride()}")
    # block tables from the shapes alone, built with tensor ops (a 1B-parameter model has ~500k blocks)
    numels = torch.tensor([r[0].numel() for r in roles], dtype=torch.int64)
    counts = (numels + block - 1) // block
    first = torch.cumsum(counts, 0) - counts
    num_blocks = int(counts.sum())
    if num_blocks >= 2**31:
        raise ValueError(f"{num_blocks} blocks exceed the int32 block index; raise BLOCK")
    blk_tensor = torch.repeat_interleave(torch.arange(len(roles), dtype=torch.int32), counts)
    blk_start = (torch.arange(num_blocks, dtype=torch.int64) - torch.repeat_interleave(first, counts)) * block

    def dev(x: Tensor) -> Tensor:
        return x.to(device, non_blocking=True)

    table = LaunchTable(
        pointers=torch.zeros(len(roles), len(_OTHERS), dtype=torch.int64, device=device),
        grad_pointers=torch.zeros(len(roles), dtype=torch.int64, device=device), numels=dev(numels),
        blk_tensor=dev(blk_tensor), blk_start=dev(blk_start), first_block=dev(first.to(torch.int32)),
        nblocks=dev(counts.to(torch.int32)), fold_tensors=dev(torch.nonzero(counts > 1).view(-1).to(torch.int32)),
        cslot=dev(torch.tensor(cslots, dtype=torch.int32)), inv_nv2=dev(torch.tensor(inv_nv2, dtype=torch.float32)),
        partials=torch.zeros(max(num_blocks, 1), dtype=torch.float32, device=device),
        dtypes=dtypes, host_grads=[], host_others=[], grads_aligned=False, others_aligned=False, block=block)
    table.upload(*split_pointers(roles))
    return table


def _dense(t: Tensor) -> bool:
    """t covers its memory without gaps or overlaps (any dim order: contiguous, transposed, channels_last)."""
    if t.is_contiguous():
        return True
    order = sorted(range(t.dim()), key=lambda i: -t.stride(i))
    return t.permute(order).is_contiguous()


def _tl(dtype: torch.dtype | None, role: str):
    if dtype is None:
        return tl.float32  # unused role: any type; the kernel never loads it
    if dtype not in _TL_DTYPES:
        raise ValueError(f"impl='triton' supports float32, bfloat16 and float16 tensors; {role} is {dtype}")
    return _TL_DTYPES[dtype]


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """A guard that makes `device` current while its launches are issued (Triton launches on the
    current CUDA device, which need not be the tensors' one)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _fold(table: LaunchTable, c_buf: Tensor) -> None:
    """c of the tensors of more than one block, from the partials (one-block tensors wrote theirs)."""
    if table.fold_tensors.numel() == 0:
        return
    with _on(table.device):
        _fold_kernel[(table.fold_tensors.numel(),)](table.partials, table.fold_tensors, table.first_block,
                                                    table.nblocks, table.cslot, table.inv_nv2, c_buf,
                                                    FOLD=FOLD_BLOCK, num_warps=FOLD_WARPS)
    launch_counter[0] += 1


def exact_c_(table: LaunchTable, c_buf: Tensor) -> None:
    """c ← ⟨v, p - W0⟩/‖v‖² for every tensor of `table`, from the parameters as they are now."""
    if table.num_blocks == 0:
        return
    d = table.dtypes
    with _on(table.device):
        _dot_kernel[(table.num_blocks,)](table.pointers, table.numels, table.blk_tensor, table.blk_start,
                                         c_buf, table.cslot, table.inv_nv2, table.partials,
                                         P_DTYPE=_tl(d[0], "param"),
                                         W0_DTYPE=_tl(d[5], "w0"), V_DTYPE=_tl(d[6], "direction"),
                                         ALIGNED=table.aligned, VEC=table.vec, BLOCK=table.block,
                                         num_warps=NUM_WARPS)
    launch_counter[0] += 1
    _fold(table, c_buf)


def fused_step_(table: LaunchTable, c_buf: Tensor, steps: list[float], *, lr: float, beta1: float,
                beta2: float, eps: float, weight_decay: float, coef: float, penalty: str | None,
                amsgrad: bool, maximize: bool) -> None:
    """One AsFT-AdamW step for every tensor of `table`; c_buf then holds c for the next step.

    steps: each tensor's step count after the increment (bias corrections are computed here in
    float64, as torch does). penalty None: plain AdamW (no W0/v in the table). coef = ±2λ (the
    sign already flipped for `maximize`, as in `asft_optim.functional`).
    """
    if table.num_blocks == 0:
        return
    d = table.dtypes
    has_pen = penalty is not None
    if has_pen and (d[5] is None or d[6] is None):
        raise ValueError("a penalised launch needs W0 and direction pointers")
    if amsgrad and d[4] is None:
        raise ValueError("amsgrad needs max_exp_avg_sq pointers")
    if d[3] != d[2] or (amsgrad and d[4] != d[2]):
        raise ValueError(f"the moments must share one dtype, got {d[2]}, {d[3]}, {d[4]}")

    def corrections(step: float) -> tuple[float, float]:
        return lr / (1 - beta1 ** step), math.sqrt(1 - beta2 ** step)

    uniform = steps.count(steps[0]) == len(steps)
    step_size, bc2_sqrt = corrections(steps[0])
    per_tensor = table.partials  # placeholder pointer; not read when the steps are uniform
    if not uniform:
        per_tensor = torch.tensor([corrections(s) for s in steps], dtype=torch.float32).to(
            table.device, non_blocking=True)
    code = PENALTY_CODES[penalty] if has_pen else 2
    with _on(table.device):
        _update_kernel[(table.num_blocks,)](
            table.pointers, table.grad_pointers, table.numels, table.blk_tensor, table.blk_start, c_buf, table.cslot,
            table.inv_nv2, per_tensor, table.partials,
            coef, 1.0 - lr * weight_decay, 1.0 - beta1, beta2, 1.0 - beta2, eps, step_size, bc2_sqrt,
            P_DTYPE=_tl(d[0], "param"), G_DTYPE=_tl(d[1], "grad"), M_DTYPE=_tl(d[2], "exp_avg"),
            W0_DTYPE=_tl(d[5], "w0"), V_DTYPE=_tl(d[6], "direction"), PENALTY=code, HAS_PEN=has_pen,
            AMSGRAD=amsgrad, MAXIMIZE=maximize, PER_TENSOR_STEP=not uniform, ALIGNED=table.aligned,
            VEC=table.vec, BLOCK=table.block, num_warps=NUM_WARPS)
    launch_counter[0] += 1
    if has_pen and code != 2:
        _fold(table, c_buf)


class CSlots:
    """c = ⟨v, p - W0⟩/‖v‖² between steps: one fp32 slot per parameter name, one buffer per device.

    Which slots may be read is the optimizer's business (`asft_optim.dot_cache`); a buffer may be
    reallocated when new names arrive (old values kept), so callers look it up at each launch.
    """

    def __init__(self) -> None:
        self.slot: dict[str, int] = {}
        self.buffers: dict[torch.device, Tensor] = {}

    def slots(self, names: list[str], device: torch.device) -> list[int]:
        """Slots of `names` (allocated on first use; the device buffer grows, keeping old values)."""
        for name in names:
            self.slot.setdefault(name, len(self.slot))
        buf = self.buffers.get(device)
        if buf is None or buf.numel() < len(self.slot):
            new = torch.zeros(max(64, 2 * len(self.slot)), dtype=torch.float32, device=device)
            if buf is not None:
                new[: buf.numel()] = buf
            self.buffers[device] = new
        return [self.slot[n] for n in names]
