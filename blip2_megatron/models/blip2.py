"""BLIP-2 with a decoder-only LLM: stage-2 pretraining, caption fine-tuning, MiniGPT-4.

The image goes through the frozen ViT and then one of two image paths (``model.image_encoder``):

* ``"qformer"`` (BLIP-2, MiniGPT-4): the Q-Former's query outputs (``query_encoder``);
* ``"patches"`` (MiniGPT-4's LLaMA-2 variant, MiniGPT-v2): the ViT's patch tokens, CLS
  dropped, ``patch_group`` consecutive tokens concatenated (``patch_encoder``).

Either output is projected to the LLM width (``language_projection``) and takes the place
of the ``image_slots`` of the LLM's input sequence (``model.num_image_slots`` per image).
Where the slots are, which tokens carry a loss and how prompts are tokenized is decided by
the batch builder (``blip2_megatron.data.batch``); this module receives tensors only.

A pipeline stage is :class:`Blip2PipeStage`: the same :class:`Blip2ForLLM` with parts
absent (``blip2_megatron.parallel.pipeline.PipelineStage`` says which: ViT blocks, the
bridge into the LLM, decoder layers, the head), plus the placeholders DeepSpeed's
optimizer needs on all-frozen stages.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn

from blip2_megatron.config import Blip2Config
from blip2_megatron.models import generation
from blip2_megatron.models.llm import ParallelCausalLM
from blip2_megatron.models.query_encoder import QueryEncoder
from blip2_megatron.models.t5 import ParallelT5
from blip2_megatron.models.vision import VisionEncoder, freeze_vision, frozen_vision_dtype
from blip2_megatron.parallel.pipeline import PipelineStage
from blip2_megatron.parallel.tp_split import (
    gather_rows,
    own_random_stream,
    rows_of_this_rank,
    splits_images,
    sum_gradients_over_tp,
)

logger = logging.getLogger(__name__)


class PatchEncoder(nn.Module):
    """ViT patch tokens grouped for the LLM: ``[B, 3, S, S] -> [B, N / g, g * vision hidden]``.

    The CLS token is dropped and each ``g = patch_group`` consecutive patch tokens (in the
    ViT's row-major order) are concatenated into one vector, as MiniGPT-4's LLaMA-2 variant
    and MiniGPT-v2 do. ``visual_encoder`` keeps the name it has in :class:`QueryEncoder`, so
    the same converters fill it (with the ``patch_encoder.`` prefix).
    """

    def __init__(self, cfg: Blip2Config):
        super().__init__()
        self.visual_encoder = VisionEncoder(cfg.vision)
        self.patch_group = cfg.patch_group

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        patches = self.visual_encoder(image)[:, 1:, :]  # ln_vision applied, CLS dropped
        batch, num_patches, width = patches.shape
        return patches.reshape(batch, num_patches // self.patch_group, self.patch_group * width)


class Blip2ForLLM(nn.Module):
    """Vision encoder + Q-Former (or grouped patches) + projection + tensor-parallel LLM.

    A pipeline stage is the same class with parts absent: ``stage`` (a
    :class:`~blip2_megatron.parallel.pipeline.PipelineStage`; default the whole model) names
    the ViT blocks, whether the bridge (``ln_vision``, Q-Former or patch grouping,
    projection, token embedding) is here, the decoder layers and whether the head is (see
    :class:`Blip2PipeStage`). Parts keep their whole-model names (ViT block ``i`` is
    ``encoder.layers.{i}`` on any stage), so checkpoints do not depend on the layout.
    """

    def __init__(
        self,
        cfg: Blip2Config,
        stage: PipelineStage | None = None,
        llm_dtype: torch.dtype = torch.float32,
        llm_device: torch.device | str | None = None,
    ):
        """``llm_dtype`` / ``llm_device``: where and in what dtype the LLM's parameters are
        created. On ``"meta"`` nothing is allocated or initialised: the caller places the
        LLM (``language_model.to_empty``) and loads every parameter from files."""
        super().__init__()
        if cfg.llm is None:
            raise ValueError("Blip2ForLLM needs model.llm; use Blip2Stage1 for model.kind='stage1'")
        self.cfg = cfg
        self.stage = stage or PipelineStage.whole(cfg.vision.num_layers, cfg.llm.num_layers)
        if self.stage.holds_image_path:
            # Built whole and pruned to this stage's parts, so each part draws its random
            # initial weights as in the whole model (every layout starts equal).
            if cfg.image_encoder == "patches":
                self.patch_encoder = PatchEncoder(cfg)
            else:
                self.query_encoder = QueryEncoder(cfg)
            self.image_encoder.visual_encoder.keep_parts(self.stage.vision_blocks, self.stage.has_bridge)
            if self.stage.has_bridge:
                self.language_projection = nn.Linear(cfg.image_feature_size, cfg.llm.hidden_size)
            elif cfg.image_encoder == "qformer":
                del self.query_encoder.qformer, self.query_encoder.query_tokens
        self.language_model: ParallelCausalLM | ParallelT5 | None = None
        if self.stage.holds_llm:
            on_meta = llm_device is not None and torch.device(llm_device).type == "meta"
            with torch.device(llm_device) if llm_device is not None else contextlib.nullcontext():
                if cfg.llm.is_encoder_decoder:  # the whole model, always (no pipeline stages)
                    self.language_model = ParallelT5(
                        cfg.llm, params_dtype=llm_dtype, init_weights=False if on_meta else None
                    )
                else:
                    self.language_model = ParallelCausalLM(
                        cfg.llm,
                        pre_process=self.stage.has_bridge,
                        post_process=self.stage.has_head,
                        layer_range=self.stage.llm_layers,
                        params_dtype=llm_dtype,
                        init_weights=False if on_meta else None,
                    )
        self.apply_freezing()
        self.split_images = self.stage.holds_image_path and splits_images(cfg)
        if self.split_images:
            # Each TP rank encodes its share of the images (image_embeddings): the image
            # path's gradients are summed over TP ranks before DeepSpeed reduces them over DP.
            image_path = [*self.image_encoder.parameters()]
            if self.stage.has_bridge:
                image_path += [*self.language_projection.parameters()]
            sum_gradients_over_tp(image_path)

    @property
    def holds_whole_model(self) -> bool:
        """Every part on this rank (no pipeline split): what generation needs."""
        cfg = self.cfg
        return self.stage == PipelineStage.whole(cfg.vision.num_layers, cfg.llm.num_layers)

    def apply_freezing(self) -> None:
        """Freeze what the config says is frozen (the ViT keeps eval mode and half weights)."""
        cfg = self.cfg
        if self.stage.holds_image_path and cfg.vision.freeze:
            freeze_vision(self.image_encoder.visual_encoder, frozen_vision_dtype(cfg.vision))
        if self.stage.has_bridge and cfg.freeze_qformer:
            self.query_encoder.qformer.requires_grad_(False)
            self.query_encoder.query_tokens.requires_grad_(False)
        if cfg.llm.freeze and self.language_model is not None:
            self.language_model.requires_grad_(False)

    @property
    def image_encoder(self) -> QueryEncoder | PatchEncoder:
        """The image path this model was built with (on a pipeline stage: the part it holds)."""
        return self.patch_encoder if self.cfg.image_encoder == "patches" else self.query_encoder

    # ----------------------------------------------------------------- forward
    def _instruction(
        self, qformer_input_ids: torch.Tensor | None, qformer_attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        """The instruction's Q-Former tokens as the query encoder's extra inputs (none without)."""
        if not self.cfg.instruction_aware:
            if qformer_input_ids is not None:
                raise ValueError(
                    "qformer_input_ids given, but this model is not instruction-aware "
                    "(model.instruction_aware=false: its Q-Former reads no text)"
                )
            return ()
        if qformer_input_ids is None:
            raise ValueError(
                "an instruction-aware model (InstructBLIP) needs the instruction's Q-Former tokens: "
                "qformer_input_ids / qformer_attention_mask from the batch builder"
            )
        if qformer_attention_mask is None:
            qformer_attention_mask = torch.ones_like(qformer_input_ids)
        return qformer_input_ids, qformer_attention_mask

    def image_features(
        self,
        image: torch.Tensor,
        batch: int,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """This model's part of the image path on this TP rank's rows of a batch of ``batch``.

        ``image``: images (whole model, or the pipeline stage with ViT block 0) or the
        previous stage's ViT hidden states (this rank's rows already). Returns query outputs
        (or grouped patches) where the bridge is here, else the ViT's raw hidden states.
        An instruction-aware model reads each image's instruction (``qformer_input_ids`` /
        ``qformer_attention_mask``, all ``batch`` rows) in the Q-Former; with the images
        split over TP ranks, each rank takes the instruction rows of its images.
        """
        if not self.stage.has_bridge:
            encoder, instruction = self.image_encoder.visual_encoder, ()
        else:
            encoder = self.image_encoder
            instruction = self._instruction(qformer_input_ids, qformer_attention_mask)
        if not self.split_images:
            return encoder(image, *instruction)
        if self.stage.reads_image:
            image = rows_of_this_rank(image, batch)
        instruction = tuple(rows_of_this_rank(rows, batch) for rows in instruction)
        with own_random_stream():
            return encoder(image, *instruction)

    def image_embeddings(
        self,
        image: torch.Tensor,
        batch: int | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Projected image features [B, num_image_slots, llm hidden] of a batch of ``batch``.

        With tensor parallelism each TP rank encodes ``ceil(B / TP)`` of the images and the
        projected rows are all-gathered (``blip2_megatron.parallel.tp_split``): no TP rank
        repeats another's ViT and Q-Former work. ``image`` holds the whole batch's images or,
        as the train loader decodes them, only this rank's (or, on a pipeline stage after
        the first ViT blocks, this rank's rows of the ViT's hidden states). Collective over
        the TP group. ``qformer_input_ids`` / ``qformer_attention_mask``: an instruction-aware
        model's instruction tokens (see :meth:`image_features`).
        """
        batch = image.shape[0] if batch is None else batch
        features = self.image_features(image, batch, qformer_input_ids, qformer_attention_mask)
        embeds = self.language_projection(features.to(self.language_projection.weight.dtype))
        return gather_rows(embeds, batch) if self.split_images else embeds

    def input_embeddings(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        image_slots: torch.Tensor,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the projected image features scattered into the image slots (the bridge)."""
        image_embeds = self.image_embeddings(
            image, input_ids.shape[0], qformer_input_ids, qformer_attention_mask
        )
        token_embeds = self.language_model.get_input_embeddings()(input_ids)
        if isinstance(token_embeds, tuple):
            token_embeds = token_embeds[0]
        image_embeds = image_embeds.to(token_embeds.dtype)
        return token_embeds.masked_scatter(image_slots.unsqueeze(-1), image_embeds)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss of one batch from the batch builder; returns {"loss": ...}.

        ``batch``: ``image [B, 3, S, S]``, ``input_ids``, ``attention_mask``, ``image_slots``
        and ``labels``, each ``[B, T]``, and optionally ``first_label`` (see
        ``blip2_megatron.data.batch``). With an encoder-decoder LLM the first four are the
        encoder's input and ``labels [B, L]`` the decoder's targets. An instruction-aware
        model also reads ``qformer_input_ids`` / ``qformer_attention_mask`` ``[B, Tq]``.
        """
        embeds = self.input_embeddings(
            batch["image"],
            batch["input_ids"],
            batch["image_slots"],
            batch.get("qformer_input_ids"),
            batch.get("qformer_attention_mask"),
        )
        if self.cfg.llm.is_encoder_decoder:
            out = self.language_model(
                inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]
            )
            return {"loss": out.loss}
        out = self.language_model(
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            right_padded=True,
            first_label=batch.get("first_label", 0),
        )
        return {"loss": out.loss}

    # -------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_slots: torch.Tensor,
        num_beams: int = 5,
        max_new_tokens: int = 30,
        min_new_tokens: int = 8,
        length_penalty: float = 1.0,
        repetition_penalty: float = 1.0,
        num_return_sequences: int = 1,
        pad_token_id: int | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """New token ids ``[B * num_return_sequences, <= max_new_tokens]`` after left-padded prompts.

        ``input_ids`` / ``attention_mask`` / ``image_slots`` (and, for an instruction-aware
        model, ``qformer_input_ids`` / ``qformer_attention_mask``) come from the batch
        builder's ``generation_inputs``. Lengths count new tokens only. Collective over the
        tensor-parallel group: every TP rank calls it with the same inputs.
        """
        if not self.holds_whole_model:
            raise RuntimeError(
                "generation needs the whole model on one rank: load the run with model.llm.pp=1 "
                "(any run loads in any layout; see launch/convert.py reshard)"
            )
        embeds = self.input_embeddings(
            image, input_ids, image_slots, qformer_input_ids, qformer_attention_mask
        )
        return generation.generate(
            self.language_model,
            embeds,
            attention_mask,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            length_penalty=length_penalty,
            repetition_penalty=repetition_penalty,
            num_return_sequences=num_return_sequences,
            eos_token_id=self.cfg.llm.eos_token_id,
            pad_token_id=self.cfg.llm.pad_token_id if pad_token_id is None else pad_token_id,
        )


