"""Chat: conversation layouts, sampling and streaming in generation, the Chat object, the terminal and the web demo.

* Token layouts of 3-turn conversations against the templates, token by token, with the
  built-in tiny tokenizer (MiniGPT-4 Vicuna and LLaMA-2 templates, BLIP-2's context prompt,
  a tokenizer without BOS); the first turn is the training layout.
* Sampling is token-identical to transformers for a seed (HF draws from the global
  generator, we from a seeded ``torch.Generator``), top-k / top-p keep exactly the expected
  tokens of a toy distribution, and on TP = 2 every rank draws TP rank 0's token.
* Streaming: the streamed tokens are the returned ones, the streamed text pieces add up to
  the answer the history keeps, and stop sequences end an answer.
* ``launch/chat.py``: piped input (no terminal), a pseudo-terminal session of three turns
  with /reset and /image, and the Gradio page in headless Chromium (upload, two turns,
  reset), each answer checked against the same model's :class:`Chat` in this process.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from journeys import env as journey_env
from PIL import Image
from test_generation import PAD, frequent_tokens, prompt_embeds
from test_llm_parity import make_hf_model, make_ours

from blip2_megatron.api import load_model_and_preprocess
from blip2_megatron.chat import DEMO_EXTRA, Chat, GenerationOptions
from blip2_megatron.config.model import build_model_config
from blip2_megatron.data.batch import LLMBatchBuilder, build_batch_builder
from blip2_megatron.data.conversation import AnswerDecoder, ConversationLayout, Turn
from blip2_megatron.data.tokenizers import build_tokenizer
from blip2_megatron.models.generation import generate, sampling_scores
from blip2_megatron.parallel.state import free_port

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
CHAT_CLI = REPO / "launch" / "chat.py"
# A tiny MiniGPT-4 (Vicuna template) from the tiny flavour: the stage-2 job's template and end symbol.
MINIGPT4 = {
    "model.kind": "minigpt4",
    "model.prompt_template": '"###Human: {} ###Assistant: "',
    "model.end_sym": '"###"',
    "model.prompt": '"<Img><ImageHere></Img> Describe this image in detail."',
    "model.max_txt_len": "160",
}
# The tiny LLM's vocabulary cut to the built-in tokenizer's 240 pieces: a random model then
# answers in words (an id beyond the tokenizer decodes to nothing).
WORDS_ONLY = {"model.llm.vocab_size": "240"}
MINIGPT4_ARGS = [f"{k}={v}" for k, v in {**MINIGPT4, **WORDS_ONLY}.items()]
WORDS_ONLY_ARGS = [f"{k}={v}" for k, v in WORDS_ONLY.items()]
TURNS = [Turn("what is it?", "a red square"), Turn("where is it?", "at the top."), Turn("what colour?")]
SLOT = "<pad>"  # image slots hold the pad id
REQUIRE_BROWSER = "BLIP2_REQUIRE_BROWSER"


def minigpt4_config():
    overrides = {k.removeprefix("model."): v.strip('"') for k, v in MINIGPT4.items()}
    overrides["max_txt_len"] = int(overrides["max_txt_len"])
    return build_model_config("tiny", overrides)


def tokens_of(builder: LLMBatchBuilder, turns) -> list[str]:
    ids, _ = ConversationLayout(builder).token_ids(turns)
    return builder.tokenizer.convert_ids_to_tokens(ids)


HASHES = ["#", "#", "#"]
HUMAN = ["h", "##u", "##m", "##a", "##n", ":"]
ASSISTANT = [*HASHES, "a", "##s", "##s", "##i", "##s", "##t", "##a", "##n", "##t", ":"]
IMG = ["<", "i", "##m", "##g", ">"]
END_IMG = ["<", "/", "i", "##m", "##g", ">"]
INST = ["[", "in", "##s", "##t", "]"]
END_INST = ["[", "/", "in", "##s", "##t", "]"]


# ------------------------------------------------------------------------------ layouts
def test_minigpt4_conversation_layout_follows_the_template():
    builder = build_batch_builder(minigpt4_config())
    layout = ConversationLayout(builder)
    assert layout.text(TURNS) == (
        "###Human: <Img><ImageHere></Img> what is it? ###Assistant: a red square"
        "###Human: where is it? ###Assistant: at the top.###Human: what colour? ###Assistant: "
    )
    assert tokens_of(builder, TURNS) == [
        "</s>",  # the tokenizer's template prefix, once
        *HASHES, *HUMAN, *IMG, *[SLOT] * 8, *END_IMG, "what", "is", "it", "?", *ASSISTANT,
        "a", "red", "square", *HASHES,  # the answer and its end symbol, which opens the next turn
        *HUMAN, "where", "is", "it", "?", *ASSISTANT,
        "at", "the", "top", ".", *HASHES,
        *HUMAN, "what", "colour", "?", *ASSISTANT,
    ]  # fmt: skip
    ids, slots = layout.token_ids(TURNS)
    assert [i for i, s in enumerate(slots) if s] == list(range(15, 23))  # where <ImageHere> is
    assert ids.count(2) == 1 and ids[0] == 2  # "</s>" (BOS of this tokenizer) only at the start
    # The first turn is laid out as training lays out a sample's prompt.
    first = builder.generation_inputs(["what is it?"])
    assert layout.inputs([Turn(TURNS[0].question)])["input_ids"].tolist() == first["input_ids"].tolist()
    assert layout.inputs([Turn(TURNS[0].question)])["image_slots"].tolist() == first["image_slots"].tolist()
    assert layout.stop_texts == ["###", "###Human:"]


def test_llama2_minigpt4_layout_uses_inst_turns_and_patch_slots():
    cfg = build_model_config("tiny_minigpt4_llama2")
    builder = build_batch_builder(cfg)
    assert cfg.num_image_slots == 4  # 16 patches grouped 4 to 1
    assert ConversationLayout(builder).text(TURNS) == (
        "[INST] <Img><ImageHere></Img> what is it? [/INST] a red square</s>"
        "[INST] where is it? [/INST] at the top.</s>[INST] what colour? [/INST] "
    )
    assert tokens_of(builder, TURNS) == [
        "</s>", *INST, *IMG, *[SLOT] * 4, *END_IMG, "what", "is", "it", "?", *END_INST,
        "a", "red", "square", "</s>",  # LLaMA-2's end symbol after each answer
        *INST, "where", "is", "it", "?", *END_INST, "at", "the", "top", ".", "</s>",
        *INST, "what", "colour", "?", *END_INST,
    ]  # fmt: skip


def test_blip2_conversation_layout_is_lavis_context_prompt():
    builder = build_batch_builder(build_model_config("tiny"))
    layout = ConversationLayout(builder)
    assert layout.text(TURNS) == (
        "<ImageHere>Question: what is it? Answer: a red square. Question: where is it? Answer: at the top. "
        "Question: what colour? Answer:"
    )
    question, answer = ["question", ":"], ["answer", ":"]
    assert tokens_of(builder, TURNS) == [
        *[SLOT] * 8, "</s>",  # the image, then the tokenizer's prefix (as BLIP-2 lays out a prompt)
        *question, "what", "is", "it", "?", *answer, "a", "red", "square", ".",
        *question, "where", "is", "it", "?", *answer, "at", "the", "top", ".",
        *question, "what", "colour", "?", *answer,
    ]  # fmt: skip
    first = builder.generation_inputs(["Question: what is it? Answer:"])
    assert layout.inputs([Turn(TURNS[0].question)])["input_ids"].tolist() == first["input_ids"].tolist()


def test_no_bos_where_the_tokenizer_template_adds_none():
    tokenizer = copy.deepcopy(build_tokenizer("builtin:tiny", "llm"))  # the built-in one is shared
    tokenizer.backend_tokenizer.post_processor = None  # a template without "</s>" (Qwen2-style)
    builder = LLMBatchBuilder(tokenizer, minigpt4_config())
    assert builder.prefix == []
    tokens = tokens_of(builder, TURNS)
    assert tokens[:3] == HASHES and "</s>" not in tokens


def test_bad_conversations_are_refused():
    layout = ConversationLayout(build_batch_builder(minigpt4_config()))
    with pytest.raises(ValueError, match="only the last one may be open"):
        layout.pieces([Turn("a"), Turn("b")])
    with pytest.raises(ValueError, match="<ImageHere>"):
        layout.pieces([Turn("look <ImageHere>")])
    stage1 = build_model_config("tiny", {"kind": "minigpt4", "prompt_template": "", "end_sym": "\n"})
    with pytest.raises(Exception, match="prompt_template is empty"):
        ConversationLayout(build_batch_builder(stage1))


# ------------------------------------------------------------------------------ answer text
def test_answer_decoder_streams_whole_words_and_stops_at_the_end_symbol():
    builder = build_batch_builder(minigpt4_config())
    tok = builder.tokenizer
    layout = ConversationLayout(builder)
    word = ["s", "##q", "##u", "##a", "##r", "##e"]  # "square" in word pieces
    ids = tok.convert_tokens_to_ids(["a", "#", "red", *word, "#", "#", "#", "at", "top"])
    decoder = layout.decoder()
    pieces = [decoder.push(i) for i in ids]
    assert decoder.ended and pieces[1] == ""  # "#" is held back: it may start "###"
    assert "".join(pieces) + decoder.finish() == decoder.text == "a # red square"
    assert pieces[:5] == ["", "", "a #", " red", ""]  # a word shows once the next one starts
    # The end-of-text token ends the answer too; what is held back is released at the end.
    decoder = layout.decoder()
    pieces = [decoder.push(i) for i in tok.convert_tokens_to_ids(["blue", "circle", "#"])]
    pieces += [decoder.push(builder.cfg.llm.eos_token_id), decoder.push(tok.convert_tokens_to_ids("red"))]
    assert "".join(pieces) + decoder.finish() == decoder.text == "blue circle #"
    # A stop text is also found in the decoded text, whatever its tokens.
    decoder = AnswerDecoder(tok, set(), [], ["red square"])
    pieces = [decoder.push(i) for i in tok.convert_tokens_to_ids(["a", "big", "red", "square", "at"])]
    assert decoder.ended and "".join(pieces) + decoder.finish() == decoder.text == "a big"


# ------------------------------------------------------------------------------ sampling
def test_top_k_and_top_p_keep_the_expected_tokens_of_a_toy_distribution():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    logits = probs.log()

    def kept(**kwargs) -> list[int]:
        return torch.isfinite(sampling_scores(logits, **kwargs))[0].nonzero().flatten().tolist()

    assert kept(top_p=0.8) == [0, 1, 2]  # 0.5 + 0.2 < 0.8 <= 0.5 + 0.2 + 0.15
    assert kept(top_p=0.7) == [0, 1]  # reaching top_p exactly is enough
    assert kept(top_p=0.3) == [0]
    assert kept(top_k=2) == [0, 1] and kept(top_k=10) == [0, 1, 2, 3, 4]
    assert kept(top_k=3, top_p=0.7) == [0, 1]  # top-p over the renormalised top 3 (0.59, 0.24, 0.18)
    ties = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert torch.isfinite(sampling_scores(ties, top_k=1))[0].tolist() == [False, True, True, False]
    torch.testing.assert_close(sampling_scores(logits, temperature=0.5), logits / 0.5)
    # transformers' warpers keep the same tokens on random scores.
    scores = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    for top_k, top_p in ((7, 1.0), (0, 0.6), (12, 0.35)):
        ref = scores / 0.8
        if top_k:
            ref = transformers.TopKLogitsWarper(top_k)(None, ref)
        if top_p < 1:
            ref = transformers.TopPLogitsWarper(top_p)(None, ref)
        ours = sampling_scores(scores, temperature=0.8, top_k=top_k, top_p=top_p)
        assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    with pytest.raises(ValueError, match="top_p"):
        sampling_scores(logits, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        sampling_scores(logits, temperature=0.0)


SAMPLING = {
    "t0.7_k20_p0.9": dict(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=12),
    "p0.8": dict(top_k=0, top_p=0.8, max_new_tokens=12),
    "t1.3_k5_two_each_min3": dict(temperature=1.3, top_k=5, num_return_sequences=2, min_new_tokens=3, max_new_tokens=10),
}  # fmt: skip


def sample_both(hf, ours, embeds, mask, eos, seed, **kwargs):
    torch.manual_seed(seed)
    ref = hf.generate(
        inputs_embeds=embeds,
        attention_mask=mask,
        do_sample=True,
        eos_token_id=eos,
        pad_token_id=PAD,
        **kwargs,
    )
    gen = torch.Generator().manual_seed(seed)
    out = generate(
        ours, embeds, mask, do_sample=True, generator=gen, eos_token_id=eos, pad_token_id=PAD, **kwargs
    )
    return out, ref


@pytest.mark.parametrize("name", ["opt", "llama_gqa"])
def test_sampling_is_token_identical_to_transformers_for_a_seed(single_process_group, name):
    hf = make_hf_model(name)
    ours = make_ours(hf)
    embeds, mask = prompt_embeds()
    eos, _ = frequent_tokens(hf, embeds, mask)
    for case, kwargs in SAMPLING.items():
        for seed in (0, 1):
            out, ref = sample_both(hf, ours, embeds, mask, eos, seed, **kwargs)
            assert out.shape == ref.shape and torch.equal(out, ref), (
                f"{case} seed {seed}:\nours {out}\nHF   {ref}"
            )
    # The same seed gives the same tokens; another seed other tokens; top-k 1 is greedy.
    draw = lambda seed, **kw: generate(  # noqa: E731
        ours,
        embeds,
        mask,
        do_sample=True,
        generator=torch.Generator().manual_seed(seed),
        max_new_tokens=12,
        **kw,
    )
    assert torch.equal(draw(5), draw(5)) and not torch.equal(draw(5), draw(6))
    greedy = generate(ours, embeds, mask, max_new_tokens=12)
    assert torch.equal(draw(7, top_k=1), greedy) and torch.equal(draw(8, temperature=2.0, top_p=1e-6), greedy)


def _tp2_sampling(rank: int, world_size: int) -> list[list[int]]:
    from blip2_megatron.parallel import state

    state.initialize_model_parallel(2, 1)
    hf = make_hf_model("opt")
    ours = make_ours(hf)
    embeds, mask = prompt_embeds()
    # Each rank's own generator: only TP rank 0's draws (seed 100) may count.
    gen = torch.Generator().manual_seed(100 + 17 * rank)
    out = generate(
        ours, embeds, mask, do_sample=True, generator=gen, top_p=0.9, max_new_tokens=10, pad_token_id=PAD
    )
    torch.manual_seed(100)
    ref = hf.generate(
        inputs_embeds=embeds, attention_mask=mask, do_sample=True, top_k=0, top_p=0.9, max_new_tokens=10,
        pad_token_id=PAD, eos_token_id=hf.config.eos_token_id,
    )  # fmt: skip
    assert torch.equal(out, ref), f"rank {rank}: ours {out}\nHF (seed 100) {ref}"
    return out.tolist()


@pytest.mark.dist
def test_tensor_parallel_sampling_draws_tp_rank0_tokens_on_every_rank():
    rank0, rank1 = run_distributed(_tp2_sampling, 2)
    assert rank0 == rank1


# ------------------------------------------------------------------------------ streaming, stop sequences
def test_streamed_tokens_are_the_returned_ones_and_stop_sequences_end_rows(single_process_group):
    hf = make_hf_model("opt")
    ours = make_ours(hf)
    embeds, mask = prompt_embeds()
    for kwargs in (dict(), dict(do_sample=True, generator=torch.Generator().manual_seed(3), top_k=30)):
        streamed: list[torch.Tensor] = []
        out = generate(ours, embeds, mask, max_new_tokens=10, eos_token_id=2, pad_token_id=PAD,
                       streamer=streamed.append, **kwargs)  # fmt: skip
        assert torch.equal(torch.stack(streamed, dim=1), out)
    calls = []
    out = generate(
        ours, embeds, mask, max_new_tokens=10, streamer=lambda t: calls.append(t) or len(calls) == 3
    )
    assert out.shape[1] == 3  # the streamer asked to stop after the third token
    free = generate(ours, embeds, mask, max_new_tokens=10, eos_token_id=[], pad_token_id=PAD)
    stop = free[0, 3:5].tolist()
    end = next(i + 2 for i in range(9) if free[0, i : i + 2].tolist() == stop)
    out = generate(
        ours, embeds, mask, max_new_tokens=10, eos_token_id=[], pad_token_id=PAD, stop_sequences=[stop]
    )
    assert torch.equal(out[0, :end], free[0, :end]) and (out[0, end:] == PAD).all()
    beams = generate(ours, embeds, mask, num_beams=3, num_return_sequences=3, max_new_tokens=10, eos_token_id=[],
                     pad_token_id=PAD, stop_sequences=[stop])  # fmt: skip
    for row in beams.tolist():
        hits = [i for i in range(len(row) - 1) if row[i : i + 2] == stop]
        assert not hits or row[hits[0] + 2 :] == [PAD] * (len(row) - hits[0] - 2), row  # a hit ends the beam
    with pytest.raises(ValueError, match="beam search neither samples nor streams"):
        generate(ours, embeds, mask, num_beams=2, streamer=print)


# ------------------------------------------------------------------------------ the Chat object
def red_square(size: int = 48) -> Image.Image:
    image = Image.new("RGB", (size, size), (250, 250, 250))
    image.paste((220, 30, 30), (8, 4, 30, 26))
    return image


def blue_circle(size: int = 48) -> Image.Image:
    image = Image.new("RGB", (size, size), (20, 20, 20))
    image.paste((30, 60, 230), (20, 20, 44, 44))
    return image


QUESTIONS = ["what is in the picture?", "where is it?", "what colour is it?"]


def chat_answers(model, image, questions, **options) -> list[str]:
    chat = Chat(model, GenerationOptions(**options))
    chat.set_image(image)
    return [chat.ask(q) for q in questions]


def test_chat_streams_the_answers_it_keeps_with_every_option(single_process_group):
    model, _, _ = load_model_and_preprocess("tiny", **MINIGPT4, **WORDS_ONLY)
    chat = Chat(model, GenerationOptions(max_new_tokens=10))
    with pytest.raises(ValueError, match="no image yet"):
        chat.ask("hello?")
    chat.set_image(red_square())
    answers = []
    for question in QUESTIONS:
        pieces: list[str] = []
        answers.append(chat.ask(question, on_text=pieces.append))
        assert answers[-1] and "".join(pieces) == answers[-1]
    assert chat.history == list(zip(QUESTIONS, answers))
    assert chat.prompt_text().startswith(
        "###Human: <Img><ImageHere></Img> what is in the picture? ###Assistant: "
    )
    chat.reset()
    assert chat.history == [] and "".join(chat.stream(QUESTIONS[0])) == answers[0]
    # Sampling: a seed reproduces the answer; beam search answers whole.
    for options in (GenerationOptions(temperature=1.5, top_p=0.95, seed=3, max_new_tokens=10),
                    GenerationOptions(num_beams=3, max_new_tokens=10)):  # fmt: skip
        replies = []
        for _ in range(2):
            chat.reset()
            pieces = []
            replies.append(chat.ask(QUESTIONS[0], options, on_text=pieces.append))
            assert "".join(pieces) == replies[-1]
        assert replies[0] == replies[1]
    # A new image is a new conversation; closing a stream stops the answer where it is.
    chat.set_image(blue_circle())
    assert chat.history == []
    stream = chat.stream(QUESTIONS[0], GenerationOptions(max_new_tokens=70))
    first = next(stream)
    stream.close()
    partial = chat.history[-1][1]
    assert partial.startswith(first) and len(model.tokenizer(partial)["input_ids"]) < 60
    with pytest.raises(ValueError, match="temperature"):
        GenerationOptions(temperature=0.7, num_beams=3)


def test_chat_with_a_patch_image_model_and_long_histories(single_process_group, caplog):
    # (model.kind given again: the default job's "kind: llm" would override the flavour's.)
    model, _, _ = load_model_and_preprocess(
        "tiny_minigpt4_llama2", **{"model.kind": "minigpt4"}, **WORDS_ONLY
    )
    chat = Chat(model, GenerationOptions(max_new_tokens=40))
    chat.set_image(red_square())
    for question in QUESTIONS * 2:
        chat.ask(question)
    # The LLM has 128 positions: the oldest turns leave the prompt, the image stays in front.
    assert "left out of the prompt" in caplog.text
    assert len(chat.history) == 6
    with pytest.raises(ValueError, match="max_position_embeddings"):
        chat.ask("what " * 100)


def test_chat_with_a_hugging_face_blip2_directory(single_process_group, tmp_path):
    from test_blip2_hf import write_hf_blip2

    hf_dir = write_hf_blip2(tmp_path / "blip2")
    model, processors, _ = load_model_and_preprocess(str(hf_dir))
    image = processors["eval"](red_square())
    chat = Chat(model, GenerationOptions(max_new_tokens=8))
    chat.set_image(image)
    answer = chat.ask("what is it?")
    # The first turn is BLIP-2's VQA prompt: the same answer as the predictor's (which equals transformers').
    expected = model.generate(
        {"image": image[None], "prompt": ["Question: what is it? Answer:"]},
        num_beams=1, max_new_tokens=8, min_new_tokens=1,
    )[0]  # fmt: skip
    assert answer == expected
    chat.ask("and then?")
    assert chat.prompt_text("why?") == (
        f"<ImageHere>Question: what is it? Answer: {answer}{'' if answer.endswith('.') else '.'} "
        f"Question: and then? Answer: {chat.history[1][1]}{'' if chat.history[1][1].endswith('.') else '.'} "
        "Question: why? Answer:"
    )


# ------------------------------------------------------------------------------ launch/chat.py
def load_cli():
    sys.path.insert(0, str(CHAT_CLI.parent))
    spec = importlib.util.spec_from_file_location("launch_chat", CHAT_CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_web_demo_without_gradio_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # what `import gradio` meets when it is not installed
    assert load_cli().main(["--model", "tiny", "--web"]) == 2
    assert DEMO_EXTRA in capsys.readouterr().err and DEMO_EXTRA == 'pip install -e ".[demo]"'


def test_piped_chat_answers_line_by_line(single_process_group, monkeypatch, capsys, tmp_path):
    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    red_square().save(red)
    blue_circle().save(blue)
    model, _, _ = load_model_and_preprocess("tiny", **MINIGPT4, **WORDS_ONLY)
    expected = chat_answers(model, red, QUESTIONS[:2], max_new_tokens=8)
    expected_blue = chat_answers(model, blue, QUESTIONS[:1], max_new_tokens=8)
    lines = [
        QUESTIONS[0],
        QUESTIONS[1],
        "/reset",
        QUESTIONS[0],
        f"/image {blue}",
        QUESTIONS[0],
        "/nope",
        "/quit",
    ]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    cli = load_cli()
    assert cli.main(["--model", "tiny", "--image", str(red), "--max-new-tokens", "8", *MINIGPT4_ARGS]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines() == [expected[0], expected[1], expected[0], expected_blue[0]]
    assert "(conversation reset)" in out.err and "unknown command /nope" in out.err


# ------------------------------------------------------------------------------ terminal (pty)
class Terminal:
    """``launch/chat.py`` on a pseudo-terminal: type lines, read the screen output."""

    def __init__(self, args: list[str]):
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, str(CHAT_CLI), *args],
            stdin=slave, stdout=slave, stderr=slave, cwd=REPO, env=journey_env(), close_fds=True,
        )  # fmt: skip
        os.close(slave)
        self.fd = master
        self.output = ""

    def read_until(self, marker: str, timeout: float = 120) -> str:
        """Output up to and including the next ``marker``."""
        deadline = time.monotonic() + timeout
        while marker not in self.output:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.proc.poll() is not None and not select.select([self.fd], [], [], 0)[0]:
                raise AssertionError(
                    f"no {marker!r} from the chat (exit {self.proc.poll()}):\n{self.output[-3000:]}"
                )
            if select.select([self.fd], [], [], min(remaining, 1.0))[0]:
                try:
                    self.output += os.read(self.fd, 4096).decode(errors="replace")
                except OSError:  # the child closed the terminal
                    continue
        head, _, self.output = self.output.partition(marker)
        return head + marker

    def type(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            os.close(self.fd)


def answer_on_screen(screen: str) -> str:
    """The assistant's line in what the terminal showed after a question."""
    line = next(line for line in screen.splitlines() if line.startswith("Assistant: "))
    return line.removeprefix("Assistant: ").strip()


