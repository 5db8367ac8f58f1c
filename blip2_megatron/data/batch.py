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
``</s>`` for OPT, ``<s>`` for LLaMA, nothing for Qwen2; see :func:`template_prefix_ids`;
``[image]`` = ``model.num_image_slots`` empty slots: the queries, or the grouped patches)::

    BLIP-2:              [image] prefix prompt target end_sym [pad...]
    MiniGPT-4 stage 1:   prefix [image] target end_sym                      (no template, no prompt)
    MiniGPT-4 stage 2:   prefix "###Human: <Img>" [image] "</Img> {instruction} ###Assistant: " target "###"
    MiniGPT-4 LLaMA-2:   prefix "[INST] <Img>" [image] "</Img> {instruction} [/INST] " target "</s>"

Labels are -100 (:data:`IGNORE_INDEX`) on image slots, prefix, prompt and padding; only the
target and its end symbol are learned.

Encoder-decoder LLMs (FlanT5) take the seq2seq layout instead: the encoder reads
``[image] prompt </s>`` and the labels are the decoder's targets ``target </s>`` (the model
shifts them right behind its start token); ``</s>`` is what T5's tokenizer ends every text
with, so ``model.end_sym`` is empty. ``labels`` then have their own length, and
``first_label`` is 0. Prefix language modelling (``model.prefix_lm``, BLIP-2 FlanT5's stage
2): each caption is cut at a word boundary into a prefix, appended to the encoder's text,
and the rest, which is the target. Words, not tokens, are counted (split on whitespace), so
a cut never falls inside a word; with ``n >= 2`` words the prefix takes ``k`` of them, ``k``
uniform in ``1 .. n - 1`` (both parts non-empty), drawn with a generator keyed by the
sample's ``sample_key`` (so a resumed run cuts the same way) or by the caption itself. Training pads on the right (to a multiple of
``pad_to_multiple_of``, which bounds the number of distinct shapes a pipeline stage or a
compiled kernel sees); generation pads on the left. BLIP-2 tokenizes prompt and target
together (LAVIS), so word pieces at the boundary are the ones the LLM was trained with, and
``max_txt_len`` bounds prefix + prompt + target; MiniGPT-4 tokenizes each piece on its own
and cuts only target + end symbol to ``max_txt_len``, as MiniGPT-4 does.

MiniGPT-4 conversations: the instruction (``model.prompt``, a per-sample ``"prompt"``, or
one drawn from ``model.prompt_file``) goes into ``model.prompt_template`` at ``{}``; the
image goes where ``<ImageHere>`` stands (in the instruction, as in MiniGPT-4's prompt
lists, or in an older template). An instruction that does not place the image gets it in
front: ``<Img><ImageHere></Img> `` inside a template (as MiniGPT-4's chat puts an uploaded
image before the first question), the bare image without one (stage 1). With a prompt
file, each training sample draws its instruction with a generator keyed by its
``sample_key`` (its position in the data, see ``data.loader``), so a resumed run draws
the same instructions.

Training batches (what the loader yields and the engine feeds the model)::

    stage 1: {"image", "input_ids", "attention_mask", "image_codes"}
    LLM:     {"image", "input_ids", "attention_mask", "image_slots", "labels", "first_label"}
             + {"qformer_input_ids", "qformer_attention_mask"} when model.instruction_aware

InstructBLIP (``model.instruction_aware``): each sample's prompt is its instruction. The
LLM sees it where BLIP-2 puts a prompt, and the Q-Former reads it too, as BERT tokens of
the Q-Former's tokenizer (``qformer.tokenizer``): ``[CLS] instruction [SEP]``, cut on the
left to ``qformer.max_txt_len`` tokens and padded on the right to the batch's longest, as
LAVIS does (with prefix language modelling, the instruction is the prompt before a
caption prefix joins it).

``first_label`` (an int, computed here on the host) is the first position that holds a
label in any row: the model computes logits and the loss from there on only (BLIP-2's
query slots and prompt tokens never carry one), without reading the labels on the device.

