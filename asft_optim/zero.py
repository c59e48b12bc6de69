"""DeepSpeed ZeRO (stages 1, 2, 3): AsFT on the flat fp32 partitions ZeRO hands its client optimizer.

ZeRO replaces each param group's tensors by flat fp32 master partitions, one per group and rank
(stage 3: one per sub-group, and it hands them over one at a time, inside each `step()` call).
A partition is a concatenation of pieces of the group's original tensors, with alignment padding;
a tensor may be split between ranks. The segments come from DeepSpeed's own bookkeeping, read off
the original parameters (which the optimizer keeps by name from when their group was added):

- stages 1 and 2 (and DeepSpeed's BF16_Optimizer): `p._hp_mapping` (`utils/tensor_fragment.py`,
  set by `link_hp_params`): `hp_fragment` is a view of this rank's partition,
  `hp_fragment_address` its (start, numel) there, `lp_fragment_address.start` the offset in the
  flattened original tensor. Only parameters overlapping the partition have a mapping.
- stage 3: `p._z3_optimizer.grad_position[id]` = (sub-group, start in its flat partition, numel of
  the per-rank partition incl. padding); this rank holds elements
  [rank·numel, rank·numel + numel) of the flattened tensor, cut at `p.ds_numel`.

Per partition the optimizer keeps (`Partition`): the segments, the direction laid out like the
partition (each rank reads only the rows its segments cover; the rescaling power of two and ‖v‖²
are global: one MAX and one SUM all-reduce per partition when it is first seen, the SUM also
carrying the partition's dots when it is first seen after a resume), W0 (snapshot of
the fp32 master partition at its first step, in `state[partition]["w0"]`), and each segment's
partial ⟨v, ΔW⟩. The per-tensor sums over ranks are one all-reduce of one fp32 per tensor per
optimizer step (`ZeroTensors.global_dots`), whatever the number of groups and sub-groups. The
partial dots of our own update carry over to the next step in the optimizer's `DotCache`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.adam import adam

from .anchors import Anchors
from .dot_cache import DotCache, Stamp
from .functional import (
    BoundDirection,
    StepTensors,
    asft_adamw,
    direction_dtype,
    exact_dots,
    partial_dots,
    penalty_coef,
    storage_w0,
    times_pow2,
)
from .metrics import DriftSums

__all__ = ["Segment", "Partition", "ZeroTensors", "is_zero_param", "find_segments", "check_config",
           "check_client", "initialize", "step_partition", "step_zero_group", "partition_w0s",
           "lora_refusal", "TRITON_REFUSAL", "original_shape"]

def is_zero_param(p: Tensor) -> bool:
    """Whether DeepSpeed ZeRO manages p: a stage-3 partitioned parameter, or a stage-1/2 one that
    `link_hp_params` linked (its `_hp_mapping` is None on ranks whose partition it misses)."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def original_shape(p: Tensor) -> torch.Size:
    """The shape of p before ZeRO-3 partitioning emptied it (`ds_shape`), else p's shape."""
    return torch.Size(p.ds_shape) if hasattr(p, "ds_shape") else p.shape


@dataclass(frozen=True)
class Segment:
    """A piece of one original tensor inside a flat partition (element offsets, not bytes).

    name: the parameter's name in its group; start/numel: where the piece lies in the partition;
    offset: its first element in the flattened original tensor; shape: the original tensor's shape.
    """
    name: str
    start: int
    numel: int
    offset: int
    shape: torch.Size