@pytest.mark.slow
@pytest.mark.journey
def test_terminal_chat_in_a_pseudo_terminal(single_process_group, tmp_path):
    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    red_square().save(red)
    blue_circle().save(blue)
    model, _, _ = load_model_and_preprocess("tiny", **MINIGPT4, **WORDS_ONLY)
    expected = chat_answers(model, red, QUESTIONS, max_new_tokens=6)
    expected_blue = chat_answers(model, blue, QUESTIONS[:1], max_new_tokens=6)
    term = Terminal(["--model", "tiny", "--image", str(red), "--max-new-tokens", "6", *MINIGPT4_ARGS])
    try:
        term.read_until("You: ")
        for question, answer in zip(QUESTIONS, expected):
            term.type(question)
            assert answer_on_screen(term.read_until("You: ")) == answer
        term.type("/reset")
        assert "(conversation reset)" in term.read_until("You: ")
        term.type(QUESTIONS[0])
        assert answer_on_screen(term.read_until("You: ")) == expected[0]  # the history is gone
        term.type(f"/image {blue}")
        assert "new conversation" in term.read_until("You: ")
        term.type(QUESTIONS[0])
        assert answer_on_screen(term.read_until("You: ")) == expected_blue[0]
        term.type("/quit")
    finally:
        code = term.close()
    assert code == 0


