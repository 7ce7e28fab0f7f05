"""The runner's eager steps: the first of each kind (decodes only, prompt chunks only, both) runs the kernel
launchers' argument checks, later ones of that kind skip them (kernels/checks.py trusted_inputs), and the tokens
do not change."""

import torch

from scaleinfer import LLM, SamplingParams
from scaleinfer.kernels.checks import checking


def test_each_step_kind_is_checked_once_and_tokens_are_unchanged(tiny_models, monkeypatch):
    folder = str(tiny_models["llama3.1"][0])
    llm = LLM(folder, device="cpu", progress=False, dtype="float32", max_model_len=64, max_num_batched_tokens=64,
              max_mixed_prefill_tokens=16, enable_prefix_caching=False)  # the second run computes every prompt
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 200, (n,), generator=gen).tolist() for n in (40, 9, 30)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]

    forward = llm.engine.runner.steps
    forward.checked_kinds.clear()
    model, kinds = forward.model, []

    def recording(input_ids, positions, attn, hidden):
        kinds.append((attn.num_decodes > 0, attn.prefill is not None, checking()))
        return model(input_ids, positions, attn, hidden)

    monkeypatch.setattr(forward, "model", recording)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == expected
    assert {kind[:2] for kind in kinds} == {(False, True), (True, True), (True, False)}  # every kind ran
    for kind in {kind[:2] for kind in kinds}:
        checks = [kind_checked[2] for kind_checked in kinds if kind_checked[:2] == kind]
        assert checks[0] and not any(checks[1:]), (kind, checks)
    assert checking()