def find_segments(flat: Tensor, named: Sequence[tuple[str, Tensor]]) -> list[Segment]:
    """The segments of the flat partition `flat`, from the ZeRO bookkeeping of the original
    parameters `named` (the partition's group), ordered by their start in `flat`.

    Raises:
        RuntimeError when DeepSpeed's bookkeeping does not describe `flat` (a segment outside it).
    """
    out = []
    for name, p in named:
        if hasattr(p, "ds_id"):
            z3 = p._z3_optimizer
            sub, start, numel = z3.grad_position[z3.get_param_id(p)]
            if z3.fp32_partitioned_groups_flat[sub] is not flat:
                continue
            offset = z3._get_param_partition_rank(p) * numel
            numel = max(0, min(numel, p.ds_numel - offset))
        else:
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:
                continue
            start, numel = mapping.hp_fragment_address.start, mapping.hp_fragment_address.numel
            if mapping.hp_fragment.data_ptr() != flat.data_ptr() + start * flat.element_size():
                continue  # a fragment of another partition
            offset = mapping.lp_fragment_address.start
        if numel == 0:
            continue
        shape = original_shape(p)
        if start + numel > flat.numel() or offset + numel > shape.numel():
            raise RuntimeError(f"DeepSpeed ZeRO maps elements {offset}:{offset + numel} of '{name}' "
                               f"(shape {tuple(shape)}) to {start}:{start + numel} of a partition of "
                               f"{flat.numel()} elements: the bookkeeping does not fit")
        out.append(Segment(name, int(start), int(numel), int(offset), shape))
    return sorted(out, key=lambda s: s.start)


def process_group(named: Sequence[tuple[str, Tensor]]) -> Any:
    """The data-parallel group over which ZeRO partitions these parameters (one for all of them)."""
    groups = []
    for _, p in named:
        g = (p._z3_optimizer._get_param_partition_group(p) if hasattr(p, "ds_id")
             else getattr(p, "_dp_group", None))
        if not any(g is h for h in groups):
            groups.append(g)
    if len(groups) > 1:
        raise NotImplementedError("the parameters of one AsFTAdamW are partitioned over several "
                                  "DeepSpeed process groups (MoE experts, hpZ or MiCS): not supported")
    return groups[0] if groups else None


def _read_segment(anchors: Anchors, key: str, seg: Segment) -> Tensor:
    """Elements offset:offset+numel of the flattened direction `key`, reading only the rows they span."""
    if len(seg.shape) == 0:
        return anchors[key].reshape(1)
    row = seg.shape[1:].numel()  # > 0: a segment is never empty
    first, last = seg.offset // row, (seg.offset + seg.numel - 1) // row + 1
    rows = anchors.get_slice(key, first, last).reshape(-1)
    return rows[seg.offset - first * row: seg.offset - first * row + seg.numel]


@dataclass
class Partition:
    """One flat fp32 partition on this rank and its AsFT data.

    flat: the partition (1-D fp32, the client optimizer's parameter).
    segments: its anchored segments (`Segment`), ordered by start; gaps (padding, parameters
        without a direction) take plain AdamW steps.
    bounds: per segment the direction slice as a `BoundDirection` whose v is a view of `v` and
        whose `inv_nv2`, `scale` are those of the whole tensor.
    index: per segment the position of its tensor in `ZeroTensors.names`.
    v: the direction laid out like `flat` (zeros in the gaps).
    The carried partial dots of this rank's segments live in the optimizer's `DotCache`, keyed by
    tensor name with `flat` as the parameter (one validity rule for every kind).
    """
    flat: Tensor
    segments: list[Segment]
    bounds: list[BoundDirection]
    index: list[int]
    v: Tensor
    dots: Tensor | None = None  # per segment the global ⟨v, ΔW⟩, valid while `dots_stamp` holds
    dots_stamp: Stamp | None = None  # the `DotCache` rule for `flat` and its step, when `dots` were made

    def gaps(self) -> list[tuple[int, int]]:
        """(start, stop) of the partition's ranges outside every segment."""
        out, pos = [], 0
        for s in self.segments:
            if s.start > pos:
                out.append((pos, s.start))
            pos = s.start + s.numel
        if pos < self.flat.numel():
            out.append((pos, self.flat.numel()))
        return out


