"""The worker-side drafter: none. Drafts come from the scheduler (scheduler.py).

vLLM's `custom_class` hook turns on draft verification; this class proposes nothing,
because the worker process has neither the request ids nor the grammar state.
"""

from __future__ import annotations

from typing import Any


def sample_plainly_without_drafts() -> None:
    """Make a step in which no request has a draft sample like a plain engine's step.

    vLLM 0.32 sends every step of a speculative engine through its rejection sampler,
    which draws batch x vocab exponentials even when no request has a draft. Measured
    here (py-spy, free text at batch 8, no drafts): 7.5 % of the worker's time, and the
    speculative engine ran at 0.90x a plain one. With no drafts the logits are one row
    per request, exactly what the plain sampler takes.
    """
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._sample
    if getattr(original, "primerl_plain_without_drafts", False):
        return

    def _sample(self: Any, logits: Any, spec_decode_metadata: Any) -> Any:
        if spec_decode_metadata is not None and spec_decode_metadata.max_spec_len == 0:
            spec_decode_metadata = None
        return original(self, logits, spec_decode_metadata)

    _sample.primerl_plain_without_drafts = True  # type: ignore[attr-defined]
    GPUModelRunner._sample = _sample  # type: ignore[method-assign]


def expand_sampling_params_on_cpu() -> None:
    """Give every draft position its request's temperature (and top-k/top-p) on the CPU.

    vLLM 0.32's CPU replacement for the Triton `expand_kernel` converts its output to
    int64 first (`_ensure_int64`) and writes into that copy, so the per-position
    temperatures stay uninitialised memory: with temperature sampling the target
    probabilities of draft positions came out NaN, and drafts the grammar made certain
    were rejected (measured: a forced `}` with masked probability 1.0 rejected; forced
    drafts accepted 41 % of the time at temperature 1, 83 % greedy). Greedy requests
    never read these values, which is why only RL-style sampling suffered.
    """
    from vllm.platforms import current_platform
    from vllm.v1.sample import rejection_sampler

    if not current_platform.is_cpu() or getattr(rejection_sampler.expand_batch_to_tokens, "primerl_fixed", False):
        return
    import torch

    def expand_batch_to_tokens(x: Any, cu_num_tokens: Any, num_tokens: int, replace_from: int = 0,
                               replace_to: int = 0) -> Any:
        counts = torch.diff(cu_num_tokens.to(torch.int64), prepend=cu_num_tokens.new_zeros(1, dtype=torch.int64))
        x = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
        return x.repeat_interleave(counts, output_size=num_tokens)

    expand_batch_to_tokens.primerl_fixed = True  # type: ignore[attr-defined]
    rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens


def recovered_tokens_by_inverse_cdf() -> None:
    """Sample recovered tokens by inverse CDF instead of exponential races, on the CPU.

    A rejected draft is replaced by a token drawn from the residual distribution: the
    target probabilities without the draft token, or max(target - draft, 0) when the
    drafter has probabilities. vLLM 0.32 draws it as argmax(residual / E) over a
    batch x vocab tensor of exponentials E, filled at every step with drafts. On one CPU
    core `exponential_` costs ~0.94 ms per 49k-token row (7.5 ms at batch 8, 30 ms at
    32), while a cumulative sum and a binary search per draft position cost ~0.05 ms.
    Same distribution: the first CDF entry above u ~ U[0, total) is token i with
    probability residual_i / total, and a token of zero residual (masked by the grammar,
    or the draft itself) can never be it, since its CDF entry equals the one before.
    A seeded request's positions draw from its own generator, as in vLLM.
    """
    from vllm.platforms import current_platform
    from vllm.v1.sample import rejection_sampler

    if not current_platform.is_cpu() or getattr(rejection_sampler.sample_recovered_tokens, "primerl_fixed", False):
        return
    import itertools

    import torch

    def sample_recovered_tokens(max_spec_len: int, num_draft_tokens: list[int], cu_num_draft_tokens: Any,
                                draft_token_ids: Any, draft_probs: Any, target_probs: Any, sampling_metadata: Any,
                                device: Any, use_fp64_gumbel: bool = False) -> Any:
        dtype = torch.float64 if use_fp64_gumbel else torch.float32
        if draft_probs is None:
            residual = target_probs.to(dtype, copy=True)
            ids = draft_token_ids.long()
            valid = ids >= 0  # vLLM pads drafts its grammar check dropped with -1 (async path)
            residual[torch.arange(len(ids), device=device)[valid], ids[valid]] = 0.0
        else:
            residual = (target_probs.to(dtype) - draft_probs.to(dtype)).clamp_min_(0.0)
        cdf = residual.cumsum_(dim=-1)
        total = cdf[:, -1:]
        uniform = torch.rand(total.shape, dtype=dtype, device=device)
        if sampling_metadata.generators:
            starts = list(itertools.accumulate(num_draft_tokens, initial=0))
            for i, generator in sampling_metadata.generators.items():
                n = num_draft_tokens[i]
                if n:
                    uniform[starts[i]:starts[i] + n] = torch.rand((n, 1), dtype=dtype, device=device,
                                                                  generator=generator)
        # u strictly below the total, so some CDF entry lies above it (rounding of u * total could reach it).
        u = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
        recovered = torch.searchsorted(cdf, u, right=True).squeeze(1)
        # No residual mass (the target put all of it on the draft): never rejected, keep the draft.
        recovered = torch.where(total.squeeze(1) > 0, recovered, draft_token_ids.long())
        return recovered.to(draft_token_ids.dtype)

    sample_recovered_tokens.primerl_fixed = True  # type: ignore[attr-defined]
    rejection_sampler.sample_recovered_tokens = sample_recovered_tokens


class NullProposer:
    """Proposes no draft tokens; the scheduler fills them in."""

    def __init__(self, vllm_config: Any) -> None:
        self.vllm_config = vllm_config
        # Built inside the worker process, once per model runner: the place to adjust it.
        sample_plainly_without_drafts()
        expand_sampling_params_on_cpu()
        recovered_tokens_by_inverse_cdf()

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to load."""

    def propose(self, sampled_token_ids: list[list[int]], *args: Any, **kwargs: Any) -> list[list[int]]:
        """An empty draft per batch row."""
        return [[] for _ in sampled_token_ids]
