"""Prompts for Med3DVLM: ``"<im_patch>" * N`` placeholders followed by the question, no chat template."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from ...errors import CheckpointError

IMAGE_TOKEN = "<im_patch>"


def image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id of ``<im_patch>``; a :class:`CheckpointError` when the tokenizer lacks it."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        raise CheckpointError(
            f"the tokenizer has no {IMAGE_TOKEN} token, so it is not Med3DVLM's: use the tokenizer files "
            "saved with the Med3DVLM checkpoint (its added_tokens.json lists <im_patch>)"
        )
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, image_id: int, num_image_tokens: int, separator: str,
                question: str) -> list[int]:
    return [image_id] * num_image_tokens + tokenizer(separator + question, add_special_tokens=False)["input_ids"]


def _left_pad(
    rows: Sequence[list[int]], pad: int | None, tokenizer: PreTrainedTokenizerBase
) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` of ``rows`` padded on the left (pad: the tokenizer's, else EOS)."""
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    num_image_tokens: int,
    separator: str = " ",
    pad_token_id: int | None = None,
) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids`` / ``attention_mask`` of ``"<im_patch>" * N + separator + question``.

    The reference trained VQA with a space between placeholders and question (``separator=" "``),
    captions without one. The first text token never reaches the model (see
    :func:`~voxtext.models.med3dvlm.model.insert_image_features`); that is how the model was trained.
    """
    image_id = image_token_id(tokenizer)
    rows = [_prompt_ids(tokenizer, image_id, num_image_tokens, separator, q) for q in questions]
    return _left_pad(rows, pad_token_id, tokenizer)


def encode_answers(
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str, str]],
    num_image_tokens: int,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids`` / ``attention_mask`` / ``labels`` of ``(question, separator, answer)`` triples.

    Each row is the prompt of :func:`encode_prompts` followed by ``" " + answer`` and EOS; ``labels``
    hold those answer tokens (and EOS) and -100 elsewhere: the training targets, and what
    :meth:`voxtext.report.Reporter.ask` scores to rank the options of a closed question.
    """
    image_id, rows, answer_lengths = image_token_id(tokenizer), [], []
    for question, separator, answer in pairs:
        target = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        row = (_prompt_ids(tokenizer, image_id, num_image_tokens, separator, question) + target)[:max_length]
        rows.append(row)
        answer_lengths.append(min(len(target), len(row) - num_image_tokens - 1))
    batch = _left_pad(rows, None, tokenizer)
    input_ids, width = batch["input_ids"], batch["input_ids"].shape[1]
    batch["labels"] = torch.full_like(input_ids, -100)
    for i, n in enumerate(answer_lengths):
        batch["labels"][i, width - n:] = input_ids[i, width - n:]
    return batch
