"""`DotCache`: every entry has one meaning, read only by its own getter, under the one validity rule."""

import torch

from asft_optim.dot_cache import DotCache


def _cache() -> tuple[DotCache, dict[str, torch.Tensor]]:
    t = {"p": torch.zeros(3), "q": torch.zeros(4), "flat": torch.zeros(5), "step": torch.zeros(()),
         "qstep": torch.zeros(()), "fstep": torch.zeros(())}
    cache = DotCache()
    cache.put("dense", t["p"], t["step"], torch.tensor(1.5))
    cache.put_slot("slot", t["p"], t["step"])
    cache.put_partial("seg", t["flat"], t["fstep"], torch.tensor(2.5))
    cache.put_vector(["a", "b"], [t["p"], t["q"]], [t["step"], t["qstep"]],
                     torch.tensor([3.0, 4.0], dtype=torch.float64))
    return cache, t


def test_each_entry_is_read_by_its_own_getter_only():
    cache, t = _cache()
    p, step = t["p"], t["step"]
    assert float(cache.get("dense", p, step)) == 1.5
    assert not cache.held("dense", p, step) and cache.get_partial("dense", p, step) is None
    assert cache.held("slot", p, step)
    assert cache.get("slot", p, step) is None and cache.get_partial("slot", p, step) is None
    assert float(cache.get_partial("seg", t["flat"], t["fstep"])) == 2.5
    assert cache.get("seg", t["flat"], t["fstep"]) is None and not cache.held("seg", t["flat"], t["fstep"])
    assert float(cache.get("b", t["q"], t["qstep"])) == 4.0 and cache.get_partial("b", t["q"], t["qstep"]) is None
    vec = cache.get_vector(["a", "b"], [p, t["q"]], [step, t["qstep"]])
    assert vec is not None and vec.tolist() == [3.0, 4.0]
    assert cache.get_vector(["dense"], [p], [step]) is None  # a single dot is not a vector entry


def test_entries_lapse_when_the_parameter_or_its_step_moves_or_on_invalidate():
    cache, t = _cache()
    p, step = t["p"], t["step"]
    t["flat"].add_(1)  # an outside write to the partition
    assert cache.get_partial("seg", t["flat"], t["fstep"]) is None
    step.add_(1)  # a path that wrote no dot advanced the step
    assert cache.get("dense", p, step) is None and not cache.held("slot", p, step)
    assert cache.get("a", p, step) is None and cache.get_vector(["a", "b"], [p, t["q"]], [step, t["qstep"]]) is None
    assert float(cache.get("b", t["q"], t["qstep"])) == 4.0  # untouched tensor: still valid
    assert cache.get("b", t["q"], torch.zeros(())) is None  # another step tensor (a replaced state)
    cache.invalidate()  # a load or resync()
    assert cache.get("b", t["q"], t["qstep"]) is None


def test_a_stamp_carries_the_rule_to_values_kept_outside_the_cache():
    """ZeRO partitions keep their global dots with a `Stamp`: the same rule, checked by the cache."""
    cache, flat, step = DotCache(), torch.zeros(4), torch.zeros(())
    stamp = cache.stamp(flat, step)
    assert cache.holds(stamp, flat, step) and not cache.holds(None, flat, step)
    assert not cache.holds(stamp, flat, torch.zeros(()))  # another step tensor
    flat.add_(1)
    assert not cache.holds(stamp, flat, step)
    stamp = cache.stamp(flat, step)
    step.add_(1)
    assert not cache.holds(stamp, flat, step)
    stamp = cache.stamp(flat, step)
    cache.invalidate()
    assert not cache.holds(stamp, flat, step)
