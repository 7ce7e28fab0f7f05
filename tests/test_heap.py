"""scaleinfer/heap.py: the start-up heap frozen for a block, and back to the collector after it."""

import gc

import pytest

from scaleinfer.heap import frozen_heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_objects_alive_at_the_start_are_frozen_for_the_block_and_collected_after():
    gc.collect()
    before = _Node()
    with frozen_heap():
        assert gc.get_freeze_count() > 0
        assert not any(obj is before for obj in gc.get_objects())  # no generation walks it
        del before
        gc.collect()  # the frozen cycle survives: collections skip the permanent generation
        assert len(_frozen_nodes()) == 1
        later = _Node()
        assert any(obj is later for obj in gc.get_objects())  # made in the block: collected as before
        del later
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert not any(type(obj) is _Node for obj in gc.get_objects())


def _frozen_nodes() -> list:
    """The _Node objects the permanent generation holds (unfrozen for the look, frozen again)."""
    gc.unfreeze()
    found = [obj for obj in gc.get_objects() if type(obj) is _Node]
    gc.freeze()
    return found


def test_the_heap_is_unfrozen_when_the_block_raises():
    with pytest.raises(RuntimeError), frozen_heap():
        raise RuntimeError("a step failed")
    assert gc.get_freeze_count() == 0


def test_nested_blocks_share_one_freeze_and_the_last_unfreezes():
    with frozen_heap():
        with frozen_heap(collect=False):
            assert gc.get_freeze_count() > 0
        assert gc.get_freeze_count() > 0  # the outer block still runs
    assert gc.get_freeze_count() == 0


def test_generate_runs_with_the_heap_frozen_and_returns_it_unfrozen(tiny_models):
    """LLM.generate in a user's process: frozen for the call only, also when a step raises."""
    from scaleinfer import LLM, SamplingParams

    llm = LLM(str(tiny_models["llama3.1"][0]), device="cpu", progress=False)
    step, frozen = llm.engine.step, []

    def recording_step():
        frozen.append(gc.get_freeze_count() > 0)
        return step()
    llm.engine.step = recording_step
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3), use_tqdm=False)
    assert frozen and all(frozen)
    assert gc.get_freeze_count() == 0

    def failing_step():
        raise RuntimeError("the step broke")
    llm.engine.step = failing_step
    with pytest.raises(RuntimeError, match="the step broke"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3), use_tqdm=False)
    assert gc.get_freeze_count() == 0
