"""Tokenizers for the Q-Former (BERT) and the LLM, from a local path or built in.

Real jobs point ``qformer.tokenizer`` / ``llm.tokenizer`` at local Hugging Face tokenizer
directories (nothing is fetched from a hub). The spec ``"builtin:tiny"`` builds small
WordPiece tokenizers in memory, deterministically, for the tiny CPU flavour and the tests:
whole words for the vocabulary of captions and questions, single characters as the
fallback so that any ASCII text still tokenizes.

Tokenizers whose transformers class is remote code (InternLM2's, ``trust_remote_code``)
are not run: their sentencepiece model (``tokenizer.model``) is rebuilt here as a
``tokenizers`` BPE that encodes as sentencepiece does (see :func:`sentencepiece_bpe_tokenizer`).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import string
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from blip2_megatron.config import Blip2Config, ConfigError

logger = logging.getLogger(__name__)

BUILTIN_TINY = "builtin:tiny"
# Files of a Hugging Face tokenizer (any of them marks a directory as holding one).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
TINY_VOCAB_SIZE = 512

# Words of the built-in sample dataset's captions and of ordinary short captions/questions.
_TINY_WORDS = """
a an the of on in at to and with is are there this that it its one two three four five six
photo picture image shows showing view close up near next small large big tiny huge medium
little left right top bottom center centre middle corner upper lower side above below between
red green blue yellow orange purple pink white black gray grey brown cyan magenta
circle square triangle rectangle star shape shapes ball box dot ring disk diamond cross
background foreground object objects colored coloured bright dark light plain simple
what which where how many color colour size position question answer short yes no
man woman person people dog cat car bus train street table room food water sky tree
sitting standing holding riding walking playing looking white some other
""".split()
_SPECIALS_QFORMER = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_SPECIALS_LLM = ["<s>", "<pad>", "</s>", "\n", "<unk>"]  # ids 0..4: OPT-like bos/pad/eos order


def _tiny_vocab(specials: list[str], reserve_last: int) -> dict[str, int]:
    pieces: list[str] = list(specials)
    chars = string.ascii_lowercase + string.digits + string.punctuation
    pieces += [c for c in chars]
    pieces += ["##" + c for c in string.ascii_lowercase + string.digits]
    for word in _TINY_WORDS:
        if word not in pieces:
            pieces.append(word)
    limit = TINY_VOCAB_SIZE - reserve_last
    if len(pieces) > limit:
        raise RuntimeError(f"built-in tiny vocabulary has {len(pieces)} pieces, more than {limit}")
    return {piece: idx for idx, piece in enumerate(pieces)}


def _wordpiece(vocab: dict[str, int], unk: str) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=unk, max_input_chars_per_word=64))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


@functools.cache
def _tiny_qformer_tokenizer() -> PreTrainedTokenizerFast:
    # [DEC] takes the last id, as in bert-base-uncased + [DEC] (30522 of 30523).
    vocab = _tiny_vocab(_SPECIALS_QFORMER, reserve_last=1)
    vocab["[DEC]"] = TINY_VOCAB_SIZE - 1
    tok = _wordpiece(vocab, "[UNK]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="[DEC]",
    )


@functools.cache
def _tiny_llm_tokenizer() -> PreTrainedTokenizerFast:
    vocab = _tiny_vocab(_SPECIALS_LLM, reserve_last=0)
    tok = _wordpiece(vocab, "<unk>")
    # "\n" ends a caption (the eos of BLIP-2's OPT captions): match it before the
    # whitespace splitting of the pre-tokenizer would drop it.
    tok.add_special_tokens([AddedToken("\n", normalized=False, special=True)])
    # Like OPT's tokenizer: every sequence starts with "</s>" (id 2).
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A $B", special_tokens=[("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="\n", pad_token="<pad>", unk_token="<unk>"
    )


_SPECIALS_T5 = ["<pad>", "</s>", "<unk>"]  # ids 0..2 as in T5's sentencepiece vocabulary


@functools.cache
def _tiny_t5_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny LLM tokenizer in T5's manner: pad 0 (the decoder's start), eos 1, unk 2, no bos,
    and every encoded text ends in ``</s>``."""
    tok = _wordpiece(_tiny_vocab(_SPECIALS_T5, reserve_last=0), "<unk>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


# tokenizer_config.json classes that are remote code, read from their sentencepiece model instead.
SENTENCEPIECE_TOKENIZER_CLASSES = ("InternLM2Tokenizer", "InternLM2TokenizerFast")
SENTENCEPIECE_MODEL = "tokenizer.model"


def _read_sentencepiece_model(path: Path) -> Any:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


def _check_sentencepiece_model(proto: Any, path: Path) -> None:
    """Refuse sentencepiece settings that the rebuilt tokenizer would not reproduce, naming them."""
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    problems = []
    if trainer.model_type != trainer.BPE:
        problems.append(f"model_type={trainer.ModelType.Name(trainer.model_type)} (BPE is read)")
    if normalizer.name != "identity" or normalizer.precompiled_charsmap:
        problems.append(f"normalizer {normalizer.name!r} (only 'identity' is read)")
    if normalizer.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces=true")
    if not normalizer.escape_whitespaces:
        problems.append("escape_whitespaces=false")
    if trainer.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix=true")
    if problems:
        raise ConfigError(f"{path}: sentencepiece settings not supported: {'; '.join(problems)}")


def _bpe_merges(proto: Any) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and BPE merges of a sentencepiece BPE model.

    sentencepiece merges the adjacent pair whose merged piece scores highest, and its BPE
    scores fall with the piece id; so a merge's rank is its merged piece's id (the splits
    of one piece in the order of their halves' ids).
    """
    normal = proto.SentencePiece.NORMAL
    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    mergeable = {piece.piece for piece in proto.pieces if piece.type == normal}
    merges: list[tuple[str, str]] = []
    for piece in proto.pieces:
        if piece.type != normal or len(piece.piece) < 2:
            continue
        text = piece.piece
        splits = [(text[:i], text[i:]) for i in range(1, len(text))]
        splits = [(a, b) for a, b in splits if a in mergeable and b in mergeable]
        merges.extend(sorted(splits, key=lambda pair: (vocab[pair[0]], vocab[pair[1]])))
    return vocab, merges


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def sentencepiece_bpe_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """A directory's sentencepiece BPE tokenizer (``tokenizer.model``), without its remote code.

    Encodes as sentencepiece (which InternLM2's tokenizer calls on each stretch of text
    between special tokens) does: spaces become "▁", a "▁" is prepended to each stretch when
    the model adds a dummy prefix, pieces merge in score order, unknown characters fall back
    to byte pieces. Control and user-defined pieces (``<s>``, ``</s>``, ``<|im_end|>`` ...)
    match whole, as special tokens. Special tokens and ``add_bos_token`` / ``add_eos_token``
    come from ``tokenizer_config.json`` (InternLM2's defaults: bos added, eos not).
    Normalisations other than identity are refused (:func:`_check_sentencepiece_model`).
    """
    directory = Path(directory)
    model_file = directory / SENTENCEPIECE_MODEL
    if not model_file.is_file():
        raise ConfigError(
            f"{directory} has no {SENTENCEPIECE_MODEL} (the sentencepiece model of its tokenizer)"
        )
    proto = _read_sentencepiece_model(model_file)
    _check_sentencepiece_model(proto, model_file)
    settings_file = directory / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    trainer, prefix = proto.trainer_spec, proto.normalizer_spec.add_dummy_prefix

    vocab, merges = _bpe_merges(proto)
    for index, token in settings.get("added_tokens_decoder", {}).items():
        text = _token_text(token)
        if vocab.get(text) != int(index):
            raise ConfigError(
                f"{settings_file}: added token {text!r} has id {index} but the sentencepiece model "
                f"{'gives it ' + str(vocab[text]) if text in vocab else 'lacks it'}"
            )
    unk = proto.pieces[trainer.unk_id].piece
    tok = Tokenizer(
        models.BPE(
            vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=trainer.byte_fallback
        )
    )
    escape = [normalizers.Replace(" ", "▁")]
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), *escape] if prefix else escape)
    tok.pre_tokenizer = None
    unescape = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence([*unescape, decoders.Strip(" ", 1, 0)] if prefix else unescape)
    whole = (proto.SentencePiece.CONTROL, proto.SentencePiece.USER_DEFINED, proto.SentencePiece.UNKNOWN)
    tok.add_special_tokens(
        [
            AddedToken(piece.piece, normalized=False, special=True)
            for piece in proto.pieces
            if piece.type in whole
        ]
    )

    def named(key: str, sp_id: int) -> str | None:
        configured = _token_text(settings.get(key))
        return configured if configured is not None else (proto.pieces[sp_id].piece if sp_id >= 0 else None)

    bos, eos = named("bos_token", trainer.bos_id), named("eos_token", trainer.eos_id)
    pad = named("pad_token", trainer.pad_id)
    add_bos, add_eos = settings.get("add_bos_token", True), settings.get("add_eos_token", False)
    if (add_bos and bos is None) or (add_eos and eos is None):
        raise ConfigError(
            f"{directory}: add_bos_token / add_eos_token ask for a token the model does not name"
        )
    template = [*([bos] if add_bos else []), "$A", *([eos] if add_eos else [])]
    tok.post_processor = processors.TemplateProcessing(
        single=" ".join(template),
        special_tokens=[(token, vocab[token]) for token in template if token != "$A"],
    )
    logger.info(
        "%s: sentencepiece BPE tokenizer, %d pieces (read without remote code)", directory, len(vocab)
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad
    )


def _tokenizer_class(directory: Path) -> str | None:
    settings = directory / "tokenizer_config.json"
    return json.loads(settings.read_text()).get("tokenizer_class") if settings.is_file() else None


def build_tokenizer(spec: str, kind: str, arch: str = "opt") -> PreTrainedTokenizerFast:
    """The tokenizer for ``kind`` ('qformer' or 'llm') from a local path or ``builtin:tiny``.

    ``arch``: the LLM's (``builtin:tiny`` for ``"t5"`` is laid out as T5's tokenizer is).
    Q-Former tokenizers get the ``[DEC]`` bos token BLIP-2 uses for ITG; LLaMA-family
    tokenizers without a pad token get ``[PAD]`` (Vicuna, as BLIP-2 does). Training pads
    on the right; generation code switches to left padding itself. A directory whose
    tokenizer class is remote code in transformers (InternLM2) is read from its
    sentencepiece model (:func:`sentencepiece_bpe_tokenizer`).
    """
    if kind not in ("qformer", "llm"):
        raise ValueError(f"kind must be 'qformer' or 'llm', got {kind!r}")
    if spec == BUILTIN_TINY:
        # A copy: callers may change their tokenizer (padding side, template) without
        # changing everyone else's.
        if kind == "qformer":
            tok = _tiny_qformer_tokenizer()
        else:
            tok = _tiny_t5_tokenizer() if arch == "t5" else _tiny_llm_tokenizer()
        tok = copy.deepcopy(tok)
        tok.padding_side = "right"
        return tok
    path = Path(spec)
    if not spec or not path.exists():
        raise ConfigError(
            f"{kind} tokenizer path {spec!r} does not exist; give a local Hugging Face tokenizer "
            f"directory (nothing is downloaded) or '{BUILTIN_TINY}'"
        )
    if path.is_dir() and _tokenizer_class(path) in SENTENCEPIECE_TOKENIZER_CLASSES:
        tok = sentencepiece_bpe_tokenizer(path)
    else:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    if kind == "qformer" and tok.bos_token != "[DEC]":
        tok.add_special_tokens({"bos_token": "[DEC]"})
    if kind == "llm" and tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "[PAD]"})
    tok.padding_side = "right"
    return tok


def holds_tokenizer(path: str | Path) -> bool:
    """Whether ``path`` is a directory with Hugging Face tokenizer files."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in TOKENIZER_FILES)


def llm_tokenizer_spec(cfg: Blip2Config) -> str:
    """Where the LLM tokenizer of ``cfg`` comes from.

    ``llm.tokenizer`` if set; else ``llm.weights`` (a Hugging Face LLM directory); else the
    last ``init_checkpoint`` directory that holds tokenizer files (a Hugging Face Blip2
    directory supplies the LLM too).
    """
    if cfg.llm is None:
        raise ConfigError(f"model.kind={cfg.kind!r} has no LLM tokenizer")
    if cfg.llm.tokenizer:
        return cfg.llm.tokenizer
    if cfg.llm.weights:
        return cfg.llm.weights
    sources = [p.strip() for p in cfg.init_checkpoint.split(",") if p.strip()]
    with_tokenizer = [p for p in sources if holds_tokenizer(p)]
    if with_tokenizer:
        return with_tokenizer[-1]
    raise ConfigError(
        "no LLM tokenizer: set model.llm.tokenizer (a local tokenizer directory or 'builtin:tiny') or "
        "model.llm.weights (a Hugging Face LLM directory with tokenizer files)"
    )
