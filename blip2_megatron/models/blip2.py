"""BLIP-2 with a decoder-only LLM: stage-2 pretraining, caption fine-tuning, MiniGPT-4.

The image goes through the frozen ViT and the Q-Former; the query outputs are projected
to the LLM width and take the place of ``num_query_tokens`` slots in the LLM's input
sequence. :func:`build_llm_inputs` is the one place that decides the sequence layout and
which tokens carry a loss:

* BLIP-2 (OPT / Vicuna): ``[queries] [bos] prompt target end_sym [pad...]``
* MiniGPT-4: ``[bos] "###Human: <Img>" [queries] "</Img> {instruction} ###Assistant: " target "###"``

Labels are -100 on query slots, prefix, prompt and padding; only the target (and its end
symbol) is learned. Training pads on the right; generation pads on the left.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from blip2_megatron.config import Blip2Config
from blip2_megatron.models import generation
from blip2_megatron.models.llm import ParallelCausalLM
from blip2_megatron.models.query_encoder import QueryEncoder
from blip2_megatron.models.vision import freeze_vision, frozen_vision_dtype

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<ImageHere>"


@dataclass
class LLMInputs:
    """Token-level inputs of the LLM for one batch (image slots still empty)."""

    input_ids: torch.Tensor  # [B, T]; image slots hold the pad id
    attention_mask: torch.Tensor  # [B, T] 1 = real token (query slots included)
    image_slots: torch.Tensor  # [B, T] bool, exactly num_query_tokens True per row
    labels: torch.Tensor | None  # [B, T] with -100 where no loss is taken

    def to(self, device: torch.device) -> LLMInputs:
        return LLMInputs(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.image_slots.to(device),
            None if self.labels is None else self.labels.to(device),
        )


def _split_template(cfg: Blip2Config, instruction: str) -> tuple[str, str]:
    """(text before the image, text after it) for one sample."""
    if cfg.kind == "minigpt4":
        before, after = cfg.prompt_template.split(IMAGE_PLACEHOLDER, 1)
        return before, after.replace("{}", instruction)
    return "", instruction


def build_llm_inputs(
    tokenizer: Any,
    cfg: Blip2Config,
    prompts: list[str],
    targets: list[str] | None = None,
    padding_side: str = "right",
) -> LLMInputs:
    """Tokenize prompts (+ targets) into the LLM sequence layout with image slots and labels.

    ``prompts`` are per-sample texts that follow the image (BLIP-2's "a photo of", a VQA
    question, a MiniGPT-4 instruction); ``targets`` are the texts to learn, ``None`` for
    generation. The end symbol is appended to each target here.
    """
    num_query = cfg.qformer.num_query_tokens
    pad_id = tokenizer.pad_token_id
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows: list[tuple[list[int], list[bool], list[bool]]] = []  # ids, is_slot, has_loss
    for i, prompt in enumerate(prompts):
        before, after = _split_template(cfg, prompt)
        target = None if targets is None else targets[i] + cfg.end_sym
        # The prompt and target are tokenized together (as LAVIS does) so that word pieces
        # at the boundary match the tokenization the LLM was trained with; the prompt's
        # own token count says where the loss starts.
        if target is None:
            text_ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
            prompt_len = len(text_ids)
        else:
            joined = f"{after} {target}" if after and not after.endswith(" ") else after + target
            text_ids = tokenizer(joined, add_special_tokens=False)["input_ids"]
            prompt_len = len(tokenizer(after, add_special_tokens=False)["input_ids"]) if after else 0
        text_ids = text_ids[: max(cfg.max_txt_len - len(bos), 1)]
        if before:
            prefix = bos + tokenizer(before, add_special_tokens=False)["input_ids"]
            ids = prefix + [pad_id] * num_query + text_ids
            slot = [False] * len(prefix) + [True] * num_query + [False] * len(text_ids)
            loss_from = len(prefix) + num_query + prompt_len
        else:
            ids = [pad_id] * num_query + bos + text_ids
            slot = [True] * num_query + [False] * (len(bos) + len(text_ids))
            loss_from = num_query + len(bos) + prompt_len
        has_loss = [target is not None and j >= loss_from for j in range(len(ids))]
        rows.append((ids, slot, has_loss))

    length = max(len(ids) for ids, _, _ in rows)
    batch = len(rows)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    image_slots = torch.zeros((batch, length), dtype=torch.bool)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, slot, has_loss) in enumerate(rows):
        n = len(ids)
        span = slice(0, n) if padding_side == "right" else slice(length - n, length)
        input_ids[b, span] = torch.tensor(ids)
        attention_mask[b, span] = 1
        image_slots[b, span] = torch.tensor(slot)
        row_labels = torch.tensor([t if keep else IGNORE_INDEX for t, keep in zip(ids, has_loss)])
        labels[b, span] = row_labels
    return LLMInputs(input_ids, attention_mask, image_slots, labels if targets is not None else None)


def prepare_llm_batch(
    tokenizer: Any, cfg: Blip2Config, samples: dict[str, Any], device: torch.device | None = None
) -> dict[str, Any]:
    """A loader batch ({"image", "text_input", optional "prompt"}) as model-ready tensors."""
    texts = list(samples["text_input"])
    prompts = samples.get("prompt") or [cfg.prompt] * len(texts)
    inputs = build_llm_inputs(tokenizer, cfg, list(prompts), texts)
    if device is not None:
        inputs = inputs.to(device)
    image = samples["image"]
    return {
        "image": image.to(device) if device is not None else image,
        "input_ids": inputs.input_ids,
        "attention_mask": inputs.attention_mask,
        "image_slots": inputs.image_slots,
        "labels": inputs.labels,
    }


class Blip2ForLLM(nn.Module):
    """Vision encoder + Q-Former + projection + tensor-parallel LLM.

    A pipeline stage is the same class with parts absent: ``pre_process`` keeps the image
    path and the token embedding, ``post_process`` the final norm and head, ``layer_range``
    picks the decoder layers (see ``blip2_megatron.parallel.pipeline``).
    """

    def __init__(
        self,
        cfg: Blip2Config,
        tokenizer: Any,
        pre_process: bool = True,
        post_process: bool = True,
        layer_range: tuple[int, int] | None = None,
    ):
        super().__init__()
        if cfg.llm is None:
            raise ValueError("Blip2ForLLM needs model.llm; use Blip2Stage1 for model.kind='stage1'")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.pre_process = pre_process
        self.post_process = post_process
        if pre_process:
            self.query_encoder = QueryEncoder(cfg)
            self.language_projection = nn.Linear(cfg.qformer.hidden_size, cfg.llm.hidden_size)
        self.language_model = ParallelCausalLM(
            cfg.llm, pre_process=pre_process, post_process=post_process, layer_range=layer_range
        )
        self.apply_freezing()

    def apply_freezing(self) -> None:
        """Freeze what the config says is frozen (the ViT keeps eval mode and half weights)."""
        cfg = self.cfg
        if self.pre_process and cfg.vision.freeze:
            freeze_vision(self.query_encoder.visual_encoder, frozen_vision_dtype(cfg.vision))
        if self.pre_process and cfg.freeze_qformer:
            self.query_encoder.qformer.requires_grad_(False)
            self.query_encoder.query_tokens.requires_grad_(False)
        if cfg.llm.freeze:
            self.language_model.requires_grad_(False)

    # ----------------------------------------------------------------- batches
    def prepare_batch(self, samples: dict[str, Any], device: torch.device | None = None) -> dict[str, Any]:
        """Tokenize a loader batch ({"image", "text_input", optional "prompt"}) into tensors."""
        return prepare_llm_batch(self.tokenizer, self.cfg, samples, device)

    # ----------------------------------------------------------------- forward
    def image_embeddings(self, image: torch.Tensor) -> torch.Tensor:
        """Projected query outputs [B, Q, llm hidden]."""
        query_output = self.query_encoder(image)
        return self.language_projection(query_output.to(self.language_projection.weight.dtype))

    def input_embeddings(
        self, image: torch.Tensor, input_ids: torch.Tensor, image_slots: torch.Tensor
    ) -> torch.Tensor:
        """Token embeddings with the projected queries scattered into the image slots."""
        image_embeds = self.image_embeddings(image)
        token_embeds = self.language_model.get_input_embeddings()(input_ids)
        if isinstance(token_embeds, tuple):
            token_embeds = token_embeds[0]
        image_embeds = image_embeds.to(token_embeds.dtype)
        return token_embeds.masked_scatter(image_slots.unsqueeze(-1), image_embeds)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Loss of one prepared batch (see :meth:`prepare_batch`); returns {"loss": ...}."""
        if "input_ids" not in batch:
            batch = self.prepare_batch(batch, device=batch["image"].device)
        embeds = self.input_embeddings(batch["image"], batch["input_ids"], batch["image_slots"])
        out = self.language_model(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]
        )
        return {"loss": out.loss}

    # -------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        samples: dict[str, Any],
        prompt: str | None = None,
        num_beams: int = 5,
        max_new_tokens: int = 30,
        min_new_tokens: int = 8,
        length_penalty: float = 1.0,
        repetition_penalty: float = 1.0,
        num_return_sequences: int = 1,
        max_length: int | None = None,
        min_length: int | None = None,
    ) -> list[str]:
        """Text continuing ``prompt`` for each image of ``samples["image"]`` (the prompt is not repeated).

        Lengths count new tokens only, whatever the number of query tokens and the prompt
        length; ``max_length`` / ``min_length`` are accepted as LAVIS's names for the same.
        ``samples["prompt"]`` (a list) gives each image its own prompt. Collective over the
        tensor-parallel group: every TP rank calls it with the same samples.
        """
        if not (self.pre_process and self.post_process):
            raise RuntimeError(
                "generation needs the whole model on one rank (model.llm.pp=1); a model trained with "
                "pp > 1 cannot be evaluated until its checkpoint is resharded, which is not supported yet"
            )
        max_new_tokens = max_length if max_length is not None else max_new_tokens
        min_new_tokens = min_length if min_length is not None else min_new_tokens
        image = samples["image"]
        prompts = samples.get("prompt") or [self.cfg.prompt if prompt is None else prompt] * image.shape[0]
        inputs = build_llm_inputs(self.tokenizer, self.cfg, list(prompts), None, padding_side="left")
        inputs = inputs.to(image.device)
        embeds = self.input_embeddings(image, inputs.input_ids, inputs.image_slots)
        tokens = generation.generate(
            self.language_model,
            embeds,
            inputs.attention_mask,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            length_penalty=length_penalty,
            repetition_penalty=repetition_penalty,
            num_return_sequences=num_return_sequences,
            eos_token_id=self.cfg.llm.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return [text.strip() for text in texts]

    @torch.no_grad()
    def predict_answers(
        self,
        samples: dict[str, Any],
        prompt: str = "Question: {} Short answer:",
        num_beams: int = 5,
        max_new_tokens: int = 10,
        min_new_tokens: int = 1,
        length_penalty: float = -1.0,
        **kwargs: Any,
    ) -> list[str]:
        """Short answers to ``samples["text_input"]`` (questions) about ``samples["image"]``, as LAVIS."""
        questions = samples["text_input"]
        if isinstance(questions, str):
            questions = [questions]
        prompts = [prompt.format(q) if "{}" in prompt else q for q in questions]
        return self.generate(
            {"image": samples["image"], "prompt": prompts},
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            length_penalty=length_penalty,
            **kwargs,
        )