``image`` holds every row's image, or only the rows one rank encodes (:func:`image_rows`:
with tensor parallelism each TP rank encodes ``ceil(B / TP)`` of the images, and the
loader decodes only those); the text tensors always hold all ``B`` rows.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from blip2_megatron.config import Blip2Config, ConfigError
from blip2_megatron.config.model import IMAGE_PLACEHOLDER
from blip2_megatron.data.tokenizers import build_tokenizer, llm_tokenizer_spec
from blip2_megatron.data.wds import make_rng

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of a position that takes no loss (Hugging Face's convention)
PAD_TO_MULTIPLE_OF = 8
#: The image in front of an instruction that does not place it (MiniGPT-4's chat wraps an upload so).
IMAGE_IN_FRONT = f"<Img>{IMAGE_PLACEHOLDER}</Img> "
#: Batch key with each sample's position in the data (the train loader adds it).
SAMPLE_KEY = "sample_key"


def shipped_prompt_files(suffix: str = ".txt") -> list[str]:
    """Names of the prompt files shipped in ``blip2_megatron/configs/prompts`` (``.txt``
    instruction lists; ``.json`` instruction templates per task)."""
    folder = resources.files("blip2_megatron") / "configs" / "prompts"
    return sorted(p.name[: -len(suffix)] for p in folder.iterdir() if p.name.endswith(suffix))


def prompt_file_path(
    spec: str, suffix: str = ".txt", key: str = "model.prompt_file", what: str = "prompt file"
) -> Path:
    """Config field ``key`` as a path: an existing file, else a shipped name (``minigpt4_alignment``)."""
    if Path(spec).is_file():
        return Path(spec)
    if spec in shipped_prompt_files(suffix):
        return Path(str(resources.files("blip2_megatron") / "configs" / "prompts" / f"{spec}{suffix}"))
    raise ConfigError(
        f"{key}={spec!r} is neither a file nor a shipped {what}; shipped: {shipped_prompt_files(suffix)}"
    )


def load_instructions(spec: str) -> list[str]:
    """The instructions of a prompt file: one per non-blank line, each placing the image once.

    MiniGPT-4 drops lines without ``<ImageHere>`` silently; here such a line is an error
    naming it, so a typo cannot shrink the list unnoticed.
    """
    path = prompt_file_path(spec)
    instructions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if line.count(IMAGE_PLACEHOLDER) != 1:
            raise ConfigError(
                f"{path}:{number}: {line!r} must hold {IMAGE_PLACEHOLDER} once (where the image goes)"
            )
        instructions.append(line)
    if not instructions:
        raise ConfigError(f"{path} holds no instruction")
    return instructions


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
    image_slots: torch.Tensor  # [B, T] bool, exactly model.num_image_slots True per row
    labels: torch.Tensor | None  # [B, T] with -100 where no loss is taken; None for generation


class LLMBatchBuilder:
    """Prompts and targets -> the LLM sequence layout with image slots and labels.

    ``tokenizer`` is the LLM's; ``cfg`` the model config (kind, number of image slots,
    prompt, template, prompt file, end symbol, ``max_txt_len``). ``qformer_tokenizer``: the
    Q-Former's BERT tokenizer, needed by an instruction-aware model (set to cut on the
    left and pad on the right, as LAVIS's does).
    """

    def __init__(
        self,
        tokenizer: Any,
        cfg: Blip2Config,
        pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF,
        qformer_tokenizer: Any = None,
    ):
        if cfg.llm is None:
            raise ConfigError("an LLM batch builder needs model.llm (model.kind 'llm' or 'minigpt4')")
        if tokenizer.pad_token_id is None:
            raise ConfigError("the LLM tokenizer has no pad token")
        unk_id = tokenizer.unk_token_id
        if (
            tokenizer.pad_token_id >= cfg.llm.vocab_size
            and unk_id is not None
            and unk_id < cfg.llm.vocab_size
        ):
            # LLaMA-2 ships no pad token and the "[PAD]" added for it lies past the 32000 rows of
            # its embedding. Padded positions are masked out of attention and loss, so any token of
            # the vocabulary pads alike: LLaMA's "<unk>" (MiniGPT-4 pads with an ordinary token too).
            logger.info(
                "LLM pad token %r (id %d) is outside llm.vocab_size=%d: padding with %r (id %d)",
                tokenizer.pad_token,
                tokenizer.pad_token_id,
                cfg.llm.vocab_size,
                tokenizer.unk_token,
                unk_id,
            )
            tokenizer.pad_token = tokenizer.unk_token
        if tokenizer.pad_token_id >= cfg.llm.vocab_size:
            # Padding and image slots are looked up in the embedding before they are masked or replaced.
            raise ConfigError(
                f"the LLM tokenizer's pad token {tokenizer.pad_token!r} has id {tokenizer.pad_token_id}, outside "
                f"the model's llm.vocab_size={cfg.llm.vocab_size}; give the tokenizer a pad token of the vocabulary"
            )
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.pad_to_multiple_of = max(int(pad_to_multiple_of), 1)
        self.prefix = template_prefix_ids(tokenizer)
        self.num_image_slots = cfg.num_image_slots
        self.pad_id = tokenizer.pad_token_id
        self.instructions = load_instructions(cfg.prompt_file) if cfg.prompt_file else []
        self.seq2seq = cfg.llm.is_encoder_decoder
        for instruction in [cfg.prompt, *self.instructions] if cfg.kind == "minigpt4" else []:
            self.conversation(instruction)  # an image placed twice fails here, not mid-training
        self.qformer_tokenizer = None
        if cfg.instruction_aware:
            if qformer_tokenizer is None:
                raise ConfigError(
                    "model.instruction_aware=true: the batch builder needs the Q-Former's tokenizer "
                    "(qformer.tokenizer) for the instructions"
                )
            check_qformer_tokenizer(qformer_tokenizer, cfg)
            # As LAVIS's: an instruction keeps its end, and its positions start at 0 (right padding).
            qformer_tokenizer.truncation_side, qformer_tokenizer.padding_side = "left", "right"
            self.qformer_tokenizer = qformer_tokenizer

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _closed_ids(self, text: str) -> list[int]:
        """T5: ``text`` as its tokenizer encodes it (ending in ``</s>``), cut to ``max_txt_len``
        tokens with the end token kept, as the tokenizer's own truncation does."""
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        limit = self.cfg.max_txt_len
        return ids if len(ids) <= limit else ids[: limit - 1] + ids[-1:]

    def _seq2seq_layout(
        self, prompts: Sequence[str], targets: Sequence[str] | None, padding_side: str
    ) -> LLMInputs:
        """Encoder ``[image] prompt </s>`` and decoder labels ``target </s>`` (see the module docstring)."""
        slots = self.num_image_slots
        encoder = [[self.pad_id] * slots + self._closed_ids(prompt) for prompt in prompts]
        length = max(len(ids) for ids in encoder)
        if padding_side == "right":
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(encoder)
        input_ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        image_slots = torch.zeros((batch, length), dtype=torch.bool)
        for b, ids in enumerate(encoder):
            start = 0 if padding_side == "right" else length - len(ids)
            input_ids[b, start : start + len(ids)] = torch.tensor(ids)
            attention_mask[b, start : start + len(ids)] = 1
            image_slots[b, start : start + slots] = True
        labels = None
        if targets is not None:
            decoder = [self._closed_ids(target) for target in targets]
            target_len = (
                -(-max(len(ids) for ids in decoder) // self.pad_to_multiple_of) * self.pad_to_multiple_of
            )
            labels = torch.full((batch, target_len), IGNORE_INDEX, dtype=torch.long)
            for b, ids in enumerate(decoder):
                labels[b, : len(ids)] = torch.tensor(ids)
        return LLMInputs(input_ids, attention_mask, image_slots, labels)

    def split_prefix(self, prompt: str, caption: str, key: str) -> tuple[str, str]:
        """Prefix language modelling: ``(prompt + caption prefix, caption rest)`` (module docstring)."""
        words = caption.split()
        if len(words) < 2:
            return prompt, caption
        cut = make_rng(key, "prefix_lm").randint(1, len(words) - 1)
        encoder_text = " ".join(([prompt] if prompt else []) + words[:cut])
        return encoder_text, " ".join(words[cut:])

    def conversation(self, instruction: str) -> str:
        """MiniGPT-4: the text around the image for ``instruction``, with one ``<ImageHere>``."""
        template = self.cfg.prompt_template
        if IMAGE_PLACEHOLDER not in template + instruction:
            instruction = (IMAGE_IN_FRONT if template else IMAGE_PLACEHOLDER) + instruction
        text = template.replace("{}", instruction, 1) if template else instruction
        if text.count(IMAGE_PLACEHOLDER) != 1:
            raise ValueError(
                f"instruction {instruction!r} in model.prompt_template={template!r} places the image "
                f"{text.count(IMAGE_PLACEHOLDER)} times; it has one place"
            )
        return text

    def instruction_for(self, sample_key: str) -> str:
        """The prompt-file instruction of the sample at ``sample_key`` (the same on every call)."""
        return self.instructions[make_rng(sample_key, "instruction").randrange(len(self.instructions))]

    def _row(self, prompt: str, target: str | None) -> tuple[list[int], list[bool], int]:
        """(ids, is_image_slot, index of the first labelled position) of one sample."""
        cfg = self.cfg
        slots = self.num_image_slots
        if cfg.kind == "minigpt4":
            before, after = self.conversation(prompt).split(IMAGE_PLACEHOLDER)
            before_ids = self.prefix + self._ids(before)
            after_ids = self._ids(after)
            target_ids = self._ids(target + cfg.end_sym)[: cfg.max_txt_len] if target is not None else []
            ids = before_ids + [self.pad_id] * slots + after_ids + target_ids
            is_slot = (
                [False] * len(before_ids) + [True] * slots + [False] * (len(after_ids) + len(target_ids))
            )
            return ids, is_slot, len(before_ids) + slots + len(after_ids)
        if target is None:
            text_ids = self._ids(prompt)
            prompt_len = len(text_ids)
        else:
            target = target + cfg.end_sym
            joined = f"{prompt} {target}" if prompt and not prompt.endswith(" ") else prompt + target
            text_ids = self._ids(joined)
            prompt_len = len(self._ids(prompt))
        text = (self.prefix + text_ids)[: max(cfg.max_txt_len, len(self.prefix) + 1)]
        ids = [self.pad_id] * slots + text
        is_slot = [True] * slots + [False] * len(text)
        return ids, is_slot, slots + len(self.prefix) + prompt_len

    def layout(
        self, prompts: Sequence[str], targets: Sequence[str] | None = None, padding_side: str = "right"
    ) -> LLMInputs:
        """The token layout of a batch; ``targets=None`` for generation (no labels, left padding).

        ``prompts`` are per-sample texts that follow the image (BLIP-2's "a photo of", a VQA
        question, a MiniGPT-4 instruction). The end symbol is appended to each target here.
        """
        if targets is not None and len(targets) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        if self.seq2seq:
            return self._seq2seq_layout(prompts, targets, padding_side)
        rows = [self._row(p, None if targets is None else targets[i]) for i, p in enumerate(prompts)]
        length = max(len(ids) for ids, _, _ in rows)
        if length > self.cfg.llm.max_position_embeddings:
            raise ValueError(
                f"a sequence of {length} tokens (image slots, template, prompt, target) exceeds the LLM's "
                f"llm.max_position_embeddings={self.cfg.llm.max_position_embeddings}; lower model.max_txt_len "
                "or use shorter prompts"
            )
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

    def instruction_tokens(self, instructions: Sequence[str]) -> dict[str, torch.Tensor]:
        """InstructBLIP: ``qformer_input_ids`` / ``qformer_attention_mask`` ``[B, Tq]`` of the instructions.

        BERT tokens (``[CLS] ... [SEP]``), cut on the left to ``qformer.max_txt_len``,
        right-padded to the longest; ``{}`` for a model that is not instruction-aware.
        """
        if self.qformer_tokenizer is None:
            return {}
        encoded = self.qformer_tokenizer(
            list(instructions),
            padding="longest",
            truncation=True,
            max_length=self.cfg.qformer.max_txt_len,
            return_tensors="pt",
        )
        return {
            "qformer_input_ids": encoded["input_ids"],
            "qformer_attention_mask": encoded["attention_mask"],
        }

    def __call__(self, samples: dict[str, Any]) -> dict[str, Any]:
        """A training batch from processed samples.

        ``samples``: {"image": [B, 3, S, S], "text_output" (captions) or "text_input",
        optional "prompt" (per-sample prompts), "sample_key" (per-sample data positions,
        needed to draw instructions from ``model.prompt_file``)}. Without per-sample
        prompts, each sample gets a prompt-file instruction, or else ``model.prompt``.
        """
        targets = list(samples.get("text_output") or samples["text_input"])
        prompts = samples.get("prompt")
        if not prompts and self.instructions:
            if SAMPLE_KEY not in samples:
                raise ValueError(
                    f"model.prompt_file={self.cfg.prompt_file!r} draws each sample's instruction by its position "
                    f"in the data, but this batch has no {SAMPLE_KEY!r} (the train loader adds it); "
                    "pass per-sample 'prompt's instead"
                )
            prompts = [self.instruction_for(key) for key in samples[SAMPLE_KEY]]
        prompts = list(prompts or [self.cfg.prompt] * len(targets))
        instruction = self.instruction_tokens(prompts)
        if self.cfg.prefix_lm:
            keys = samples.get(SAMPLE_KEY) or targets
            prompts, targets = map(
                list,
                zip(
                    *(self.split_prefix(p, t, str(k)) for p, t, k in zip(prompts, targets, keys, strict=True))
                ),
            )
        inputs = self.layout(prompts, targets)
        return {
            "image": samples["image"],
            "input_ids": inputs.input_ids,
            "attention_mask": inputs.attention_mask,
            "image_slots": inputs.image_slots,
            "labels": inputs.labels,
            # The decoder's labels start at its first position.
            "first_label": 0 if self.seq2seq else first_labelled_position(inputs.labels),
            **instruction,
        }

    def generation_inputs(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Left-padded ``input_ids`` / ``attention_mask`` / ``image_slots`` for generation
        (and, instruction-aware, the prompts' ``qformer_input_ids`` / ``qformer_attention_mask``)."""
        inputs = self.layout(list(prompts), None, padding_side="left")
        return {
            "input_ids": inputs.input_ids,
            "attention_mask": inputs.attention_mask,
            "image_slots": inputs.image_slots,
            **self.instruction_tokens(prompts),
        }

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """Generated token ids -> texts (special tokens dropped, surrounding space stripped)."""
        return [text.strip() for text in self.tokenizer.batch_decode(tokens, skip_special_tokens=True)]


def image_rows(batch_size: int, share: int, shares: int) -> list[int]:
    """The rows of a batch whose images share ``share`` of ``shares`` encodes.

    ``ceil(B / shares)`` consecutive rows each; past the end of the batch a share repeats
    the last row (so every share has the same number of rows: an all-gather of equal
    blocks puts the batch back together, and the repeats are dropped after it).
    """
    per_share = -(-batch_size // shares)
    start = share * per_share
    return [min(row, batch_size - 1) for row in range(start, start + per_share)]


def first_labelled_position(labels: torch.Tensor) -> int:
    """The first position of ``labels [B, T]`` that is not ``IGNORE_INDEX`` in some row (0 if none is)."""
    labelled = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    return int(labelled[0]) if len(labelled) else 0


def check_qformer_tokenizer(tokenizer: Any, cfg: Blip2Config, needs_bos: bool = False) -> None:
    """Refuse a Q-Former tokenizer that does not fit ``cfg.qformer`` (pad id, vocabulary, length).

    ``needs_bos``: its bos must be ``qformer.bos_token_id`` ([DEC], which stage 1's ITG
    starts with).
    """
    q = cfg.qformer
    bos = tokenizer.bos_token_id
    if needs_bos and bos != q.bos_token_id:
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


class Stage1BatchBuilder:
    """Captions -> Q-Former tokens (BERT + [DEC]), and image ids -> codes, for stage 1."""

    def __init__(self, tokenizer: Any, cfg: Blip2Config):
        check_qformer_tokenizer(tokenizer, cfg, needs_bos=True)
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
    qformer_tokenizer = build_tokenizer(cfg.qformer.tokenizer, "qformer") if cfg.instruction_aware else None
    return LLMBatchBuilder(tokenizer, cfg, pad_to_multiple_of, qformer_tokenizer=qformer_tokenizer)