@dataclass
class ZeroTensors:
    """Every ZeRO-managed anchored tensor of one optimizer and the partitions seen so far.

    names: the anchored tensor names of all groups, in the order the groups were added (the same
        on every rank): row i of the per-step dot vector is tensor names[i].
    keys: name → the anchors key of its direction; numels: name → its number of elements.
    params: name → a weak reference to the original parameter (holding DeepSpeed's bookkeeping;
        weak, so that a parameter swapped out later, e.g. by accelerate for FSDP2, is freed).
    """
    names: list[str] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)
    numels: dict[str, int] = field(default_factory=dict)
    params: dict[str, weakref.ref] = field(default_factory=dict)
    partitions: list[Partition] = field(default_factory=list)
    group: Any = None

    def add(self, name: str, key: str | None, p: Tensor) -> None:
        """Register a trainable parameter of a group (key None: no direction)."""
        self.params[name] = weakref.ref(p)
        if key is not None and name not in self.keys:
            self.keys[name] = key
            self.names.append(name)
            self.numels[name] = original_shape(p).numel()

    def param(self, name: str) -> Tensor | None:
        """The original parameter `name`, or None (unknown, or freed)."""
        ref = self.params.get(name)
        return None if ref is None else ref()

    def owns(self, group: Mapping[str, Any]) -> bool:
        """Whether ZeRO replaced this param group's parameters by flat partitions (its originals
        carry ZeRO bookkeeping and none of them is still in the group)."""
        originals = [self.param(n) for n in group["param_names"]]
        return (any(p is not None and is_zero_param(p) for p in originals)
                and not any(p is q for p in group["params"] for q in originals))

    def partition(self, flat: Tensor, group_names: Sequence[str], anchors: Anchors, step: Tensor, cache: DotCache,
                  w0: Tensor | None = None) -> Partition:
        """The `Partition` of `flat`, bound on first sight (collective over the data-parallel group:
        a MAX and a SUM all-reduce). `w0`: the partition's W0 if it has one already (a resumed run):
        its global dots are then summed in the binding's SUM all-reduce. `step`: the partition's
        state "step" tensor, `cache`: the carried dots (`step` and `cache` stamp those dots)."""
        for part in self.partitions:
            if part.flat is flat:
                return part
        named = [(n, p) for n in group_names if (p := self.param(n)) is not None]
        part = self._bind(flat, named, anchors, w0)
        if w0 is not None:
            part.dots_stamp = cache.stamp(flat, step)
        self.partitions.append(part)
        return part

    def _bind(self, flat: Tensor, named: list[tuple[str, Tensor]], anchors: Anchors,
              w0: Tensor | None) -> Partition:
        group = process_group(named)
        if self.partitions and group is not self.group:
            raise NotImplementedError("the parameters of one AsFTAdamW are partitioned over several "
                                      "DeepSpeed process groups (MoE experts, hpZ or MiCS): not supported")
        self.group = group
        segments = [s for s in find_segments(flat, named) if s.name in self.keys]
        rows = [n for n, _ in named if n in self.keys]  # the group's anchored tensors, same on every rank
        row = {n: i for i, n in enumerate(rows)}
        for name in rows:
            key = self.keys[name]
            shape = original_shape(dict(named)[name])
            if tuple(anchors.shape(key)) != tuple(shape):
                raise ValueError(f"direction for '{name}' has shape {tuple(anchors.shape(key))} but the "
                                 f"parameter has shape {tuple(shape)}")
            if not anchors.dtype(key).is_floating_point:
                raise ValueError(f"direction for '{name}' has dtype {anchors.dtype(key)}; expected a floating dtype")
        pieces = [_read_segment(anchors, self.keys[s.name], s).to(flat.device) for s in segments]
        dtypes = {direction_dtype(d.dtype, flat.dtype) for d in pieces}
        v = torch.zeros_like(flat, dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32)
        device = self._comm_device(flat)
        amax = torch.zeros(len(rows), dtype=torch.float64, device=device)
        for s, d in zip(segments, pieces):
            amax[row[s.name]] = float(d.abs().max()) if bool(torch.isfinite(d).all()) else math.inf
        self._all_reduce(amax, dist.ReduceOp.MAX)
        bad = [n for n, a in zip(rows, amax.tolist()) if not math.isfinite(a)]
        if bad:
            raise ValueError(f"direction for '{bad[0]}' contains NaN or Inf"
                             + (f" (as do {len(bad) - 1} more)" if len(bad) > 1 else ""))
        exps = [math.floor(math.log2(a)) if a > 0 else 0 for a in amax.tolist()]
        scales = [math.ldexp(1.0, k) for k in exps]
        sums = torch.zeros(2, len(rows), dtype=torch.float64, device=device)  # ‖v‖², ⟨v, ΔW⟩
        views = []
        for s, d in zip(segments, pieces):
            piece = v[s.start: s.start + s.numel]
            if d.dtype == piece.dtype:  # exact in place, as `functional.rescaled`
                times_pow2(piece.copy_(d), -exps[row[s.name]])
            else:
                piece.copy_(times_pow2(d.to(torch.float64, copy=True), -exps[row[s.name]]))
            sums[0, row[s.name]] = piece.double().square().sum()
            views.append(piece)
        bounds = [BoundDirection(piece, 0.0, scales[row[s.name]]) for s, piece in zip(segments, views)]
        if w0 is not None and segments:
            dots = partial_dots([flat[s.start: s.start + s.numel] for s in segments],
                                [w0[s.start: s.start + s.numel] for s in segments], bounds)
            sums[1, [row[s.name] for s in segments]] = dots.double().to(device)
        self._all_reduce(sums, dist.ReduceOp.SUM)
        nv2 = sums[0].tolist()
        for s, b in zip(segments, bounds):
            n = nv2[row[s.name]]
            b.inv_nv2 = 1.0 / n if n > 0 else 0.0
        part = Partition(flat, segments, bounds, [self.names.index(s.name) for s in segments], v)
        if w0 is not None:
            part.dots = sums[1, [row[s.name] for s in segments]].float().to(flat.device)
        return part

    def _all_reduce(self, vec: Tensor, op: dist.ReduceOp) -> None:
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(vec, op=op, group=self.group)

    def _comm_device(self, flat: Tensor) -> torch.device:
        """Where the reduced vectors live: the current CUDA device under NCCL (ZeRO-Offload keeps
        partitions on the CPU), else the partition's device."""
        if dist.is_initialized() and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return flat.device

    # ------------------------------------------------------------------------------- dots
    def global_dots(self, part: Partition, w0s: Mapping[int, Tensor], steps: Mapping[int, Tensor],
                    cache: DotCache) -> Tensor:
        """Per segment of `part` the global ⟨v, ΔW⟩ (fp32, shape (len(segments),)).

        Valid dots (`Partition.dots_stamp` holds: the `DotCache` rule) are returned as they are.
        Otherwise the partial dots of every partition that has a W0 (`w0s`, `steps`: position in
        `self.partitions` → W0, state "step" tensor) are summed over ranks in one all-reduce of one
        fp32 per tensor: the partials `cache` carries from our last update where valid, else recomputed
        exactly (`functional.exact_dots`: the fold of the path that steps them, so a resumed run gets
        the carried dots' bits). Collective whenever it reduces; every rank takes the
        same decision (the same updates bump the same version counters).
        """
        at = next(i for i, q in enumerate(self.partitions) if q is part)
        if part.dots is not None and cache.holds(part.dots_stamp, part.flat, steps[at]):
            return part.dots
        vec = torch.zeros(len(self.names), dtype=torch.float32, device=self._comm_device(part.flat))
        for i, q in enumerate(self.partitions):
            if i not in w0s or not q.segments:
                continue
            carried = [cache.get_partial(s.name, q.flat, steps[i]) for s in q.segments]
            if any(c is None for c in carried):
                w0 = w0s[i]
                partial = exact_dots([q.flat[s.start: s.start + s.numel] for s in q.segments],
                                     [w0[s.start: s.start + s.numel] for s in q.segments], q.bounds)
            else:
                partial = torch.stack(carried)
            vec.index_add_(0, torch.tensor(q.index, device=vec.device), partial.to(vec.device, vec.dtype))
        self._all_reduce(vec, dist.ReduceOp.SUM)
        for i, q in enumerate(self.partitions):
            if i in w0s:
                q.dots = vec[q.index].to(q.flat.device)
                q.dots_stamp = cache.stamp(q.flat, steps[i])
        return part.dots

    # ------------------------------------------------------------------------------- drift
    def drift_sums(self, w0s: Mapping[int, Tensor]) -> dict[str, DriftSums]:
        """(‖ΔW‖², ‖d‖², ⟨ΔW, d⟩, numel) in float64 per tensor that has stepped, summed over its
        segments on every rank (one all-reduce; collective)."""
        device = self._comm_device(self.partitions[0].flat)
        sums = torch.zeros(len(self.names), 3, dtype=torch.float64, device=device)
        stepped = torch.zeros(len(self.names), dtype=torch.float64, device=device)
        for i, q in enumerate(self.partitions):
            if i not in w0s:
                continue
            for s, b, row in zip(q.segments, q.bounds, q.index):
                dw = q.flat[s.start: s.start + s.numel].double() - w0s[i][s.start: s.start + s.numel].double()
                v = b.v.double()
                sums[row] += torch.stack([dw.square().sum(), v.square().sum() * b.scale ** 2,
                                          (dw * v).sum() * b.scale]).to(device)
            for row in set(q.index):
                stepped[row] = 1.0
        both = torch.cat([sums, stepped[:, None]], dim=1)
        self._all_reduce(both, dist.ReduceOp.SUM)
        out = {}
        for name, (xx, uu, xu, n) in zip(self.names, both.tolist()):
            if n > 0:
                out[name] = DriftSums(xx, uu, xu, self.numels[name])
        return out