# ------------------------------------------------------------------------------ web demo (browser)
def browser_unavailable() -> str | None:
    """Why the browser test cannot run here, or None."""
    for module, hint in (("gradio", DEMO_EXTRA), ("selenium", 'pip install -e ".[dev]"')):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({hint})"
    for binary in ("chromium", "chromedriver"):
        if shutil.which(binary) is None:
            return f"{binary} is not installed (bash tests/install_browser.sh: Debian's chromium, chromium-driver)"
    return None


def start_browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1000",
        f"--user-data-dir={tempfile.mkdtemp(prefix='chat-browser-')}",
    ):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def skeleton(text: str) -> str:
    """Letters and digits only: the page renders answers as Markdown, which may eat punctuation."""
    return re.sub(r"[^0-9a-z]", "", text.lower())


@pytest.mark.slow
@pytest.mark.journey
def test_web_demo_in_a_headless_browser(single_process_group, tmp_path):
    reason = browser_unavailable()
    if reason:
        if os.environ.get(REQUIRE_BROWSER) == "1":
            pytest.fail(f"{REQUIRE_BROWSER}=1 but the browser test cannot run here: {reason}", pytrace=False)
        pytest.skip(reason)
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    red = tmp_path / "red.png"
    red_square().save(red)
    model, _, _ = load_model_and_preprocess("tiny", **WORDS_ONLY)
    expected = chat_answers(model, red, QUESTIONS[:2], max_new_tokens=8)
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, str(CHAT_CLI), "--model", "tiny", "--max-new-tokens", "8", "--web", "--port", str(port),
         *WORDS_ONLY_ARGS],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=journey_env(GRADIO_ANALYTICS_ENABLED="False"),
    )  # fmt: skip
    browser = None
    try:
        deadline = time.monotonic() + 120
        while f"127.0.0.1:{port}" not in (tmp_path / "server.log").read_text():
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the web demo did not start in 120 s"
            time.sleep(0.5)
        browser = start_browser()
        wait = WebDriverWait(browser, 60)
        browser.get(f"http://127.0.0.1:{port}/")
        upload = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#chat-image input[type=file]"))[0]

        def message_box():
            return browser.find_element(By.CSS_SELECTOR, "#chat-message textarea")

        assert not message_box().is_enabled()  # no image, no question
        upload.send_keys(str(red))
        wait.until(lambda b: message_box().is_enabled())  # the server has the image

        def messages(role: str) -> list[str]:
            # One script reads them all at once: the chat box re-renders while an answer streams.
            return browser.execute_script(
                f"return [...document.querySelectorAll('#chat-box [data-testid={role}]')].map(e => e.innerText)"
            )

        def bot_messages() -> list[str]:
            return messages("bot")

        def ask(question: str, turn: int, answer: str) -> None:
            message_box().send_keys(question, Keys.ENTER)
            try:  # the answer streams in; wait for all of it
                wait.until(
                    lambda b: len(bot_messages()) == turn and skeleton(bot_messages()[-1]) == skeleton(answer)
                )
            except TimeoutException:
                pass
            shown = bot_messages()
            assert len(shown) == turn and skeleton(shown[-1]) == skeleton(answer), (
                f"page shows {shown}, expected {answer!r}"
            )

        for turn, (question, answer) in enumerate(zip(QUESTIONS[:2], expected), start=1):
            ask(question, turn, answer)
        assert [m.strip() for m in messages("user")] == QUESTIONS[:2]
        browser.find_element(By.CSS_SELECTOR, "#chat-reset").click()
        wait.until(lambda b: not bot_messages())
        ask(QUESTIONS[0], 1, expected[0])  # the history is gone: the first answer again
    finally:
        if browser is not None:
            browser.quit()
        server.terminate()
        server.wait(timeout=30)
        log.close()
