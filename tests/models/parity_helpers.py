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


def bf16_logit_errors(folder, config, ids: torch.Tensor, device: str = "cuda") -> tuple[float, float, float, float]:
    """Our bf16 logits and HF's own bf16 logits, each against HF in float32 on the same random weights (the
    config saved in folder), over one prefill of ids: (our relative error, HF's relative error, our top-1
    agreement with the float32 oracle, HF bf16's). Random weights give no structure to hide behind, so many
    bf16 layers drift a few percent in both."""
    from transformers import AutoModelForCausalLM

    from scaleinfer.config import CacheConfig, ModelConfig
    from scaleinfer.weights.source import resolve_model

    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        oracle = hf(ids[None].to(device)).logits[0]
        hf = hf.to(torch.bfloat16)
        hf_bf16 = hf(ids[None].to(device)).logits[0].float()
    model_config = ModelConfig(str(folder), device=device, dtype="bfloat16", load_format="dummy", enforce_eager=True)
    runner = ModelRunner(model_config, CacheConfig(num_blocks=64), resolve_model(str(folder), "dummy"), progress=False)
    runner.model.load_weights(hf.state_dict().items())
    del hf
    ours = prefill_logits(runner, ids.tolist())
    top1 = oracle.argmax(-1)
    return (((ours - oracle).norm() / oracle.norm()).item(), ((hf_bf16 - oracle).norm() / oracle.norm()).item(),
            (ours.argmax(-1) == top1).float().mean().item(), (hf_bf16.argmax(-1) == top1).float().mean().item())
