"""scaleinfer/heap.py: the start-up heap frozen for a block, and back to the collector after it."""

import gc

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
    try:
        with frozen_heap():
            raise RuntimeError("a step failed")
    except RuntimeError:
        pass
    assert gc.get_freeze_count() == 0
