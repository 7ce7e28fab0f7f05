"""SamplingParams refuses what would overflow the sampler or make logits NaN, naming the field and the value,
and states its bounds: a tiny temperature is greedy, a top_k past the vocabulary keeps every token."""

import dataclasses
import math

import pytest

from scaleinfer import SamplingParams
from scaleinfer.errors import InvalidRequestError
from scaleinfer.sampling_params import MAX_SEED, MIN_SEED, child_seed

NAN, INF = math.nan, math.inf

# name: (the field values, a fragment the message must hold besides the field's name)
BAD = {
    "seed past uint64": (dict(seed=2**64), "18446744073709551616"),
    "seed 10**30": (dict(seed=10**30), str(10**30)),
    "seed below int64": (dict(seed=-2**63 - 1), str(-2**63 - 1)),
    "seed not an integer": (dict(seed=1.5), "1.5"),
    "temperature inf": (dict(temperature=INF), "inf"),
    "temperature nan": (dict(temperature=NAN), "nan"),
    "temperature past its bound": (dict(temperature=1e6), "1000000.0"),
    "temperature an int past float": (dict(temperature=10**400), "1000"),
    "top_p nan": (dict(top_p=NAN), "nan"),
    "top_p inf": (dict(top_p=INF), "inf"),
    "presence_penalty nan": (dict(presence_penalty=NAN), "nan"),
    "frequency_penalty -inf": (dict(frequency_penalty=-INF), "-inf"),
    "repetition_penalty 1e-300": (dict(repetition_penalty=1e-300), "1e-300"),
    "repetition_penalty inf": (dict(repetition_penalty=INF), "inf"),
    "repetition_penalty nan": (dict(repetition_penalty=NAN), "nan"),
    "repetition_penalty past its bound": (dict(repetition_penalty=1000.0), "1000.0"),
    "logit_bias nan": (dict(logit_bias={3: NAN}), "nan"),
    "logit_bias inf": (dict(logit_bias={3: INF}), "inf"),
    "too many stop strings": (dict(stop=[f"s{i}" for i in range(1000)]), "1000"),
    "a stop string too long": (dict(stop=["ok", "x" * 1000]), "1000"),
    "too many stop token ids": (dict(stop_token_ids=list(range(1000))), "1000"),
    "top_k a bool": (dict(top_k=True), "True"),
    "min_p negative": (dict(min_p=-0.1), "-0.1"),
    "min_p past 1": (dict(min_p=1.5), "1.5"),
    "min_p nan": (dict(min_p=NAN), "nan"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_values_are_refused_naming_field_and_value(case):
    values, fragment = BAD[case]
    field = next(iter(values))
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**values)
    message = str(info.value)
    assert message.startswith(f"{field} must"), message  # the server maps the message to its field
    assert fragment in message, message


def test_a_huge_bad_value_is_shown_truncated():
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(logit_bias={i: NAN for i in range(100_000)})
    assert len(str(info.value)) < 400


def test_the_bounds_themselves_are_accepted():
    for seed in (MIN_SEED, -1, 0, MAX_SEED):
        assert SamplingParams(seed=seed).seed == seed
    assert SamplingParams(temperature=100.0, repetition_penalty=0.01).temperature == 100.0
    assert SamplingParams(repetition_penalty=100.0, logit_bias={1: -100.0}).repetition_penalty == 100.0
    assert len(SamplingParams(stop=["x" * 512] * 16).stop) == 16
    assert SamplingParams(top_k=2**63).top_k == 2**63  # the sampler keeps every token past the vocabulary


def test_a_temperature_below_the_epsilon_is_greedy():
    assert SamplingParams(temperature=1e-45).is_greedy
    assert SamplingParams(temperature=9e-6).temperature == 0.0
    assert not SamplingParams(temperature=1e-5).is_greedy


def test_child_seeds_wrap_into_the_accepted_range():
    assert [child_seed(7, i) for i in range(3)] == [7, 8, 9]
    assert child_seed(MAX_SEED, 0) == MAX_SEED and child_seed(MAX_SEED, 1) == 0 and child_seed(MAX_SEED, 2) == 1
    assert child_seed(-5, 2) == -3
    params = SamplingParams(n=3, seed=MAX_SEED - 1)
    assert [dataclasses.replace(params, seed=child_seed(params.seed, i)).seed for i in range(3)] == [
        MAX_SEED - 1, MAX_SEED, 0]
