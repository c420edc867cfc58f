"""The trainable policy: the engines' model in torch, token log-probs, an optional value head, saving.

Full fine-tuning rather than LoRA: the engines reload whole safetensors folders
anyway (no adapter path to keep in sync), and at 135M parameters a full AdamW step
fits easily in memory on the CPU.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
from torch import nn

_COPY = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


class Batch:
    """Prompt+completion token ids padded into tensors; `mask` marks completion tokens trained on.

    Position t of `mask`/`old_logp` refers to predicting token t+1 of `input_ids`.
    `loss_masks` (one per sequence, 1/0 per completion token; empty = all 1) zero the
    tool-response tokens of a session: every loss, KL and PPO term is weighted by `mask`,
    so they never contribute.
    """

    def __init__(
        self,
        prompts: list[list[int]],
        completions: list[list[int]],
        old_logps: list[list[float]],
        pad_id: int,
        loss_masks: list[list[int]] | None = None,
    ) -> None:
        seqs = [p + c for p, c in zip(prompts, completions, strict=True)]
        width = max(len(s) for s in seqs)
        n = len(seqs)
        self.input_ids = torch.full((n, width), pad_id, dtype=torch.long)
        self.attention = torch.zeros((n, width), dtype=torch.long)
        self.mask = torch.zeros((n, width - 1))
        self.old_logp = torch.zeros((n, width - 1))
        for i, (p, c, lp) in enumerate(zip(prompts, completions, old_logps, strict=True)):
            self.input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            self.attention[i, : len(p) + len(c)] = 1
            self.mask[i, len(p) - 1 : len(p) + len(c) - 1] = 1
            lm = loss_masks[i] if loss_masks else []
            if lm:
                if len(lm) != len(c):
                    raise ValueError(f"loss mask of {len(lm)} for {len(c)} completion tokens")
                self.mask[i, len(p) - 1 : len(p) + len(c) - 1] *= torch.tensor(lm, dtype=self.mask.dtype)
            if lp:
                self.old_logp[i, len(p) - 1 : len(p) + len(c) - 1] = torch.tensor(lp[: len(c)])


class PolicyModel(nn.Module):
    """A causal LM (HF folder) plus, for PPO, a scalar value head on the last hidden state."""

    def __init__(self, model_dir: str, *, value_head: bool = False) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.source_dir = Path(model_dir)
        self.lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.value_head = nn.Linear(self.lm.config.hidden_size, 1) if value_head else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        self.pad_id = int(self.lm.config.pad_token_id or self.lm.config.eos_token_id or 0)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-prob of every next token [n, T-1] and values [n, T-1] (None without a head)."""
        out = self.lm(
            input_ids=batch.input_ids, attention_mask=batch.attention, output_hidden_states=self.value_head is not None
        )
        logits = out.logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        values = None
        if self.value_head is not None:
            values = self.value_head(out.hidden_states[-1][:, :-1]).squeeze(-1)
        return logp, values

    def save_policy(self, dest: Path) -> str:
        """Write the LM as a safetensors folder the engines can load; returns its checksum.

        Written to a temporary folder and renamed, so an engine never sees half a folder.
        """
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.lm.save_pretrained(tmp, safe_serialization=True)
        for name in _COPY:
            src = self.source_dir / name
            if src.exists() and not (tmp / name).exists():
                shutil.copy(src, tmp / name)
        checksum = hashlib.sha256()
        for f in sorted(tmp.glob("*.safetensors")):
            f.chmod(0o644)  # safetensors writes 0600; engines may run as another user
            checksum.update(f.read_bytes())
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        return checksum.hexdigest()
