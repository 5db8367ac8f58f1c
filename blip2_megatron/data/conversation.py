"""Multi-turn conversations: text turns -> the LLM sequence of a chat, generated ids -> answer text.

The chat's side of the data/model contract (``data.batch`` is the training side, and the
first turn of a conversation is laid out exactly as a training sample's prompt). Layouts
(``prefix`` = the tokenizer's own template prefix, :func:`~blip2_megatron.data.batch.template_prefix_ids`;
``[image]`` = ``model.num_image_slots`` empty slots)::

    MiniGPT-4 ("###Human: {} ###Assistant: ", end symbol "###"):
        prefix "###Human: <Img>" [image] "</Img> {q1} ###Assistant: " "{a1}###"
               "Human: {q2} ###Assistant: " "{a2}###" "Human: {q3} ###Assistant: "
    MiniGPT-4 LLaMA-2 ("[INST] {} [/INST] ", end symbol "</s>"):
        prefix "[INST] <Img>" [image] "</Img> {q1} [/INST] " "{a1}</s>" "[INST] {q2} [/INST] "
    BLIP-2 (model.kind "llm", LAVIS's context prompt for OPT / Vicuna BLIP-2):
        [image] prefix "Question: {q1} Answer: {a1}. Question: {q2} Answer: {a2}. Question: {q3} Answer:"
    BLIP-2 FlanT5: the same text into the encoder, closed by "</s>"; the decoder answers.

MiniGPT-4: the first turn is ``LLMBatchBuilder.conversation`` (the image in front of the
question, as MiniGPT-4's chat puts an uploaded image); later turns are the template without
an image. When the template starts with the end symbol ("###Human: ..."), the end symbol
closing an answer is also the start of the next turn, as in MiniGPT-4's own conversations
("...###Assistant: a1###Human: q2###Assistant: "), so it is not written twice. Each quoted
piece is tokenized on its own, as training tokenizes template and target apart; the prefix
(BOS where the tokenizer adds one) comes once, at the start.

BLIP-2: LAVIS's documented multi-turn form, ``"Question: {} Answer: {}."`` per past turn
joined by spaces, then ``"Question: {} Answer:"``; the period is left out after an answer
that already ends a sentence. The text is tokenized in one piece, as LAVIS does.

An answer ends at the LLM's end-of-text token, at the end symbol, or where the next user
turn would start ("###Human:", "[INST]", "Question:"): the *stop texts*. They are found on
token ids (:attr:`ConversationLayout.stop_sequences`, which generation can stop on, beams
included) and in the decoded text (any other tokenization of them).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from blip2_megatron.config import ConfigError
from blip2_megatron.data.batch import IMAGE_PLACEHOLDER, LLMBatchBuilder

logger = logging.getLogger(__name__)

BLIP2_PAST_TURN = "Question: {} Answer: {}"
BLIP2_OPEN_TURN = "Question: {} Answer:"
_SENTENCE_END = (".", "!", "?")
# The image group of an older MiniGPT-4 template ("###Human: <Img><ImageHere></Img> {} ..."),
# which later turns leave out.
_IMAGE_GROUP = re.compile(r"(<Img>)?" + re.escape(IMAGE_PLACEHOLDER) + r"(</Img>)?\s?")
_LAST_WORD = re.compile(r"\s(?=\S*$)")


@dataclass
class Turn:
    """One exchange: the user's question and the model's answer (None while it is being generated)."""

    question: str
    answer: str | None = None


class ConversationLayout:
    """Turns -> ``input_ids`` / ``attention_mask`` / ``image_slots`` in the model's conversation template.

    ``builder`` is the model's batch builder (its tokenizer, prefix, pad id and first-turn
    layout). The image goes into the first of the turns laid out.
    """

    def __init__(self, builder: LLMBatchBuilder):
        cfg = builder.cfg
        if cfg.kind not in ("llm", "minigpt4"):
            raise ConfigError(f"model.kind={cfg.kind!r} has no conversation template (kinds: llm, minigpt4)")
        self.builder = builder
        self.cfg = cfg
        self.tokenizer = builder.tokenizer
        if cfg.kind == "minigpt4":
            template = cfg.prompt_template
            if not template:
                raise ConfigError(
                    "model.prompt_template is empty: this MiniGPT-4 model was trained without a conversation "
                    "template (stage 1: the image, then a caption); chat with a stage-2 model"
                )
            without_image = _IMAGE_GROUP.sub("", template, count=1)
            shared = bool(cfg.end_sym) and without_image.startswith(cfg.end_sym)
            self.later_turn = without_image[len(cfg.end_sym) :] if shared else without_image
            next_turn = without_image
        else:
            next_turn = BLIP2_OPEN_TURN
        stop_texts = [cfg.end_sym, next_turn.split("{}", 1)[0].strip()]
        self.stop_texts = [t for i, t in enumerate(stop_texts) if t and t not in stop_texts[:i]]
        self.stop_sequences = self._stop_sequences(self.stop_texts)
        self.eos_ids = {cfg.llm.eos_token_id}

    # ----------------------------------------------------------------- tokens
    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _stop_sequences(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each stop text as it is tokenized alone, after a word, and after a word and a space.

        (LLaMA's "###" is "▁###" alone or after a space but "##" "#" glued to a word; OPT's
        differs with and without a space before it.)
        """
        word = self._ids("a")
        found: list[list[int]] = []
        for text in texts:
            variants = [self._ids(text)]
            for joined in ("a" + text, "a " + text):
                ids = self._ids(joined)
                if ids[: len(word)] == word and len(ids) > len(word):
                    variants.append(ids[len(word) :])
            for ids in variants:
                if ids and ids not in found:
                    found.append(ids)
        return found

    def pieces(self, turns: Sequence[Turn]) -> list[str]:
        """The conversation as text pieces, each tokenized on its own; the image is a piece of its own.

        Every turn but the last must have an answer; the last one's answer may be None (the
        prompt for generating it).
        """
        if not turns:
            raise ValueError("a conversation needs at least one turn")
        for i, turn in enumerate(turns):
            if IMAGE_PLACEHOLDER in turn.question:
                raise ValueError(
                    f"question {turn.question!r} holds {IMAGE_PLACEHOLDER}; the image has one place"
                )
            if turn.answer is None and i != len(turns) - 1:
                raise ValueError(f"turn {i} of {len(turns)} has no answer; only the last one may be open")
        if self.cfg.kind == "minigpt4":
            return self._minigpt4_pieces(turns)
        texts = [
            BLIP2_PAST_TURN.format(
                t.question, t.answer if t.answer.endswith(_SENTENCE_END) else t.answer + "."
            )
            if t.answer is not None
            else BLIP2_OPEN_TURN.format(t.question)
            for t in turns
        ]
        return [IMAGE_PLACEHOLDER, " ".join(texts)]

    def _minigpt4_pieces(self, turns: Sequence[Turn]) -> list[str]:
        before, after = self.builder.conversation(turns[0].question).split(IMAGE_PLACEHOLDER)
        pieces = [before, IMAGE_PLACEHOLDER, after]
        for i, turn in enumerate(turns):
            if i > 0:
                pieces.append(self.later_turn.replace("{}", turn.question, 1))
            if turn.answer is not None:
                pieces.append(turn.answer + self.cfg.end_sym)
        return pieces

    def text(self, turns: Sequence[Turn]) -> str:
        """The conversation as one string, ``<ImageHere>`` where the image goes (for display and logs)."""
        return "".join(self.pieces(turns))

    def token_ids(self, turns: Sequence[Turn]) -> tuple[list[int], list[bool]]:
        """``(ids, is_image_slot)`` of the conversation; image slots hold the pad id."""
        ids: list[int] = []
        slots: list[bool] = []
        prefix_done = False
        for piece in self.pieces(turns):
            if piece == IMAGE_PLACEHOLDER:
                ids += [self.builder.pad_id] * self.builder.num_image_slots
                slots += [True] * self.builder.num_image_slots
                continue
            piece_ids = self._ids(piece)
            if not prefix_done:  # the tokenizer's template prefix, once, before the first text
                piece_ids = self.builder.prefix + piece_ids
                prefix_done = True
            ids += piece_ids
            slots += [False] * len(piece_ids)
        if self.builder.seq2seq:  # an encoder's text ends as its tokenizer ends texts (T5: "</s>")
            ids.append(self.tokenizer.eos_token_id)
            slots.append(False)
        return ids, slots

    def inputs(self, turns: Sequence[Turn]) -> dict[str, torch.Tensor]:
        """``input_ids`` / ``attention_mask`` / ``image_slots``, each ``[1, T]``, for generation.

        An instruction-aware model (InstructBLIP) also gets the conversation's text as the
        Q-Former's instruction (``qformer_input_ids`` / ``qformer_attention_mask``): the text
        the LLM reads, cut on the left to the Q-Former's length so the open question stays,
        as LAVIS's InstructBLIP reads one prompt with both.
        """
        ids, slots = self.token_ids(turns)
        text = "".join(piece for piece in self.pieces(turns) if piece != IMAGE_PLACEHOLDER)
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "image_slots": torch.tensor([slots], dtype=torch.bool),
            **self.builder.instruction_tokens([text]),
        }

    def decoder(self) -> AnswerDecoder:
        """A fresh :class:`AnswerDecoder` for one answer."""
        return AnswerDecoder(self.tokenizer, self.eos_ids, self.stop_sequences, self.stop_texts)