class Blip2PipeStage(nn.Module):
    """One pipeline stage of a BLIP-2 LLM model (DeepSpeed ``PipelineModule`` layer).

    The stage holds what its :class:`~blip2_megatron.parallel.pipeline.PipelineStage` says
    (``model.stage``), in forward order: ViT blocks, the bridge (``ln_vision``, Q-Former or
    patch grouping, projection, token embeddings and the image merge), decoder layers, the
    head and the loss. What it reads and sends:

    * the stage with ViT block 0 reads ``(image, input_ids, attention_mask, image_slots)``;
    * a stage that starts inside the image path reads ``(vision_hidden, input_ids,
      attention_mask, image_slots)``; ending inside the ViT, it sends the same 4-tuple on;
    * after the bridge, stages exchange ``(hidden_states, attention_mask)``; the last stage
      returns logits.

    With the image path split over TP ranks (``parallel/tp_split.py``) each TP rank's ViT
    rows travel along its own pipeline and the bridge gathers them (the batch size is
    ``input_ids.shape[0]``).

    Every stage must hand DeepSpeed the same optimizer groups (weight decay / none): ZeRO
    runs one grad-norm collective per group over all stages, and an empty parameter list
    is refused outright. A stage whose trainable parameters lack a kind (all frozen layers:
    both) gets a one-element placeholder of that kind; it is added to the output times
    zero, so it has a (zero) gradient and changes nothing. Frozen ViT blocks are never
    handed to the optimizer, as everywhere.
    """

    def __init__(self, model: Blip2ForLLM, stage_id: int, num_stages: int):
        super().__init__()
        self.model = model
        self.stage_id = stage_id
        self.first = stage_id == 0
        self.last = stage_id == num_stages - 1
        device = next(model.parameters()).device
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.placeholders = nn.ParameterList()
        if not any(p.ndim >= 2 for p in trainable):
            self.placeholders.append(nn.Parameter(torch.zeros(1, 1, device=device)))
        if not any(p.ndim < 2 for p in trainable):
            self.placeholders.append(nn.Parameter(torch.zeros(1, device=device)))

    def _input_needs_gradient(self) -> bool:
        """Whether anything before this stage trains (so its input's gradient is needed).

        Before the bridge that is a trained ViT; from the bridge on, the projection always.
        """
        stage = self.model.stage
        if stage.reads_image:
            return False  # pixels: nothing before them
        return not (stage.holds_image_path and self.model.cfg.vision.freeze)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        model, stage = self.model, self.model.stage
        first_input = inputs[0]
        if not self._input_needs_gradient():
            # DeepSpeed marks every received float tensor as needing a gradient; frozen
            # blocks before anything trainable need no backward (a zero gradient is sent).
            inputs = (first_input.detach(), *inputs[1:])
        if stage.holds_image_path:
            x, input_ids, attention_mask, image_slots = inputs
            if not stage.has_bridge:
                vision_hidden = model.image_features(x, input_ids.shape[0])
                vision_hidden = self._with_zero_gradients(vision_hidden, first_input)
                return (vision_hidden, input_ids, attention_mask, image_slots)
            embeds = model.input_embeddings(x, input_ids, image_slots.bool())
            out = model.language_model(inputs_embeds=embeds, attention_mask=attention_mask, right_padded=True)
        else:
            hidden_states, attention_mask = inputs
            out = model.language_model(
                hidden_states=hidden_states, attention_mask=attention_mask, right_padded=True
            )
        output = self._with_zero_gradients(out.logits if self.last else out.hidden_states, first_input)
        return output if self.last else (output, attention_mask)

    def _with_zero_gradients(self, output: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
        """``output`` plus zero times the placeholders (and a received input that needs no
        gradient but that DeepSpeed sends one back for), so each gets a (zero) gradient."""
        for placeholder in self.placeholders:
            output = output + 0.0 * placeholder.sum().to(output.dtype)
        if not self.first and not self._input_needs_gradient() and received.is_floating_point():
            output = output + 0.0 * received.sum().to(output.dtype)
        return output

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model.language_model.causal_lm_loss(logits, labels)