# ----------------------------------------------------------------------------------- config
def _get(config: Mapping[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(config, Mapping) or key not in config:
            return None
        config = config[key]
    return config


def check_config(config: Mapping[str, Any], *, has_lora: bool = False) -> None:
    """Refuse a DeepSpeed config under which AsFTAdamW cannot be ZeRO's client optimizer.

    Raises:
        ValueError naming the config key to set: ZeRO without "zero_allow_untested_optimizer": true
        (DeepSpeed accepts only its own list of optimizer classes otherwise); "offload_optimizer" to
        the CPU without "zero_force_ds_cpu_optimizer": false; NVMe offload (DeepSpeed swaps
        partitions and their state out of memory, W0 and the directions included: not supported);
        "elastic_checkpoint": true (its restore writes the optimizer state directly, bypassing the
        check that a resume uses the same anchors and λ); an "optimizer" section (DeepSpeed would
        build its own optimizer instead of AsFTAdamW).
        NotImplementedError for LoRA adapters under ZeRO (`has_lora`).
    """
    stage = _get(config, "zero_optimization", "stage") or 0
    if _get(config, "optimizer") is not None:
        raise ValueError('the DeepSpeed config has an "optimizer" section: DeepSpeed would build that '
                         "optimizer instead of AsFTAdamW; remove the section and pass the AsFTAdamW "
                         "as the client optimizer")
    if not stage:
        return
    if _get(config, "zero_allow_untested_optimizer") is not True:
        raise ValueError(f"DeepSpeed ZeRO stage {stage} accepts AsFTAdamW as its client optimizer only "
                         'with "zero_allow_untested_optimizer": true in the DeepSpeed config (it is not in '
                         "DeepSpeed's list of tested optimizers); add that key")
    device = _get(config, "zero_optimization", "offload_optimizer", "device")
    if device == "nvme":
        raise ValueError('"offload_optimizer": {"device": "nvme"} is not supported with AsFTAdamW: '
                         'DeepSpeed swaps partitions and their state to disk; use "device": "cpu"')
    if device == "cpu" and _get(config, "zero_force_ds_cpu_optimizer") is not False:
        raise ValueError('ZeRO-Offload ("offload_optimizer": {"device": "cpu"}) steps AsFTAdamW on the '
                         'CPU partitions only with "zero_force_ds_cpu_optimizer": false in the DeepSpeed '
                         "config; add that key")
    if _get(config, "zero_optimization", "elastic_checkpoint"):
        raise ValueError('"elastic_checkpoint": true is not supported with AsFTAdamW: its restore bypasses '
                         "the check that a resume uses the same anchors and λ; remove the key")
    if has_lora:
        raise NotImplementedError(lora_refusal(stage))


TRITON_REFUSAL = ("impl='triton' does not step DeepSpeed ZeRO partitions: build the optimizer with impl=None "
                  "or impl='torch'")


def lora_refusal(stage: int | str) -> str:
    """Why LoRA adapters cannot be trained under ZeRO with AsFTAdamW."""
    return (f"LoRA adapters under DeepSpeed ZeRO stage {stage} are not supported by AsFTAdamW (the "
            "penalty on s·B·A needs whole A and B, which ZeRO splits into flat partitions); train LoRA "
            "without ZeRO (its adapters are small: DDP, or DeepSpeed with stage 0), or full parameters "
            "under ZeRO")


# ----------------------------------------------------------------------------------- step
@torch.no_grad()
def step_partition(part: Partition, t: StepTensors, dots: Tensor, *, coef: float, penalty: str, impl: str,
                   **adam_kwargs: Any) -> list[Tensor] | None:
    """AdamW on g̃ = g + coef·R over one flat partition, R taken per segment with its tensor's
    global dot; gaps (padding, tensors without a direction) take plain AdamW steps.

    t: the partition's tensors (one entry: `part.flat`, its gradient, moments, step count, W0; the
    step count is incremented once). dots: per segment the global ⟨v, ΔW⟩ (fp32, shape
    (len(part.segments),)). Segments and gaps are stepped as views of the flat tensors, so the
    update is elementwise what torch's AdamW on the whole partition would be, plus the penalty.
    impl: "torch", "native" or "reference" (`functional.asft_adamw`).
    Returns the new partial ⟨v, ΔW⟩ per segment (impl "torch"/"native"), else None.
    """
    def views(one: Sequence[Tensor], ranges: list[tuple[int, int]]) -> list[Tensor]:
        return [x[a:b] for x in one for a, b in ranges]  # (an empty list stays empty: no amsgrad)

    (step,) = t.state_steps
    segs = [(s.start, s.start + s.numel) for s in part.segments]
    gaps = part.gaps()
    ams = t.max_exp_avg_sqs if adam_kwargs["amsgrad"] else []
    new = None
    if segs:
        new = asft_adamw(StepTensors(views(t.params, segs), views(t.grads, segs), views(t.exp_avgs, segs),
                                     views(t.exp_avg_sqs, segs), views(ams, segs), [step.clone() for _ in segs],
                                     views(t.w0s, segs), part.bounds, list(dots.unbind())),
                         coef=coef, penalty=penalty, impl=impl, **adam_kwargs)
    if gaps:
        adam(views(t.params, gaps), views(t.grads, gaps), views(t.exp_avgs, gaps), views(t.exp_avg_sqs, gaps),
             views(ams, gaps), [step.clone() for _ in gaps], **adam_kwargs)
    step.add_(1)
    return list(new.unbind()) if isinstance(new, Tensor) else new  # one vector when all went native


def partition_w0s(zero: ZeroTensors, state: Mapping[Tensor, Any]) -> dict[int, Tensor]:
    """W0 (`state[flat]["w0"]`) of each partition that has one, by its position in `zero.partitions`."""
    out = {}
    for i, part in enumerate(zero.partitions):
        st = state.get(part.flat)
        if st and "w0" in st:
            out[i] = st["w0"]
    return out


@torch.no_grad()
def step_zero_group(group: Mapping[str, Any], t: StepTensors, zero: ZeroTensors, dots: DotCache, anchors: Anchors,
                    state: Mapping[Tensor, dict[str, Any]], adam_kwargs: dict[str, Any]) -> None:
    """Step a param group whose tensors ZeRO replaced by flat fp32 partitions (stage 3: the one
    sub-group it hands over now): per partition, AdamW with the penalty of each segment from its
    tensor's global ⟨v, ΔW⟩ (`ZeroTensors.global_dots`); W0 is the fp32 master partition at its
    first step, kept in `state[flat]["w0"]`. Never the Triton path.

    t: the partitions that have a gradient, with their lazy AdamW state made (names empty; w0s,
    directions and dots unused). zero: the optimizer's partitions; dots: the carried-dot cache (each
    segment's partial of this rank, summed at the next step); anchors: the directions; state: the
    host optimizer's per-tensor state; adam_kwargs: torch's functional `adam` keyword arguments of
    the group.
    """
    anchored = any(n in zero.keys for n in group["param_names"])
    lam, penalty = group["asft_lambda"], group["penalty"]

    def plain(one: StepTensors) -> None:
        adam(one.params, one.grads, one.exp_avgs, one.exp_avg_sqs, one.max_exp_avg_sqs, one.state_steps,
             **adam_kwargs)

    for k, flat in enumerate(t.params):
        one = t.select([k])
        if not anchored:
            plain(one)
            continue
        st = state[flat]
        part = zero.partition(flat, group["param_names"], anchors, st["step"], dots, st.get("w0"))
        if "w0" not in st:
            st["w0"] = storage_w0(flat.detach().clone())
            part_dots = torch.zeros(len(part.segments), device=flat.device)
        elif penalty == "full" or lam == 0:
            part_dots = torch.zeros(len(part.segments), device=flat.device)
        else:
            w0s = partition_w0s(zero, state)
            part_dots = zero.global_dots(part, w0s, {i: state[zero.partitions[i].flat]["step"] for i in w0s}, dots)
        if lam == 0:
            plain(one)
            continue
        new = step_partition(part, one._replace(w0s=[st["w0"]]), part_dots, coef=penalty_coef(lam, group["maximize"]),
                             penalty=penalty, impl=group["impl"] or "torch", **adam_kwargs)
        for seg, d in zip(part.segments, new or ()):
            dots.put_partial(seg.name, flat, st["step"], d)


def load_config(config: Mapping[str, Any] | str | Any) -> Mapping[str, Any]:
    """A DeepSpeed config given as a dict or as the path of a JSON file."""
    if isinstance(config, Mapping):
        return config
    import json
    from pathlib import Path
    return json.loads(Path(config).read_text())


def check_client(optimizer: torch.optim.Optimizer, config: Mapping[str, Any]) -> None:
    """`check_config` for this client optimizer, and refuse impl="triton" groups (ZeRO partitions
    step on the PyTorch path), impl="native" ones unless ZeRO-Offload puts the partitions on the CPU,
    and an optimizer with a penalty from `asft_optim.attach` (its hooks would see ZeRO's flat
    partitions)."""
    if any("asft_param_names" in g for g in getattr(optimizer, "param_groups", [])):  # `asft_optim.attach`'s key
        raise ValueError("DeepSpeed ZeRO flattens a client optimizer's parameters into partitions, which "
                         "asft_optim.attach does not follow: use AsFTAdamW as the client optimizer")
    groups = getattr(optimizer, "param_groups", [])
    records = getattr(optimizer, "records", None)  # AsFTAdamW's `records.ParamRecords`
    lora = records is not None and any(records.has_lora(g.get("param_names", ())) for g in groups)
    check_config(config, has_lora=lora)
    stage = _get(config, "zero_optimization", "stage") or 0
    if stage and any(g.get("impl") == "triton" for g in groups):
        raise ValueError(TRITON_REFUSAL)
    if (stage and any(g.get("impl") == "native" for g in groups)
            and _get(config, "zero_optimization", "offload_optimizer", "device") != "cpu"):
        raise ValueError("impl='native' steps DeepSpeed ZeRO partitions only on the CPU, under ZeRO-Offload "
                         '("offload_optimizer": {"device": "cpu"}); build the optimizer with impl=None or '
                         "impl='torch'")


def initialize(*, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               config: Mapping[str, Any] | str, **kwargs: Any) -> tuple:
    """`deepspeed.initialize` with an AsFTAdamW client optimizer, after `check_client`: an
    unsupported setting fails here, with the config key to change, not at the first step.

    Returns what `deepspeed.initialize` returns (engine, optimizer, data loader, scheduler).
    """
    import deepspeed
    check_client(optimizer, load_config(config))
    return deepspeed.initialize(model=model, optimizer=optimizer, config=config, **kwargs)
