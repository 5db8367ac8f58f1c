"""Multi-turn chat about one image, for MiniGPT-4 and BLIP-2 models (terminal and web).

:class:`Chat` holds one conversation: an image (replaceable: a new image starts a new
conversation), the turns so far, and the generation options. Each question is laid out
with the whole history in the model's own template (``data.conversation``), the answer is
generated with greedy search, beam search or sampling (``models.generation``) and streamed
as text pieces while the tokens come (greedy and sampling; a beam answer arrives whole).
:func:`web_demo` puts a :class:`Chat` behind a Gradio page (image upload, chat box, reset,
sampling and beam controls), as MiniGPT-4's and LLaVA's demos do.

With tensor parallelism every TP rank calls the same methods with the same inputs, as for
:class:`~blip2_megatron.inference.Blip2Predictor`; sampled tokens are drawn on TP rank 0.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from blip2_megatron.config import ConfigError
from blip2_megatron.data.batch import LLMBatchBuilder
from blip2_megatron.data.conversation import ConversationLayout, Turn
from blip2_megatron.data.processors import ImageEvalProcessor, ImageInput
from blip2_megatron.inference import Blip2Predictor
from blip2_megatron.models import generation

logger = logging.getLogger(__name__)

DEMO_EXTRA = 'pip install -e ".[demo]"'


@dataclass
class GenerationOptions:
    """How an answer is generated (the terminal's flags and the web page's controls)."""

    num_beams: int = 1  # > 1: beam search (deterministic; no sampling, no streaming)
    temperature: float = 0.0  # 0: greedy / beam search; > 0: sample with this temperature
    top_p: float = 1.0  # sampling: keep the most likely tokens up to this probability (1 = all)
    top_k: int = 0  # sampling: keep the k most likely tokens (0 = all)
    seed: int | None = None  # sampling: the same seed gives the same answer (None = fresh draws)
    max_new_tokens: int = 300  # longest answer in tokens (MiniGPT-4's demo: 300)
    min_new_tokens: int = 1  # the end-of-text token is forbidden before this many tokens
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the answer
    length_penalty: float = 1.0  # beam search: exponent of the length normalisation

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"num_beams={self.num_beams} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = no sampling)")
        if self.temperature > 0 and self.num_beams > 1:
            raise ValueError(
                f"temperature={self.temperature} samples, num_beams={self.num_beams} searches beams: "
                "choose one (temperature 0 for beam search, num_beams 1 for sampling)"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = no top-k filtering)")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens={self.min_new_tokens} must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0")

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0


class Chat:
    """One conversation with a BLIP-2-family LLM model about one image.

    ``model`` is what :func:`blip2_megatron.api.load_model_and_preprocess` returns (a run,
    a Hugging Face Blip2 directory or a flavour); ``image_processor`` defaults to the
    model's eval transform.
    """

    def __init__(
        self,
        model: Blip2Predictor,
        options: GenerationOptions | None = None,
        image_processor: Callable[[ImageInput], torch.Tensor] | None = None,
    ):
        if not isinstance(model.builder, LLMBatchBuilder):
            raise ConfigError(f"a model.kind={model.cfg.kind!r} model has no LLM to chat with")
        if not model.module.holds_whole_model:
            raise ConfigError("chat needs the whole model on each rank: load it with model.llm.pp=1")
        self.model = model
        self.options = options or GenerationOptions()
        self.layout = ConversationLayout(model.builder)
        self.image_processor = image_processor or ImageEvalProcessor(model.cfg.vision.image_size)
        self.image: torch.Tensor | None = None  # [1, 3, S, S] on the model's device
        self.turns: list[Turn] = []

    # ----------------------------------------------------------------- state
    @property
    def history(self) -> list[tuple[str, str]]:
        """``(question, answer)`` of every finished turn."""
        return [(t.question, t.answer) for t in self.turns if t.answer is not None]

    def set_image(self, image: ImageInput | torch.Tensor) -> None:
        """Talk about ``image`` (a path, bytes, a PIL image or a processed ``[3, S, S]`` tensor) from now on.

        The conversation starts afresh: the history was about the previous image.
        """
        if isinstance(image, torch.Tensor):
            pixels = image if image.dim() == 4 else image.unsqueeze(0)
        else:
            pixels = self.image_processor(image).unsqueeze(0)
        size = self.model.cfg.vision.image_size
        if tuple(pixels.shape) != (1, 3, size, size):
            raise ValueError(
                f"image tensor has shape {tuple(pixels.shape)}; the model reads [1, 3, {size}, {size}]"
            )
        self.image = pixels.to(self.model.device)
        self.turns = []

    def reset(self, keep_image: bool = True) -> None:
        """Forget the conversation (and the image unless ``keep_image``)."""
        self.turns = []
        if not keep_image:
            self.image = None

    def prompt_text(self, question: str | None = None) -> str:
        """The conversation so far (plus ``question``) as the model reads it; ``<ImageHere>``: the image."""
        turns = self.turns + ([Turn(question)] if question is not None else [])
        return self.layout.text(turns) if turns else ""

    # ----------------------------------------------------------------- answering
    def _fit(self, turns: list[Turn], max_new_tokens: int) -> list[Turn]:
        """The latest turns whose prompt leaves room for the answer within the LLM's positions."""
        limit = self.model.cfg.llm.max_position_embeddings
        for start in range(len(turns)):
            length = len(self.layout.token_ids(turns[start:])[0])
            if length + max_new_tokens <= limit:
                if start:
                    logger.warning(
                        "the %d oldest turn(s) no longer fit in llm.max_position_embeddings=%d with "
                        "max_new_tokens=%d: left out of the prompt",
                        start,
                        limit,
                        max_new_tokens,
                    )
                return turns[start:]
        raise ValueError(
            f"the question alone takes {length} tokens; with max_new_tokens={max_new_tokens} that exceeds "
            f"llm.max_position_embeddings={limit}: ask a shorter question or lower max_new_tokens"
        )

    @torch.no_grad()
    def ask(
        self,
        question: str,
        options: GenerationOptions | None = None,
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> str:
        """Answer ``question`` about the image; the turn joins the history. Returns the answer.

        ``on_text`` receives the answer in pieces as they are generated (they add up to the
        answer; a beam-search answer comes at the end); ``should_stop`` is polled after every
        token (greedy and sampling) and ends the answer early when it returns True (what has
        been generated stays in the history).
        """
        options = options or self.options
        if self.image is None:
            raise ValueError("no image yet: set one first (set_image; /image <path> in the terminal)")
        question = question.strip()
        if not question:
            raise ValueError("the question is empty")
        turns = self._fit([*self.turns, Turn(question)], options.max_new_tokens)
        module = self.model.module
        device = self.image.device
        inputs = {k: v.to(device) for k, v in self.layout.inputs(turns).items()}
        decoder = self.layout.decoder()
        emit = on_text or (lambda piece: None)

        def streamer(tokens: torch.Tensor) -> bool:
            piece = decoder.push(int(tokens[0]))
            if piece:
                emit(piece)
            return decoder.ended or bool(should_stop and should_stop())

        generator = None
        if options.do_sample and options.seed is not None:
            generator = torch.Generator(device=device).manual_seed(options.seed)
        start = time.perf_counter()
        with self.model.autocast():
            embeds = module.input_embeddings(
                self.image,
                inputs["input_ids"],
                inputs["image_slots"],
                inputs.get("qformer_input_ids"),
                inputs.get("qformer_attention_mask"),
            )
            tokens = generation.generate(
                module.language_model,
                embeds,
                inputs["attention_mask"],
                num_beams=options.num_beams,
                max_new_tokens=options.max_new_tokens,
                min_new_tokens=options.min_new_tokens,
                repetition_penalty=options.repetition_penalty,
                length_penalty=options.length_penalty,
                eos_token_id=self.model.cfg.llm.eos_token_id,
                pad_token_id=self.model.builder.pad_id,
                do_sample=options.do_sample,
                temperature=options.temperature if options.do_sample else 1.0,
                top_k=options.top_k,
                top_p=options.top_p,
                generator=generator,
                stop_sequences=self.layout.stop_sequences,
                streamer=streamer if options.num_beams == 1 else None,
            )
        self.model.count_generated(tokens, self.model.builder.pad_id, time.perf_counter() - start)
        if options.num_beams > 1:
            piece = decoder.push_all(tokens[0].tolist())
            if piece:
                emit(piece)
        piece = decoder.finish()
        if piece:
            emit(piece)
        self.turns.append(Turn(question, decoder.text))
        return decoder.text

    def stream(self, question: str, options: GenerationOptions | None = None) -> Iterator[str]:
        """:meth:`ask` as an iterator of text pieces (generation runs in a worker thread).

        Closing the iterator early stops the generation after the current token.
        """
        pieces: queue.Queue[Any] = queue.Queue()
        stop = threading.Event()
        done = object()

        def work() -> None:
            try:
                self.ask(question, options, on_text=pieces.put, should_stop=stop.is_set)
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                pieces.put(err)
            finally:
                pieces.put(done)

        worker = threading.Thread(target=work, name="chat-generation", daemon=True)
        worker.start()
        try:
            while (item := pieces.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            worker.join()


# ------------------------------------------------------------------------------ web demo
def import_gradio() -> Any:
    """The ``gradio`` module, or an error saying how to install the demo extra."""
    try:
        import gradio
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"the web demo needs gradio, which is not installed: {DEMO_EXTRA}") from err
    return gradio


def web_demo(model: Blip2Predictor, options: GenerationOptions | None = None, title: str = "") -> Any:
    """A Gradio ``Blocks`` app chatting with ``model``: image upload, chat box, reset, generation controls.

    Each browser session has its own :class:`Chat` (in a ``gr.State``); uploading an image
    starts a new conversation about it. Serve it with :func:`serve_web_demo`.
    """
    gr = import_gradio()
    defaults = options or GenerationOptions()
    title = title or "blip2-megatron chat"
    ask_hint, upload_hint = "Ask about the image and press Enter", "Upload an image first"

    def session_chat(chat: Chat | None) -> Chat:
        return chat if chat is not None else Chat(model, defaults)

    def upload(image: Any, chat: Chat | None):
        chat = session_chat(chat)
        if image is None:
            chat.reset(keep_image=False)
        else:
            chat.set_image(image)
        # As in MiniGPT-4's demo, the message box opens once the model has the image.
        ready = image is not None
        return chat, [], gr.update(interactive=ready, placeholder=ask_hint if ready else upload_hint)

    def reset(chat: Chat | None):
        chat = session_chat(chat)
        chat.reset()
        return chat, [], ""

    def respond(
        message: str, messages: list, chat: Chat | None, beams, temperature, top_p, top_k, seed, max_new
    ):
        chat = session_chat(chat)
        if chat.image is None:
            raise gr.Error("Upload an image first.")
        if not message.strip():
            raise gr.Error("Type a question.")
        try:
            opts = GenerationOptions(
                num_beams=int(beams),
                temperature=float(temperature),
                top_p=float(top_p),
                top_k=int(top_k),
                seed=None if seed is None or int(seed) < 0 else int(seed),
                max_new_tokens=int(max_new),
                min_new_tokens=defaults.min_new_tokens,
                repetition_penalty=defaults.repetition_penalty,
                length_penalty=defaults.length_penalty,
            )
        except ValueError as err:
            raise gr.Error(str(err)) from None
        messages = [*messages, {"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        yield "", messages, chat
        answer = ""
        for piece in chat.stream(message, opts):
            answer += piece
            messages[-1] = {"role": "assistant", "content": answer}
            yield "", messages, chat
        messages[-1] = {"role": "assistant", "content": chat.history[-1][1]}
        yield "", messages, chat

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {title}\nUpload an image, then ask about it.")
        chat_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="pil", label="Image", elem_id="chat-image", height=320)
                reset_button = gr.Button("Reset conversation", elem_id="chat-reset")
                beams = gr.Slider(
                    1, 10, value=defaults.num_beams, step=1, label="Beams (1: greedy or sampling)"
                )
                temperature = gr.Slider(
                    0.0, 2.0, value=defaults.temperature, step=0.05, label="Temperature (0: no sampling)"
                )
                top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p")
                top_k = gr.Slider(0, 200, value=defaults.top_k, step=1, label="Top-k (0: off)")
                seed = gr.Number(
                    value=-1 if defaults.seed is None else defaults.seed,
                    precision=0,
                    label="Seed (-1: random)",
                )
                max_new = gr.Slider(1, 1024, value=defaults.max_new_tokens, step=1, label="Max new tokens")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Chat", elem_id="chat-box", height=480)
                message = gr.Textbox(
                    placeholder=upload_hint, interactive=False, show_label=False, elem_id="chat-message"
                )
                send = gr.Button("Send", variant="primary", elem_id="chat-send")
        image.change(upload, [image, chat_state], [chat_state, chatbot, message])
        reset_button.click(reset, [chat_state], [chat_state, chatbot, message])
        chatbot.clear(reset, [chat_state], [chat_state, chatbot, message])  # the chat box's own bin button
        controls = [beams, temperature, top_p, top_k, seed, max_new]
        for trigger in (message.submit, send.click):
            trigger(respond, [message, chatbot, chat_state, *controls], [message, chatbot, chat_state])
    return demo


def serve_web_demo(
    model: Blip2Predictor,
    options: GenerationOptions | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    title: str = "",
) -> None:
    """Serve :func:`web_demo` at ``http://host:port`` until interrupted.

    The page uses the system's fonts (nothing is fetched from a font service) and no share
    link is made, so it works on a machine without internet access.
    """
    gr = import_gradio()
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace"])
    web_demo(model, options, title).queue().launch(
        server_name=host, server_port=port, share=False, show_error=True, ssr_mode=False, theme=theme
    )
