#!/usr/bin/env python
"""Chat about an image with a MiniGPT-4 or BLIP-2 model, in the terminal or in a web page.

    python launch/chat.py --model runs/minigpt4_stage2 --image photo.jpg
    python launch/chat.py --model /models/blip2-opt-2.7b --image photo.jpg --num-beams 5
    python launch/chat.py --model runs/minigpt4_stage2 --temperature 0.7 --top-p 0.9 --seed 0
    python launch/chat.py --model runs/minigpt4_stage2 --web --port 7860     # needs: pip install -e ".[demo]"

``--model`` is a training run / checkpoint directory, a local Hugging Face Blip2 directory
or a flavour name (random weights unless overrides name weight files); trailing
``key=value`` arguments are job overrides, as ``launch/train.py`` takes them. The answer is
printed while it is generated (greedy and sampling; beam search prints it whole).

In the terminal: type a question and press Enter. Commands: ``/image <path>`` (a new image:
the conversation starts over), ``/reset`` (forget the conversation, keep the image),
``/help``, ``/quit`` (or Ctrl-D); Ctrl-C stops an answer. With input piped in (not a
terminal), each line is a question or a command and each answer is one line of output;
messages about commands go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from _common import exit_with, importing_libraries, setup_logging

COMMANDS = "/image <path>, /reset, /help, /quit"


def _say(text: str, interactive: bool) -> None:
    """A message about a command: on the terminal, or on stderr when stdout carries only answers."""
    print(text, file=sys.stdout if interactive else sys.stderr, flush=True)


def _read(interactive: bool) -> str | None:
    """The next input line, or None at the end of input (Ctrl-D; Ctrl-C at the prompt)."""
    if interactive:
        try:
            return input("You: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return None
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def _show(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _answer(chat, question: str, interactive: bool) -> None:
    """Print the answer to ``question`` as it streams, on one line."""
    # "Assistant: " goes out with the first piece, after any warning about the prompt.
    label = ["Assistant: " if interactive else ""]

    def show(piece: str) -> None:
        _show(label.pop() + piece if label else piece)

    try:
        chat.ask(question, on_text=show)
    except KeyboardInterrupt:  # the unfinished answer is not kept
        show(" (stopped)")
    except ValueError as err:  # a question too long for the model
        _say(str(err), interactive)
        return
    show("\n")


def chat_loop(chat, interactive: bool) -> int:
    """Read questions and commands until /quit or end of input; print the answers as they stream."""
    from blip2_megatron.data.processors import ImageDecodeError

    while (line := _read(interactive)) is not None:
        line = line.strip()
        if not line:
            continue
        command, _, argument = line.partition(" ")
        if command in ("/quit", "/exit"):
            break
        if command == "/help":
            _say(f"commands: {COMMANDS}", interactive)
        elif command == "/reset":
            chat.reset()
            _say("(conversation reset)", interactive)
        elif command == "/image":
            try:
                chat.set_image(argument.strip())
            except (ImageDecodeError, OSError, ValueError) as err:
                _say(f"cannot use {argument.strip()!r} as the image: {err}", interactive)
            else:
                _say(f"(image {argument.strip()}: new conversation)", interactive)
        elif line.startswith("/"):
            _say(f"unknown command {command}; commands: {COMMANDS}", interactive)
        elif chat.image is None:
            _say("no image yet: /image <path>", interactive)
        else:
            _answer(chat, line, interactive)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", required=True, help="run/checkpoint directory, HF Blip2 directory, or flavour"
    )
    parser.add_argument("--image", default=None, help="the image to talk about (or /image <path> later)")
    parser.add_argument("--num-beams", type=int, default=1, help="> 1: beam search (default 1)")
    parser.add_argument("--temperature", type=float, default=0.0, help="> 0: sample (default 0: greedy)")
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="sampling: nucleus probability (default 1: off)"
    )
    parser.add_argument(
        "--top-k", type=int, default=0, help="sampling: keep the k most likely tokens (0: off)"
    )
    parser.add_argument("--seed", type=int, default=None, help="sampling: seed for reproducible answers")
    parser.add_argument("--max-new-tokens", type=int, default=300)
    parser.add_argument("--min-new-tokens", type=int, default=1)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument(
        "--web", action="store_true", help='serve a web page instead (pip install -e ".[demo]")'
    )
    parser.add_argument("--host", default="127.0.0.1", help="web: address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="web: port (default 7860)")
    parser.add_argument(
        "--quantize",
        choices=["none", "int8", "nf4"],
        default=None,
        help="frozen LLM's linear layers in int8 (LLM.int8) or 4-bit NF4 through bitsandbytes "
        "(default: the model's, none unless a directory was saved quantized)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted key=value job overrides")
    args = parser.parse_args(argv)
    setup_logging()

    with importing_libraries():
        from blip2_megatron.chat import Chat, GenerationOptions, import_gradio, serve_web_demo

    try:
        options = GenerationOptions(
            num_beams=args.num_beams,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.min_new_tokens,
            repetition_penalty=args.repetition_penalty,
        )
    except ValueError as err:
        parser.error(str(err))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # One process reads the keyboard / serves the page; a model too big for one device
        # is not chatted with across ranks yet.
        parser.error(
            "launch/chat.py runs in one process (the whole model on one device); start it without a launcher"
        )
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"overrides must be key=value, got {bad}")
    if args.web:
        try:
            import_gradio()  # before the model loads: a missing extra is said at once
        except ModuleNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    with importing_libraries():
        from blip2_megatron.api import load_model_and_preprocess

    overrides = dict(o.split("=", 1) for o in args.overrides)
    # Piped, stdout carries the answers only: what loading prints (DeepSpeed's op builder) goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        model, _, _ = load_model_and_preprocess(args.model, quantize=args.quantize, **overrides)
    if args.web:
        serve_web_demo(model, options, host=args.host, port=args.port, title=f"Chat with {args.model}")
        return 0
    from blip2_megatron.data.processors import ImageDecodeError

    chat = Chat(model, options)
    interactive = sys.stdin.isatty()
    if args.image:
        try:
            chat.set_image(args.image)
        except (ImageDecodeError, OSError) as err:
            print(f"error: cannot use --image {args.image}: {err}", file=sys.stderr)
            return 2
    _say(
        f"Chatting with {args.model} ({model.cfg.kind}). "
        + ("" if args.image else "No image yet: /image <path>. ")
        + f"Commands: {COMMANDS}",
        interactive,
    )
    return chat_loop(chat, interactive)


if __name__ == "__main__":
    exit_with(main())
