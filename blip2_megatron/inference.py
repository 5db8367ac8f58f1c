"""Text in, text out: a model plus its batch builder, in LAVIS's spirit.

:class:`Blip2Predictor` is what ``load_model_and_preprocess`` returns and what evaluation
drives: ``generate`` (captions), ``predict_answers`` (VQA), and for stage-1 models the
retrieval features (``image_features``, ``text_features``, ``itm_scores``). It tokenizes
with the batch builder and hands the model tensors only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from blip2_megatron import accelerator
from blip2_megatron.config import Blip2Config
from blip2_megatron.data.batch import BatchBuilder, LLMBatchBuilder, Stage1BatchBuilder

DEFAULT_VQA_PROMPT = "Question: {} Short answer:"


class Blip2Predictor:
    """A BLIP-2 model (whole, any TP size) with its tokenizer, for generation and retrieval.

    Collective over the tensor-parallel group: every TP rank calls each method with the
    same inputs and gets the same result. ``compute_dtype`` (bf16 / fp16; None = fp32) is
    the autocast dtype of generation and retrieval (see ``accelerator.inference_dtype``).
    Generation counts its new tokens and their time: :meth:`tokens_per_second`.
    """

    def __init__(
        self,
        module: nn.Module,
        cfg: Blip2Config,
        builder: BatchBuilder,
        compute_dtype: torch.dtype | None = None,
    ):
        self.module = module
        self.cfg = cfg
        self.builder = builder
        self.compute_dtype = compute_dtype
        self.generated_tokens = 0
        self.generation_seconds = 0.0

    def autocast(self):
        """The context generation and feature extraction compute in."""
        return accelerator.autocast(self.compute_dtype)

    def count_generated(self, tokens: torch.Tensor, pad_token_id: int, seconds: float) -> None:
        """Add one generate call: its new tokens (padding after a row ended left out) and time."""
        self.generated_tokens += int((tokens != pad_token_id).sum())
        self.generation_seconds += seconds

    def tokens_per_second(self) -> float | None:
        """New tokens per second over every generate call so far (None before any)."""
        return self.generated_tokens / self.generation_seconds if self.generation_seconds else None

    # ----------------------------------------------------------------- nn.Module-like
    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def tokenizer(self) -> Any:
        return self.builder.tokenizer

    def parameters(self):
        return self.module.parameters()

    def to(self, *args: Any, **kwargs: Any) -> Blip2Predictor:
        self.module.to(*args, **kwargs)
        return self

    def eval(self) -> Blip2Predictor:
        self.module.eval()
        return self

    def train(self, mode: bool = True) -> Blip2Predictor:
        self.module.train(mode)
        return self

    @property
    def training(self) -> bool:
        return self.module.training

    def _llm_builder(self) -> LLMBatchBuilder:
        if not isinstance(self.builder, LLMBatchBuilder):
            raise TypeError(f"a {self.cfg.kind} model does not generate text; it has retrieval features")
        return self.builder

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def generate_tokens(
        self,
        samples: dict[str, Any],
        prompt: str | None = None,
        num_beams: int = 5,
        max_new_tokens: int = 30,
        min_new_tokens: int = 8,
        length_penalty: float = 1.0,
        repetition_penalty: float = 1.0,
        num_return_sequences: int = 1,
    ) -> torch.Tensor:
        """New token ids for each image of ``samples["image"]`` (see :meth:`generate`)."""
        builder = self._llm_builder()
        image = samples["image"].to(self.device)
        prompts = samples.get("prompt") or [self.cfg.prompt if prompt is None else prompt] * image.shape[0]
        inputs = {k: v.to(image.device) for k, v in builder.generation_inputs(list(prompts)).items()}
        start = time.perf_counter()
        with self.autocast():
            tokens = self.module.generate(
                image,
                **inputs,
                num_beams=num_beams,
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                length_penalty=length_penalty,
                repetition_penalty=repetition_penalty,
                num_return_sequences=num_return_sequences,
                pad_token_id=builder.pad_id,
            )
        self.count_generated(tokens, builder.pad_id, time.perf_counter() - start)  # tokens are read: synced
        return tokens

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
        ``samples["prompt"]`` (a list) gives each image its own prompt; the default prompt
        is the model's (``model.prompt``).
        """
        tokens = self.generate_tokens(
            samples,
            prompt=prompt,
            num_beams=num_beams,
            max_new_tokens=max_length if max_length is not None else max_new_tokens,
            min_new_tokens=min_length if min_length is not None else min_new_tokens,
            length_penalty=length_penalty,
            repetition_penalty=repetition_penalty,
            num_return_sequences=num_return_sequences,
        )
        return self._llm_builder().decode(tokens)

    @torch.no_grad()
    def predict_answers(
        self,
        samples: dict[str, Any],
        prompt: str = DEFAULT_VQA_PROMPT,
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

    # ----------------------------------------------------------------- retrieval (stage 1)
    def _stage1_builder(self) -> Stage1BatchBuilder:
        if not isinstance(self.builder, Stage1BatchBuilder):
            raise TypeError("retrieval features need a stage-1 model (model.kind='stage1')")
        return self.builder

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """ViT features after ln_vision ``[B, N, Dv]`` (reused by :meth:`itm_scores`)."""
        self._stage1_builder()
        return self.module.encode_image(image.to(self.device))

    @torch.no_grad()
    def image_features(self, image: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None):
        """Normalised ITC image features ``[B, Q, embed_dim]`` from images or ViT features."""
        if image_embeds is None:
            image_embeds = self.encode_image(image)
        return self.module.image_embeds_itc(image_embeds=image_embeds)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised ITC text features ``[B, embed_dim]``."""
        tokens = self._stage1_builder().text_tokens(texts)
        return self.module.text_embeds_itc(**{k: v.to(self.device) for k, v in tokens.items()})

    @torch.no_grad()
    def itm_scores(self, image_embeds: torch.Tensor, texts: Sequence[str], as_probability: bool = False):
        """ITM score ``[B]`` of pairs (image i, text i) from ViT features (:meth:`encode_image`)."""
        tokens = self._stage1_builder().text_tokens(texts)
        return self.module.itm_scores(
            image_embeds,
            **{k: v.to(image_embeds.device) for k, v in tokens.items()},
            as_probability=as_probability,
        )
