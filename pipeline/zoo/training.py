"""Pre-training of the zoo's base model and full fine-tuning of its experts, on CPU.

A plain AdamW loop rather than `transformers.Trainer`: the models have a few hundred thousand parameters,
the whole run takes seconds, and a loop a reader can see end to end is easier to make bit-reproducible
(one thread, deterministic algorithms, every random draw from a seeded generator).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from pydantic import BaseModel, ConfigDict
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

log = logging.getLogger(__name__)


class ModelShape(BaseModel):
    """The Llama dimensions of the zoo models (all share them, so the engine can merge them)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int = 128


class TrainSettings(BaseModel):
    """One training run: optimiser steps, batch size, peak learning rate (linear warm-up, cosine decay)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int = 20
    weight_decay: float = 0.0


class Line(BaseModel):
    """A training line: the text, and how many leading characters are prompt (not scored when masked)."""

    model_config = ConfigDict(frozen=True)

    text: str
    prompt_chars: int


@contextmanager
def deterministic_torch(seed: int) -> Iterator[None]:
    """Single-threaded, deterministic torch for the duration of a build; restores the previous settings.

    One thread because CPU reductions split across threads may sum in a different order from run to run
    (and the box is shared); deterministic algorithms so the same seed gives the same weights hash.
    """
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was_deterministic)


def new_model(shape: ModelShape, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """A freshly initialised Llama with untied embeddings, so every weight is in the saved file."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _batch(lines: list[Line], tokenizer: PreTrainedTokenizerFast, mask_prompt: bool) -> dict[str, torch.Tensor]:
    """Right-padded ids with labels; padding (and the prompt, when masked) is ignored by the loss (-100)."""
    encoded = [tokenizer(line.text, add_special_tokens=False)["input_ids"] for line in lines]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(lines), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(lines), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(lines), width), dtype=torch.long)
    for row, (line, ids) in enumerate(zip(lines, encoded)):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        # one token per character, so the prompt's length in tokens is its length in characters
        first_scored = line.prompt_chars if mask_prompt else 0
        labels[row, first_scored : len(ids)] = torch.tensor(ids[first_scored:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _learning_rate(step: int, settings: TrainSettings) -> float:
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.learning_rate * 0.5 * (1.0 + torch.cos(torch.tensor(progress * torch.pi)).item())


def train(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    lines: list[Line],
    settings: TrainSettings,
    seed: int,
    mask_prompt: bool,
    label: str,
) -> float:
    """Train `model` in place on batches drawn from `lines`; returns the mean loss of the last 20 steps."""
    rng = random.Random(f"batches-{label}-{seed}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay, betas=(0.9, 0.98))
    model.train()
    recent: list[float] = []
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, settings)
        batch = _batch([rng.choice(lines) for _ in range(settings.batch_size)], tokenizer, mask_prompt)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent = (recent + [loss.item()])[-20:]
        if (step + 1) % max(1, settings.steps // 4) == 0:
            log.info("%s: step %d/%d, loss %.4f", label, step + 1, settings.steps, sum(recent) / len(recent))
    model.eval()
    final = sum(recent) / len(recent)
    log.info("trained %s: %d steps, final loss %.4f", label, settings.steps, final)
    return final
