"""Tokenizers for the Q-Former (BERT) and the LLM, from a local path or built in.

Real jobs point ``qformer.tokenizer`` / ``llm.tokenizer`` at local Hugging Face tokenizer
directories (nothing is fetched from a hub). The spec ``"builtin:tiny"`` builds small
WordPiece tokenizers in memory, deterministically, for the tiny CPU flavour and the tests:
whole words for the vocabulary of captions and questions, single characters as the
fallback so that any ASCII text still tokenizes.
"""

from __future__ import annotations

import functools
import logging
import string
from pathlib import Path

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


def build_tokenizer(spec: str, kind: str, arch: str = "opt") -> PreTrainedTokenizerFast:
    """The tokenizer for ``kind`` ('qformer' or 'llm') from a local path or ``builtin:tiny``.

    Q-Former tokenizers get the ``[DEC]`` bos token BLIP-2 uses for ITG; LLaMA-family
    tokenizers without a pad token get ``[PAD]`` (Vicuna, as BLIP-2 does). Training pads
    on the right; generation code switches to left padding itself.
    """
    if kind not in ("qformer", "llm"):
        raise ValueError(f"kind must be 'qformer' or 'llm', got {kind!r}")
    if spec == BUILTIN_TINY:
        tok = _tiny_qformer_tokenizer() if kind == "qformer" else _tiny_llm_tokenizer()
        tok.padding_side = "right"
        return tok
    path = Path(spec)
    if not spec or not path.exists():
        raise ConfigError(
            f"{kind} tokenizer path {spec!r} does not exist; give a local Hugging Face tokenizer "
            f"directory (nothing is downloaded) or '{BUILTIN_TINY}'"
        )
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
