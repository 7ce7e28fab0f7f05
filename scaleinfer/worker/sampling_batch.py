"""Per-request sampling state on the device (seeded generators) and the per-step SamplingBatch."""

from __future__ import annotations

import torch

from scaleinfer.layers.sampler import SamplingBatch
from scaleinfer.outputs import ScheduledSequence


class SamplingState:
    """Keeps each seeded request's generator across steps, so its draws ignore the rest of the batch."""

    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.generators: dict[str, torch.Generator] = {}
        self.default_generator = torch.Generator(device=device)
        self.default_generator.manual_seed(seed)

    def drop(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.generators.pop(request_id, None)

    def batch(self, seqs: list[ScheduledSequence]) -> SamplingBatch:
        params = [s.sampling_params for s in seqs]
        top_ks = [p.top_k for p in params]
        top_ps = [p.top_p for p in params]
        logprobs = [p.logprobs for p in params if p.logprobs is not None]
        return SamplingBatch(
            temperatures=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=self.device),
            top_ps=self._floats(top_ps) if any(p < 1.0 for p in top_ps) else None,
            top_ks=self._top_ks(top_ks) if any(top_ks) else None,
            generators=[self._generator(s) for s in seqs],
            banned_token_ids=[_banned(s) for s in seqs],
            num_logprobs=max(logprobs, default=-1),
            all_greedy=all(p.temperature == 0 for p in params),
        )

    def _generator(self, seq: ScheduledSequence) -> torch.Generator | None:
        seed = seq.sampling_params.seed
        if seed is None or seq.sampling_params.temperature == 0:
            return None
        if seq.request_id not in self.generators:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
            self.generators[seq.request_id] = gen
        return self.generators[seq.request_id]

    def _floats(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def _top_ks(self, values: list[int]) -> torch.Tensor:
        big = 1 << 30  # top_k == 0 means every token
        return torch.tensor([k or big for k in values], dtype=torch.int64, device=self.device)


def _banned(seq: ScheduledSequence) -> list[int]:
    # Before min_tokens, neither eos nor a stop token may end the sequence.
    if seq.num_output_tokens >= seq.sampling_params.min_tokens:
        return []
    eos = [] if seq.sampling_params.ignore_eos else list(seq.eos_token_ids)
    return eos + seq.sampling_params.stop_token_ids
