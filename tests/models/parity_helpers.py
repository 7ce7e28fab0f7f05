"""Helpers shared by the parity tests."""

import torch

from scaleinfer.outputs import ScheduledSequence, SchedulerOutput
from scaleinfer.sampling_params import SamplingParams
from scaleinfer.worker.model_runner import ModelRunner
from scaleinfer.worker.step_inputs import build_step_inputs


def prefill_logits(runner: ModelRunner, token_ids: list[int]) -> torch.Tensor:
    """Logits at every position of one prompt, computed in two chunks through the paged cache."""
    split = len(token_ids) // 2
    block_table = list(range(runner.num_blocks))[: -(-len(token_ids) // runner.block_size)]
    logits = []
    for start, end in ((0, split), (split, len(token_ids))):
        seq = ScheduledSequence("p", token_ids[start:end], start, block_table, True, SamplingParams())
        inputs = build_step_inputs(SchedulerOutput([seq]), runner.block_size, runner.device)
        with torch.inference_mode():
            hidden = runner.model(inputs.input_ids, inputs.positions, inputs.attn)
            logits.append(runner.model.compute_logits(hidden))
    return torch.cat(logits)


def hf_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id)
    return out[0, ids.shape[1]:].tolist()
