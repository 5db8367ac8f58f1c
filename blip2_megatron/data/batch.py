"""The batch builder: raw samples -> the tensors a model reads (the data/model contract).

Everything that turns text into tokens and decides which tokens carry a loss lives here;
models receive tensors only. One builder per model kind:

* :class:`Stage1BatchBuilder` (``model.kind="stage1"``): BERT tokens of the captions,
  padded to ``qformer.max_txt_len`` as LAVIS does, and 64-bit codes of the image ids
  (ITC treats equal codes as positives).
* :class:`LLMBatchBuilder` (``"llm"``: BLIP-2 stage 2 / caption fine-tuning, and
  ``"minigpt4"``): the LLM sequence with empty slots where the projected query outputs go,
  and labels.

Sequence layouts (``prefix`` = the tokens the tokenizer's own template puts before a text:
``</s>`` for OPT, ``<s>`` for LLaMA, nothing for Qwen2; see :func:`template_prefix_ids`)::

    BLIP-2:    [queries] prefix prompt target end_sym [pad...]
    MiniGPT-4: prefix "###Human: <Img>" [queries] "</Img> {instruction} ###Assistant: " target end_sym

Labels are -100 (:data:`IGNORE_INDEX`) on query slots, prefix, prompt and padding; only the
target and its end symbol are learned. Training pads on the right (to a multiple of
``pad_to_multiple_of``, which bounds the number of distinct shapes a pipeline stage or a
compiled kernel sees); generation pads on the left. BLIP-2 tokenizes prompt and target
together (LAVIS), so word pieces at the boundary are the ones the LLM was trained with;
MiniGPT-4 tokenizes the target on its own, as MiniGPT-4 does.

Training batches (what the loader yields and the engine feeds the model)::

    stage 1: {"image", "input_ids", "attention_mask", "image_codes"}
    LLM:     {"image", "input_ids", "attention_mask", "image_slots", "labels"}
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from blip2_megatron.config import Blip2Config, ConfigError
from blip2_megatron.data.tokenizers import build_tokenizer, llm_tokenizer_spec

IGNORE_INDEX = -100  # label of a position that takes no loss (Hugging Face's convention)
IMAGE_PLACEHOLDER = "<ImageHere>"  # MiniGPT-4: where the image's query outputs go in the template
PAD_TO_MULTIPLE_OF = 8


def image_id_codes(image_ids: Any) -> torch.Tensor | None:
    """Image ids (ints, strings such as "coco_123", or a tensor) as int64 codes.

    The code is a 64-bit BLAKE2 hash of ``str(id)``: deterministic in every process
    (unlike Python's ``hash``), so ranks agree on which gathered pairs share an image, and
    ``123`` and ``"123"`` name the same image. ``None`` stays ``None`` (no ids: only the
    diagonal is positive).
    """
    if image_ids is None:
        return None
    if isinstance(image_ids, torch.Tensor):
        image_ids = image_ids.reshape(-1).tolist()
    codes = [
        int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little", signed=True)
        for i in image_ids
    ]
    return torch.tensor(codes, dtype=torch.long)


def template_prefix_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer's own template puts before a text (its BOS, if it adds one).

    Found by encoding a probe with and without special tokens, so it follows whatever the
    tokenizer is configured to do (``add_bos_token``, a template post-processor, none).
    """
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    raise ConfigError(
        f"cannot find where the tokenizer's template puts the text: {probe!r} encodes as {plain} alone "
        f"and {full} with special tokens"
    )


@dataclass
class LLMInputs:
    """Token-level inputs of the LLM for one batch (image slots still empty)."""

    input_ids: torch.Tensor  # [B, T]; image slots hold the pad id
    attention_mask: torch.Tensor  # [B, T] 1 = real token (query slots included)
    image_slots: torch.Tensor  # [B, T] bool, exactly num_query_tokens True per row
    labels: torch.Tensor | None  # [B, T] with -100 where no loss is taken; None for generation


class LLMBatchBuilder:
    """Prompts and targets -> the LLM sequence layout with image slots and labels.

    ``tokenizer`` is the LLM's; ``cfg`` the model config (kind, number of queries, prompt,
    template, end symbol, ``max_txt_len``). ``max_txt_len`` bounds the text part of a
    sequence (template prefix + prompt + target), as LAVIS truncates it.
    """

    def __init__(self, tokenizer: Any, cfg: Blip2Config, pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF):
        if cfg.llm is None:
            raise ConfigError("an LLM batch builder needs model.llm (model.kind 'llm' or 'minigpt4')")
        if tokenizer.pad_token_id is None:
            raise ConfigError("the LLM tokenizer has no pad token")
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.pad_to_multiple_of = max(int(pad_to_multiple_of), 1)
        self.prefix = template_prefix_ids(tokenizer)
        self.num_query_tokens = cfg.qformer.num_query_tokens
        self.pad_id = tokenizer.pad_token_id

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _row(self, prompt: str, target: str | None) -> tuple[list[int], list[bool], int]:
        """(ids, is_image_slot, index of the first labelled position) of one sample."""
        cfg = self.cfg
        if cfg.kind == "minigpt4":
            before, after = cfg.prompt_template.split(IMAGE_PLACEHOLDER, 1)
            before_ids = self.prefix + self._ids(before)
            after_ids = self._ids(after.replace("{}", prompt))
            target_ids = self._ids(target + cfg.end_sym) if target is not None else []
            text = (after_ids + target_ids)[: max(cfg.max_txt_len - len(before_ids), 1)]
            ids = before_ids + [self.pad_id] * self.num_query_tokens + text
            slots = [False] * len(before_ids) + [True] * self.num_query_tokens + [False] * len(text)
            return ids, slots, len(before_ids) + self.num_query_tokens + len(after_ids)
        if target is None:
            text_ids = self._ids(prompt)
            prompt_len = len(text_ids)
        else:
            target = target + cfg.end_sym
            joined = f"{prompt} {target}" if prompt and not prompt.endswith(" ") else prompt + target
            text_ids = self._ids(joined)
            prompt_len = len(self._ids(prompt))
        text = (self.prefix + text_ids)[: max(cfg.max_txt_len, len(self.prefix) + 1)]
        ids = [self.pad_id] * self.num_query_tokens + text
        slots = [True] * self.num_query_tokens + [False] * len(text)
        return ids, slots, self.num_query_tokens + len(self.prefix) + prompt_len

    def layout(
        self, prompts: Sequence[str], targets: Sequence[str] | None = None, padding_side: str = "right"
    ) -> LLMInputs:
        """The token layout of a batch; ``targets=None`` for generation (no labels, left padding).

        ``prompts`` are per-sample texts that follow the image (BLIP-2's "a photo of", a VQA
        question, a MiniGPT-4 instruction). The end symbol is appended to each target here.
        """
        if targets is not None and len(targets) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        rows = [self._row(p, None if targets is None else targets[i]) for i, p in enumerate(prompts)]
        length = max(len(ids) for ids, _, _ in rows)
        if padding_side == "right":
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(rows)
        input_ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        image_slots = torch.zeros((batch, length), dtype=torch.bool)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        for b, (ids, slots, loss_from) in enumerate(rows):
            n = len(ids)
            start = 0 if padding_side == "right" else length - n
            input_ids[b, start : start + n] = torch.tensor(ids)
            attention_mask[b, start : start + n] = 1
            image_slots[b, start : start + n] = torch.tensor(slots)
            if loss_from < n:
                labels[b, start + loss_from : start + n] = torch.tensor(ids[loss_from:])
        return LLMInputs(input_ids, attention_mask, image_slots, labels if targets is not None else None)

    def __call__(self, samples: dict[str, Any]) -> dict[str, Any]:
        """A training batch from processed samples.

        ``samples``: {"image": [B, 3, S, S], "text_output" (captions) or "text_input",
        optional "prompt" (per-sample prompts; default ``model.prompt``)}.
        """
        targets = list(samples.get("text_output") or samples["text_input"])
        prompts = samples.get("prompt") or [self.cfg.prompt] * len(targets)
        inputs = self.layout(list(prompts), targets)
        return {
            "image": samples["image"],
            "input_ids": inputs.input_ids,
            "attention_mask": inputs.attention_mask,
            "image_slots": inputs.image_slots,
            "labels": inputs.labels,
        }

    def generation_inputs(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Left-padded ``input_ids`` / ``attention_mask`` / ``image_slots`` for generation."""
        inputs = self.layout(list(prompts), None, padding_side="left")
        return {
            "input_ids": inputs.input_ids,
            "attention_mask": inputs.attention_mask,
            "image_slots": inputs.image_slots,
        }

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """Generated token ids -> texts (special tokens dropped, surrounding space stripped)."""
        return [text.strip() for text in self.tokenizer.batch_decode(tokens, skip_special_tokens=True)]


class Stage1BatchBuilder:
    """Captions -> Q-Former tokens (BERT + [DEC]), and image ids -> codes, for stage 1."""

    def __init__(self, tokenizer: Any, cfg: Blip2Config):
        q = cfg.qformer
        bos = tokenizer.bos_token_id
        if bos != q.bos_token_id:
            raise ConfigError(
                f"the Q-Former tokenizer's bos token ({tokenizer.bos_token!r}, id {bos}) differs from "
                f"qformer.bos_token_id={q.bos_token_id}; it needs [DEC] as bos (BERT + [DEC])"
            )
        if tokenizer.pad_token_id != q.pad_token_id:
            raise ConfigError(
                f"the Q-Former tokenizer's pad id {tokenizer.pad_token_id} differs from "
                f"qformer.pad_token_id={q.pad_token_id}"
            )
        if len(tokenizer) > q.vocab_size:
            raise ConfigError(
                f"the Q-Former tokenizer has {len(tokenizer)} tokens but qformer.vocab_size={q.vocab_size}"
            )
        if q.max_txt_len > q.max_position_embeddings:
            raise ConfigError(
                f"qformer.max_txt_len={q.max_txt_len} exceeds qformer.max_position_embeddings="
                f"{q.max_position_embeddings}"
            )
        self.tokenizer = tokenizer
        self.cfg = cfg

    def text_tokens(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` / ``attention_mask`` padded (or cut) to ``qformer.max_txt_len``, as LAVIS."""
        encoded = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.cfg.qformer.max_txt_len,
            return_tensors="pt",
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def __call__(self, samples: dict[str, Any]) -> dict[str, Any]:
        """A training batch: {"image", "input_ids", "attention_mask", "image_codes" (if ids)}."""
        texts = list(samples.get("text_output") or samples["text_input"])
        if len(texts) != samples["image"].shape[0]:
            raise ValueError(f"batch has {samples['image'].shape[0]} images but {len(texts)} texts")
        batch = {"image": samples["image"], **self.text_tokens(texts)}
        codes = image_id_codes(samples.get("image_id"))
        if codes is not None:
            batch["image_codes"] = codes
        return batch


BatchBuilder = LLMBatchBuilder | Stage1BatchBuilder


def build_batch_builder(cfg: Blip2Config, pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF) -> BatchBuilder:
    """The builder for ``cfg``'s model kind, with its tokenizer read from the configured path."""
    if cfg.kind == "stage1":
        return Stage1BatchBuilder(build_tokenizer(cfg.qformer.tokenizer, "qformer"), cfg)
    tokenizer = build_tokenizer(llm_tokenizer_spec(cfg), "llm", arch=cfg.llm.arch)
    return LLMBatchBuilder(tokenizer, cfg, pad_to_multiple_of)
