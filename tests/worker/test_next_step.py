"""NextDecode: when the runner may prepare the next decode step on the device, and when the scheduler's next
output is exactly that step (anything else must rebuild the inputs)."""

from scaleinfer.outputs import ScheduledSequence
from scaleinfer.sampling_params import SamplingParams
from scaleinfer.worker.next_step import NextDecode

PARAMS = SamplingParams()
BLOCK_SIZE = 4


def _decode(request_id: str, token: int, pos: int, table: list[int], sample: bool = True) -> ScheduledSequence:
    return ScheduledSequence(request_id, [token], pos, table, sample, PARAMS)


def _prepared(step: list[ScheduledSequence], sampled: list[int]) -> NextDecode:
    prepared = NextDecode.after(step, BLOCK_SIZE)
    assert prepared is not None
    prepared.token_ids = sampled
    return prepared


def test_the_same_sequences_one_token_further_match():
    tables = [[3, 8], [5]]
    prepared = _prepared([_decode("a", 1, 5, tables[0]), _decode("b", 2, 1, tables[1])], [7, 9])
    assert prepared.start_pos == [6, 2]
    assert prepared.matches([_decode("a", 7, 6, tables[0]), _decode("b", 9, 2, tables[1])])


def test_a_next_slot_in_a_block_not_yet_allocated_prepares_nothing():
    assert NextDecode.after([_decode("a", 1, 7, [3, 8])], BLOCK_SIZE) is None  # position 8 needs a third block
    assert NextDecode.after([_decode("a", 1, 6, [3, 8])], BLOCK_SIZE) is not None
    assert NextDecode.after([_decode("a", 1, 6, [3, 8], sample=False)], BLOCK_SIZE) is None


def test_any_difference_from_the_prepared_step_is_no_match():
    table_a, table_b = [3, 8], [5]
    prepared = _prepared([_decode("a", 1, 5, table_a), _decode("b", 2, 1, table_b)], [7, 9])
    assert not prepared.matches([_decode("a", 7, 6, table_a)])  # b finished
    assert not prepared.matches([_decode("b", 9, 2, table_b), _decode("a", 7, 6, table_a)])  # order
    assert not prepared.matches([_decode("a", 7, 6, table_a), _decode("c", 9, 2, table_b)])  # another request
    assert not prepared.matches([_decode("a", 7, 6, table_a), _decode("b", 9, 3, table_b)])  # position
    assert not prepared.matches([_decode("a", 7, 6, list(table_a)), _decode("b", 9, 2, table_b)])  # table rebound
    assert not prepared.matches([_decode("a", 8, 6, table_a), _decode("b", 9, 2, table_b)])  # another token
    chunk = ScheduledSequence("b", [9, 4], 2, table_b, True, PARAMS)
    assert not prepared.matches([_decode("a", 7, 6, table_a), chunk])  # b computes two tokens


def test_nothing_matches_before_the_sampled_tokens_are_known():
    table = [3]
    prepared = NextDecode.after([_decode("a", 1, 0, table)], BLOCK_SIZE)
    assert not prepared.matches([_decode("a", 7, 1, table)])
