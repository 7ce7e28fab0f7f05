from helpers import make_seq

from scaleinfer.engine.sequence import SequenceStatus


def test_status_finish_reasons():
    assert not SequenceStatus.WAITING.is_finished and SequenceStatus.WAITING.finish_reason is None
    assert not SequenceStatus.RUNNING.is_finished
    assert SequenceStatus.FINISHED_STOPPED.finish_reason == "stop"
    assert SequenceStatus.FINISHED_LENGTH.finish_reason == "length"
    assert SequenceStatus.FINISHED_ABORTED.finish_reason == "abort"
    assert all(s.is_finished for s in SequenceStatus if s.name.startswith("FINISHED"))


def test_append_token_keeps_all_token_ids_in_step():
    seq = make_seq("a", [1, 2, 3])
    assert (seq.num_tokens, seq.num_prompt_tokens, seq.num_output_tokens) == (3, 3, 0)
    seq.append_token(9)
    seq.append_token(8)
    assert seq.all_token_ids == [1, 2, 3, 9, 8]
    assert seq.output_token_ids == [9, 8] and seq.prompt_token_ids == [1, 2, 3]
    assert seq.last_token_id == 8 and seq.num_output_tokens == 2
    seq.num_computed_tokens = 4
    assert seq.num_uncomputed_tokens == 1


def test_prompt_is_copied_and_fresh_state():
    prompt = [1, 2]
    seq = make_seq("a", prompt)
    seq.append_token(5)
    assert prompt == [1, 2]
    assert seq.status is SequenceStatus.WAITING and not seq.is_finished and seq.finish_reason is None
    assert seq.block_ids == [] and seq.num_computed_tokens == 0 and seq.stop_reason is None