class AnswerDecoder:
    """Generated token ids -> the answer's text, in pieces as the ids arrive (streaming).

    A piece is released once the words in it are complete (another word has begun after
    them), so word pieces, unfinished UTF-8 bytes and a stop text in the making are never
    shown; tokens that could begin a stop sequence are held back until the next token tells. The pieces add up to :attr:`text` once :meth:`finish` has been called.
    """

    def __init__(
        self,
        tokenizer: Any,
        eos_ids: set[int],
        stop_sequences: Sequence[Sequence[int]],
        stop_texts: Sequence[str],
    ):
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.stop_sequences = [list(s) for s in stop_sequences]
        self.stop_texts = list(stop_texts)
        self.ids: list[int] = []
        self.shown = ""
        self.ended = False
        self.finished = False

    def _cut(self, ids: list[int]) -> str:
        """Decoded text of ``ids`` up to the first stop text (which ends the answer)."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True).lstrip()
        for stop in self.stop_texts:
            at = text.find(stop)
            if at >= 0:
                text = text[:at]
                self.ended = True
        return text

    def _held_back(self) -> int:
        """How many trailing ids might be the start of a stop sequence."""
        held = 0
        for seq in self.stop_sequences:
            for k in range(min(len(seq) - 1, len(self.ids)), held, -1):
                if self.ids[-k:] == seq[:k]:
                    held = k
                    break
        return held

    def push(self, token: int) -> str:
        """Take one generated token; return the text it releases ("" if none yet)."""
        if self.ended:
            return ""
        if token in self.eos_ids:
            self.ended = True
            return ""
        self.ids.append(int(token))
        for seq in self.stop_sequences:
            if self.ids[-len(seq) :] == seq:
                del self.ids[-len(seq) :]
                self.ended = True
                return ""
        text = self._cut(self.ids[: len(self.ids) - self._held_back()])
        if self.ended:
            return ""
        # Up to the end of the last word that another one follows: never a trailing space, which
        # the end of the answer might strip.
        match = _LAST_WORD.search(text.rstrip())
        ready = text[: match.start()].rstrip() if match else ""
        if len(ready) > len(self.shown) and ready.startswith(self.shown):
            piece, self.shown = ready[len(self.shown) :], ready
            return piece
        return ""

    def push_all(self, tokens: Sequence[int]) -> str:
        """Take several tokens (a finished beam); return the text they release."""
        return "".join(self.push(int(t)) for t in tokens)

    def finish(self) -> str:
        """End the answer; return the rest of its text (after which :attr:`text` is final)."""
        final = self._cut(self.ids).strip()
        self.ended = self.finished = True
        if not final.startswith(self.shown):
            # Decoding more tokens changed text already released (a tokenizer whose decoding of a
            # prefix is not a prefix of the decoding): the final text wins, the stream is off.
            logger.warning("streamed text %r is not a prefix of the answer %r", self.shown, final)
            self.shown = final
            return ""
        piece, self.shown = final[len(self.shown) :], final
        return piece

    @property
    def text(self) -> str:
        """The answer: the text released so far (all of it after :meth:`finish`)."""
        return self.shown
