"""Model configuration: one dataclass per component, composed into :class:`Blip2Config`.

Every field has a default (the defaults describe the real BLIP-2 sizes), one comment line
says what it is, and ``__post_init__`` validates it with an error naming the key.
Named flavours (``tiny``, ``blip2_opt2.7b`` ...) live in :data:`FLAVOURS`; job-level
configs (data, training) compose these in ``blip2_megatron.config``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from blip2_megatron.config.base import ConfigError, check_choice, check_positive, from_dict, merge_dicts

DTYPES = ("fp32", "fp16", "bf16")
# Checkpoint layouts (Hugging Face model_type): "opt" and "t5" are their own arch, the rest are
# LLaMA maths (arch "llama") with their own biases, attention window, RoPE scaling and tensor names.
LLM_FAMILIES = ("opt", "llama", "qwen2", "mistral", "internlm2", "t5")
LLM_ARCHS = ("opt", "llama", "t5")
# Activations of the FFN, named as transformers names them: OPT's ReLU, LLaMA's SiLU (gated),
# T5 v1.1's gated GELU in its tanh form ("gelu_new", transformers' reading of "gated-gelu") or
# exact ("gelu", which LAVIS forces for FlanT5).
LLM_ACTIVATIONS = ("relu", "silu", "gelu_new", "gelu")
ARCH_ACTIVATION = {"opt": "relu", "llama": "silu", "t5": "gelu_new"}
# RoPE variants modelled, named as in transformers' rope_parameters. "dynamic" (NTK) equals
# "default" up to max_position_embeddings and is refused beyond (see models/llm.py).
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
# Weight quantization of a frozen LLM's linear layers through bitsandbytes (models/quantize.py).
QUANTIZE_MODES = ("none", "int8", "nf4")


@dataclass
class VisionConfig:
    """The image encoder: EVA ViT-g/14 (BLIP-2's default) or CLIP ViT-L/14."""

    arch: str = "eva_vit_g"  # "eva_vit_g" or "clip_vit_l"
    image_size: int = 224  # input resolution in pixels (364 for COCO caption fine-tuning)
    patch_size: int = 14  # square patch size of the patch-embedding convolution
    hidden_size: int = 1408  # transformer width
    num_layers: int = 39  # blocks used (EVA-CLIP has 40; BLIP-2 drops the last one)
    num_heads: int = 16  # attention heads
    intermediate_size: int = 6144  # MLP hidden size (mlp_ratio 4.3637 for ViT-g)
    layer_norm_eps: float = 1e-6  # epsilon of the blocks' LayerNorms
    ln_vision_eps: float = 1e-5  # epsilon of ln_vision, applied to the output tokens in fp32
    qkv_bias: bool = True  # q and v biases (k has none), stored as one qkv.bias like HF
    pre_layernorm: bool = False  # LayerNorm before the blocks (CLIP ViT-L has one)
    hidden_act: str = "gelu"  # "gelu" (EVA) or "quick_gelu" (CLIP)
    drop_path_rate: float = 0.0  # stochastic depth, increasing linearly with depth
    grad_checkpointing: bool = False  # activation checkpointing per block (caption FT)
    freeze: bool = True  # frozen: eval mode, no grads, not in training checkpoints
    frozen_dtype: str = "fp16"  # dtype of a frozen ViT's Linear/Conv weights on GPU/NPU

    def __post_init__(self) -> None:
        check_choice("vision.arch", self.arch, ("eva_vit_g", "clip_vit_l"))
        check_choice("vision.hidden_act", self.hidden_act, ("gelu", "quick_gelu"))
        check_choice("vision.frozen_dtype", self.frozen_dtype, DTYPES)
        for name in (
            "image_size",
            "patch_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
        ):
            check_positive(f"vision.{name}", getattr(self, name))
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision.image_size={self.image_size} must be a multiple of vision.patch_size={self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision.hidden_size={self.hidden_size} must divide by vision.num_heads={self.num_heads}"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"vision.drop_path_rate={self.drop_path_rate} must be in [0, 1)")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """Tokens out of the encoder: patches plus CLS (257 at 224 px, 677 at 364 px)."""
        return self.num_patches + 1


@dataclass
class QFormerConfig:
    """The Q-Former: a BERT-base encoder with learned queries and periodic cross-attention."""

    hidden_size: int = 768  # width
    num_layers: int = 12  # transformer layers
    num_heads: int = 12  # attention heads
    intermediate_size: int = 3072  # FFN hidden size (text and query FFNs)
    vocab_size: int = 30523  # bert-base-uncased plus the [DEC] bos token
    max_position_embeddings: int = 512  # learned absolute positions for text tokens
    cross_attention_frequency: int = 2  # layers 0, f, 2f, ... cross-attend to the image
    encoder_hidden_size: int = 1408  # image feature width (set from vision.hidden_size)
    num_query_tokens: int = 32  # learned query tokens
    embed_dim: int = 256  # ITC projection width (stage 1)
    hidden_dropout_prob: float = 0.1  # dropout after attention/FFN outputs and embeddings
    attention_dropout_prob: float = 0.1  # dropout on attention probabilities
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon (BERT)
    initializer_range: float = (
        0.02  # std of the normal initial weights and queries (BERT: 0.02, tuned for width 768)
    )
    pad_token_id: int = 0  # [PAD]
    bos_token_id: int = 30522  # [DEC], used in place of [CLS] for ITG
    max_txt_len: int = 32  # text tokens per caption for stage-1 losses
    tokenizer: str = "bert-base-uncased"  # local path of a BERT tokenizer, or "builtin:tiny"
    grad_checkpointing: bool = False  # activation checkpointing per layer

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size"):
            check_positive(f"qformer.{name}", getattr(self, name))
        check_positive("qformer.cross_attention_frequency", self.cross_attention_frequency)
        check_positive("qformer.num_query_tokens", self.num_query_tokens)
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"qformer.hidden_size={self.hidden_size} must divide by qformer.num_heads={self.num_heads}"
            )
        if not 0 <= self.bos_token_id < self.vocab_size:
            raise ConfigError(f"qformer.bos_token_id={self.bos_token_id} is outside the vocabulary")

    def has_cross_attention(self, layer_idx: int) -> bool:
        return layer_idx % self.cross_attention_frequency == 0


@dataclass
class LLMConfig:
    """The language model, run as tensor- and pipeline-parallel layers.

    Decoder-only (OPT, the LLaMA family) or encoder-decoder (T5 / FlanT5: ``num_layers``
    encoder layers, ``num_decoder_layers`` decoder layers, relative position buckets).
    """

    arch: str = "opt"  # "opt" (learned positions, ReLU, LayerNorm), "llama" (RoPE, RMSNorm, SwiGLU), "t5" (encoder-decoder)
    family: str = ""  # checkpoint layout and exported config: one of LLM_FAMILIES ("" = the arch's own)
    vocab_size: int = 50272  # embedding rows (HF config vocab_size)
    hidden_size: int = 2560  # model width
    num_layers: int = 32  # decoder layers
    num_heads: int = 32  # attention heads
    head_dim_override: int = 0  # width of one head (T5's d_kv); 0 = hidden_size / num_heads
    num_kv_heads: int | None = None  # key/value heads for grouped-query attention (None = num_heads)
    intermediate_size: int = 10240  # FFN hidden size
    hidden_act: str = ""  # FFN activation, one of LLM_ACTIVATIONS ("" = the arch's own: relu, silu, gelu_new)
    num_decoder_layers: int = 0  # t5: decoder layers (0 = num_layers, which counts the encoder's)
    relative_attention_num_buckets: int = 32  # t5: relative position buckets (half exact, half log-spaced)
    relative_attention_max_distance: int = 128  # t5: distance at which the last bucket starts
    max_position_embeddings: int = 2048  # longest sequence
    norm_eps: float = 1e-5  # LayerNorm / RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base (llama)
    rope_type: str = "default"  # RoPE scaling as transformers names it: one of ROPE_TYPES (llama)
    rope_factor: float = 1.0  # RoPE scaling factor (linear, dynamic, llama3)
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original / this are divided by rope_factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original / this are kept
    rope_original_max_positions: int = 8192  # llama3: the context length RoPE was pre-trained at
    sliding_window: int = 0  # a token attends to this many positions, itself included (Mistral; 0 = all)
    tie_word_embeddings: bool = True  # lm_head shares the token embedding (OPT)
    attention_bias: bool = True  # q/k/v/o biases (OPT: true, also on fc1/fc2; LLaMA: false; Qwen2: true)
    o_proj_bias: bool | None = None  # attention output bias (None = attention_bias; Qwen2: false)
    bos_token_id: int | None = 2  # OPT: 2 ("</s>"), LLaMA: 1; None where the model has none (Qwen2)
    eos_token_id: int = 50118  # token that ends a BLIP-2 caption (OPT: "\n"); LLaMA: 2; T5: 1 ("</s>")
    pad_token_id: int = 1  # padding id (T5: 0, also the decoder's start token)
    tokenizer: str = ""  # local path of the tokenizer (defaults to weights), or "builtin:tiny"
    weights: str = ""  # local Hugging Face directory with the pretrained weights ("" = random init)
    tp: int = 1  # tensor-parallel degree (divides num_heads and num_kv_heads)
    pp: int = 1  # pipeline-parallel degree (stages over the decoder layers)
    freeze: bool = True  # frozen LLM: no grads, no optimizer state, not checkpointed
    dtype: str = "auto"  # frozen LLM weights on GPU/NPU: "auto" (train.precision; fp16 outside a job), fp32, bf16, fp16 (fp32 on CPU)
    grad_checkpointing: bool = False  # activation checkpointing per decoder layer
    quantize: str = "none"  # frozen LLM's linear layers: "none", "int8" (LLM.int8, outliers > 6), "nf4" (4-bit, double quantized)

    @property
    def weight_dtype_name(self) -> str:
        """The dtype name frozen weights are kept in: ``dtype``, with "auto" unresolved (no job) as fp16.

        A job resolves "auto" to its ``train.precision``; a model loaded for inference
        alone keeps a frozen LLM in half precision, as LAVIS does (T5 in bf16: it
        overflows in fp16).
        """
        if self.dtype != "auto":
            return self.dtype
        return "bf16" if self.is_encoder_decoder else "fp16"  # FlanT5 overflows in fp16

    def __post_init__(self) -> None:
        check_choice("llm.arch", self.arch, LLM_ARCHS)
        check_choice("llm.family", self.family, ("", *LLM_FAMILIES))
        own_arch = self.hf_family if self.hf_family in ("opt", "t5") else "llama"
        if own_arch != self.arch:
            raise ConfigError(
                f"llm.family={self.family!r} does not go with llm.arch={self.arch!r} (families 'opt' and 't5' "
                f"are their own arch; {[f for f in LLM_FAMILIES if f not in ('opt', 't5')]} are arch 'llama')"
            )
        check_choice("llm.hidden_act", self.hidden_act, ("", *LLM_ACTIVATIONS))
        if self.arch == "t5":
            self._check_t5()
        check_choice("llm.dtype", self.dtype, ("auto", *DTYPES))
        check_choice("llm.rope_type", self.rope_type, ROPE_TYPES)
        check_positive("llm.rope_theta", self.rope_theta)
        check_positive("llm.rope_factor", self.rope_factor)
        check_positive("llm.rope_original_max_positions", self.rope_original_max_positions)
        if self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ConfigError(
                f"llm.rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                f"llm.rope_low_freq_factor={self.rope_low_freq_factor}"
            )
        check_positive("llm.sliding_window", self.sliding_window, allow_zero=True)
        if self.arch == "opt":
            # OPT has learned positions, full attention and one bias switch for every projection.
            if self.rope_type != "default":
                raise ConfigError(
                    f"llm.rope_type={self.rope_type!r} needs llm.arch='llama' (OPT has no RoPE)"
                )
            if self.sliding_window:
                raise ConfigError(f"llm.sliding_window={self.sliding_window} needs llm.arch='llama'")
            if self.o_proj_bias not in (None, self.attention_bias):
                raise ConfigError(
                    f"llm.o_proj_bias={self.o_proj_bias} differs from llm.attention_bias={self.attention_bias}: "
                    "OPT has one bias switch (enable_bias)"
                )
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "tp", "pp"):
            check_positive(f"llm.{name}", getattr(self, name))
        check_positive("llm.head_dim_override", self.head_dim_override, allow_zero=True)
        if self.hidden_size % self.num_heads and not self.head_dim_override:
            raise ConfigError(
                f"llm.hidden_size={self.hidden_size} must divide by llm.num_heads={self.num_heads} "
                "(or set llm.head_dim_override)"
            )
        if self.num_heads % self.kv_heads:
            raise ConfigError(
                f"llm.num_heads={self.num_heads} must divide by llm.num_kv_heads={self.kv_heads}"
            )
        if self.num_heads % self.tp or self.kv_heads % self.tp:
            raise ConfigError(
                f"llm.tp={self.tp} must divide llm.num_heads={self.num_heads} and the key/value heads "
                f"({self.kv_heads}); allowed tp values: "
                f"{[d for d in range(1, self.kv_heads + 1) if self.kv_heads % d == 0 and self.num_heads % d == 0]}"
            )
        if self.pp > self.num_layers:
            raise ConfigError(f"llm.pp={self.pp} exceeds llm.num_layers={self.num_layers}")
        self._check_quantize()

    def _check_quantize(self) -> None:
        """Quantized weights are read-only: only a frozen LLM can be quantized."""
        check_choice("llm.quantize", self.quantize, QUANTIZE_MODES)
        if self.quantize == "none":
            return
        if not self.freeze:
            raise ConfigError(
                f"llm.quantize={self.quantize} needs a frozen LLM (llm.freeze=true): bitsandbytes' int8 / 4-bit "
                "weights have no gradient and no optimizer updates them; train the LLM in bf16/fp32, or keep it "
                "frozen (the Q-Former and projection still train through it)"
            )

    def _check_t5(self) -> None:
        """T5 v1.1 / FlanT5 as modelled: gated FFN without biases, relative positions, untied head."""
        check_positive("llm.num_decoder_layers", self.num_decoder_layers, allow_zero=True)
        check_positive("llm.relative_attention_num_buckets", self.relative_attention_num_buckets)
        check_positive("llm.relative_attention_max_distance", self.relative_attention_max_distance)
        if self.relative_attention_num_buckets < 4:
            raise ConfigError(
                f"llm.relative_attention_num_buckets={self.relative_attention_num_buckets} must be >= 4 "
                "(half for each direction in the encoder, half of those exact)"
            )
        unmodelled = {
            "llm.tie_word_embeddings": self.tie_word_embeddings,  # T5 v1.0: head scaled by d_model**-0.5
            "llm.attention_bias": self.attention_bias,
            "llm.o_proj_bias": bool(self.o_proj_bias),
            "llm.num_kv_heads": self.num_kv_heads not in (None, self.num_heads),
            "llm.sliding_window": bool(self.sliding_window),
            "llm.rope_type": self.rope_type != "default",
        }
        for key, value in unmodelled.items():
            if value:
                raise ConfigError(
                    f"{key}={value!r} is not part of T5 v1.1 / FlanT5 as modelled (llm.arch='t5': gated FFN, "
                    "no biases, relative positions, untied head); T5 v1.0 checkpoints are not supported"
                )
        if self.dtype == "fp16":
            raise ConfigError(
                "llm.dtype=fp16: FlanT5 overflows in fp16 (trained in bf16, its activations exceed fp16's "
                "range) and no policy here keeps it finite; use bf16 or fp32"
            )
        if self.activation == "relu":
            raise ConfigError("llm.hidden_act='relu' (T5 v1.0's FFN) is not supported; T5 v1.1 gates a GELU")
        if self.pp > 1:
            raise ConfigError(
                f"llm.pp={self.pp}: an encoder-decoder LLM (llm.arch='t5') is not pipelined. Every decoder "
                "layer reads the encoder's output, so it would travel through every stage beside the hidden "
                "states; Megatron-LM dropped pipelining for its T5 for that reason. Use tensor parallelism "
                "(llm.tp) and data parallelism"
            )

    @property
    def is_encoder_decoder(self) -> bool:
        return self.arch == "t5"

    @property
    def decoder_layers(self) -> int:
        """Layers of the decoder (T5: ``num_decoder_layers`` or ``num_layers``; else ``num_layers``)."""
        return self.num_decoder_layers or self.num_layers

    @property
    def activation(self) -> str:
        """The FFN's activation: ``hidden_act``, or the arch's own."""
        return self.hidden_act or ARCH_ACTIVATION[self.arch]

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def hf_family(self) -> str:
        """The checkpoint layout: ``family``, or the arch's own layout when unset."""
        return self.family or self.arch

    @property
    def has_o_proj_bias(self) -> bool:
        return self.attention_bias if self.o_proj_bias is None else self.o_proj_bias

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_heads

    @property
    def attention_width(self) -> int:
        """Width of the concatenated heads (q/k/v outputs; T5 may differ from hidden_size)."""
        return self.num_heads * self.head_dim


#: Where the image's slots go in a MiniGPT-4 instruction or template.
IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_ENCODERS = ("qformer", "patches")


@dataclass
class Blip2Config:
    """A whole BLIP-2 model: vision encoder + Q-Former (+ projection + LLM).

    ``image_encoder="patches"`` replaces the Q-Former by the ViT's own patch tokens (the
    MiniGPT-4 LLaMA-2 / MiniGPT-v2 design): CLS dropped, ``patch_group`` consecutive
    tokens concatenated into one LLM slot, then the projection.
    """

    kind: str = "llm"  # "stage1" (Q-Former pretraining), "llm" (stage 2 / caption FT), "minigpt4"
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLMConfig | None = field(default_factory=LLMConfig)
    image_encoder: str = "qformer"  # "qformer" (query outputs) or "patches" (ViT patch tokens)
    patch_group: int = 4  # patches: consecutive patch tokens per LLM slot (MiniGPT-v2: 4)
    freeze_qformer: bool = False  # MiniGPT-4: Q-Former and queries frozen, only the projection trains
    prompt: str = ""  # text before the caption (MiniGPT-4: default instruction); label -100
    max_txt_len: int = 32  # text tokens: prompt + caption (MiniGPT-4: answer + end_sym, 160 in stage 2)
    end_sym: str = "\n"  # appended to each target (OPT: "\n"; MiniGPT-4: "###"; LLaMA-2: "</s>")
    prompt_template: str = ""  # MiniGPT-4: "###Human: {} ###Assistant: "; "" = no prompt (stage 1)
    prompt_file: str = ""  # MiniGPT-4: instructions drawn per training sample (shipped name or path)
    init_checkpoint: str = ""  # initial weights: a HF Blip2 directory or LAVIS .pth files, comma-separated
    prefix_lm: bool = (
        False  # encoder-decoder LLM: cut each caption into encoder prefix + decoder target (stage 2)
    )
    # With llm.tp > 1 each TP rank encodes 1/TP of the images (parallel/tp_split.py); false:
    # every TP rank encodes all of them (the replicated layout, kept for comparison).
    tp_split_images: bool = True
    # InstructBLIP: the instruction (each sample's prompt, BERT tokens up to qformer.max_txt_len)
    # runs through the Q-Former beside the queries; the Q-Former keeps its text embeddings and FFN.
    instruction_aware: bool = False

    def __post_init__(self) -> None:
        check_choice("model.kind", self.kind, ("stage1", "llm", "minigpt4"))
        check_choice("model.image_encoder", self.image_encoder, IMAGE_ENCODERS)
        # The Q-Former's cross-attention reads the vision tokens: keep the widths wired together.
        self.qformer.encoder_hidden_size = self.vision.hidden_size
        if self.kind == "stage1":
            self.llm = None
        elif self.llm is None:
            raise ConfigError(f"model.llm is required for model.kind={self.kind!r}")
        if self.image_encoder == "patches":
            self._check_patches()
        if self.llm is not None and self.llm.is_encoder_decoder:
            self._check_encoder_decoder()
        elif self.prefix_lm:
            raise ConfigError(
                "model.prefix_lm=true cuts captions between an encoder and a decoder; it needs an "
                "encoder-decoder LLM (llm.arch='t5')"
            )
        if self.kind == "minigpt4":
            self._check_minigpt4_prompt()
        elif self.prompt_template or self.prompt_file:
            raise ConfigError(
                f"model.prompt_template / model.prompt_file lay out MiniGPT-4 conversations; "
                f"model.kind={self.kind!r} uses model.prompt only"
            )
        check_positive("model.max_txt_len", self.max_txt_len)
        if self.instruction_aware:
            self._check_instruction_aware()

    def _check_instruction_aware(self) -> None:
        if self.kind != "llm" or self.image_encoder != "qformer":
            raise ConfigError(
                f"model.instruction_aware=true (InstructBLIP) feeds the instruction to the Q-Former beside its "
                f"queries; it needs model.kind='llm' and model.image_encoder='qformer', not "
                f"kind={self.kind!r}, image_encoder={self.image_encoder!r}"
            )
        if self.llm.pp > 1:
            raise ConfigError(
                f"llm.pp={self.llm.pp} with model.instruction_aware=true: the pipeline stages exchange "
                "(image, input_ids, attention_mask, image_slots), which does not carry the instruction's "
                "Q-Former tokens (qformer_input_ids / qformer_attention_mask); use llm.pp=1 with tensor "
                "and data parallelism"
            )
        check_positive("qformer.max_txt_len", self.qformer.max_txt_len)
        if self.qformer.max_txt_len > self.qformer.max_position_embeddings:
            raise ConfigError(
                f"qformer.max_txt_len={self.qformer.max_txt_len} (the instruction's Q-Former tokens) exceeds "
                f"qformer.max_position_embeddings={self.qformer.max_position_embeddings}"
            )

    def _check_patches(self) -> None:
        if self.kind == "stage1":
            raise ConfigError(
                "model.image_encoder='patches' has no Q-Former to pretrain; stage 1 needs 'qformer'"
            )
        if self.freeze_qformer:
            raise ConfigError("model.freeze_qformer=true, but model.image_encoder='patches' has no Q-Former")
        check_positive("model.patch_group", self.patch_group)
        if self.vision.num_patches % self.patch_group:
            raise ConfigError(
                f"model.patch_group={self.patch_group} must divide the {self.vision.num_patches} patches of "
                f"vision.image_size={self.vision.image_size} / vision.patch_size={self.vision.patch_size}"
            )

    def _check_encoder_decoder(self) -> None:
        if self.kind == "minigpt4":
            raise ConfigError(
                "model.kind='minigpt4' lays out a conversation for a decoder-only LLM; llm.arch='t5' takes "
                "model.kind='llm' (image and prompt into the encoder, the answer from the decoder)"
            )
        if self.end_sym:
            raise ConfigError(
                f"model.end_sym={self.end_sym!r}: an encoder-decoder LLM's texts end as its tokenizer ends "
                "them (T5: '</s>'); set model.end_sym=''"
            )

    def _check_minigpt4_prompt(self) -> None:
        template = self.prompt_template
        if template and template.count("{}") != 1:
            raise ConfigError(
                f"model.prompt_template={template!r} must hold one '{{}}' where the instruction goes "
                "(or be '' for no prompt: the image, then the caption)"
            )
        images = template.count(IMAGE_PLACEHOLDER) + self.prompt.count(IMAGE_PLACEHOLDER)
        if images > 1:
            raise ConfigError(
                f"model.prompt_template={template!r} and model.prompt={self.prompt!r} hold {IMAGE_PLACEHOLDER} "
                f"{images} times; the image has one place"
            )

    @property
    def num_image_slots(self) -> int:
        """LLM input positions one image fills: the queries, or the grouped patch tokens."""
        if self.image_encoder == "patches":
            return self.vision.num_patches // self.patch_group
        return self.qformer.num_query_tokens

    @property
    def image_feature_size(self) -> int:
        """Width of what the projection reads: the Q-Former width, or patch_group x the ViT width."""
        if self.image_encoder == "patches":
            return self.patch_group * self.vision.hidden_size
        return self.qformer.hidden_size


_TINY_VISION = dict(
    image_size=32,
    patch_size=8,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    intermediate_size=256,
    frozen_dtype="fp32",
)
_TINY_QFORMER = dict(
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    intermediate_size=256,
    vocab_size=512,
    bos_token_id=511,
    max_position_embeddings=64,
    cross_attention_frequency=1,
    num_query_tokens=8,
    embed_dim=32,
    tokenizer="builtin:tiny",
    # BERT's 0.02 initial std and 0.1 dropout are tuned for width 768: at width 64 the image
    # reaches the queries at ~3% of their norm and stage 1's ITC / ITM stay at chance
    # (measured: ITC ln(B), ITM 0.637 after 900 steps; with these, 0.92 and 0.47).
    initializer_range=0.125,
    hidden_dropout_prob=0.0,
    attention_dropout_prob=0.0,
)
# What every tiny LLM shares whatever its family: sizes, the built-in tokenizer (ids <s>=0
# <pad>=1 </s>=2 "\n"=3 <unk>=4; it starts each text with "</s>") and fp32 weights.
_TINY_LLM_SIZES = dict(
    vocab_size=512,
    hidden_size=64,
    num_layers=4,
    num_heads=4,
    intermediate_size=256,
    max_position_embeddings=128,
    tokenizer="builtin:tiny",
    dtype="fp32",
)
_TINY_LLM = dict(_TINY_LLM_SIZES, arch="opt", bos_token_id=2, eos_token_id=3, pad_token_id=1)
_EVA_VIT_G: dict[str, Any] = {}  # VisionConfig defaults are EVA ViT-g/14
_OPT_2_7B = dict(arch="opt", hidden_size=2560, num_layers=32, num_heads=32, intermediate_size=10240)
_OPT_6_7B = dict(arch="opt", hidden_size=4096, num_layers=32, num_heads=32, intermediate_size=16384)
_LLAMA_COMMON = dict(
    arch="llama",
    vocab_size=32001,  # Vicuna adds "[PAD]" to LLaMA's 32000
    tie_word_embeddings=False,
    attention_bias=False,
    norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=32000,
)
_VICUNA_7B = dict(_LLAMA_COMMON, hidden_size=4096, num_layers=32, num_heads=32, intermediate_size=11008)
_VICUNA_13B = dict(_LLAMA_COMMON, hidden_size=5120, num_layers=40, num_heads=40, intermediate_size=13824)
# InternLM2: LLaMA maths (GQA, RMSNorm, SwiGLU, untied head) under its own tensor names with a
# fused attention.wqkv; its configs ask for dynamic NTK RoPE, which equals plain RoPE within
# max_position_embeddings (32768), far beyond a BLIP-2 sequence.
_INTERNLM2_COMMON = dict(
    arch="llama",
    family="internlm2",
    vocab_size=92544,
    max_position_embeddings=32768,
    norm_eps=1e-5,
    rope_theta=1_000_000.0,
    rope_type="dynamic",
    rope_factor=2.0,
    tie_word_embeddings=False,
    attention_bias=False,
    bos_token_id=1,  # "<s>"
    eos_token_id=2,  # "</s>"
    pad_token_id=2,  # InternLM2's tokenizer pads with "</s>"
)
_INTERNLM2_1_8B = dict(
    _INTERNLM2_COMMON, hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=8, intermediate_size=8192
)
# The tiny LLM with InternLM2's settings (GQA, RoPE base, eps, dynamic RoPE, untied head) and the
# built-in tokenizer's ids ("</s>" = 2 ends a text, as InternLM2's eos does).
_TINY_INTERNLM2 = dict(
    _INTERNLM2_COMMON,
    vocab_size=512,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=256,
    max_position_embeddings=128,
    bos_token_id=2,
    eos_token_id=2,
    pad_token_id=1,
    tokenizer="builtin:tiny",
    dtype="fp32",
)

_LLAMA2_CHAT_7B = dict(
    arch="llama",
    vocab_size=32000,
    hidden_size=4096,
    num_layers=32,
    num_heads=32,
    intermediate_size=11008,
    max_position_embeddings=4096,
    norm_eps=1e-5,
    tie_word_embeddings=False,
    attention_bias=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,  # LLaMA-2 has no pad token: padding is never attended nor labelled, <unk> fills it
)
# A tiny LLaMA whose eos is the built-in tokenizer's "</s>" (id 2), LLaMA-2's end symbol.
_TINY_LLAMA = dict(_TINY_LLM, arch="llama", tie_word_embeddings=False, attention_bias=False, eos_token_id=2)
# Qwen2: LLaMA maths with q/k/v biases but none on o_proj, GQA, RoPE base 1e6, untied head.
# Its tokenizer adds no bos; "<|endoftext|>" ends a text and pads.
_QWEN2_COMMON = dict(
    arch="llama",
    family="qwen2",
    max_position_embeddings=32768,
    norm_eps=1e-6,
    rope_theta=1_000_000.0,
    tie_word_embeddings=False,
    attention_bias=True,
    o_proj_bias=False,
    bos_token_id=None,
    eos_token_id=151643,  # "<|endoftext|>"
    pad_token_id=151643,
)
_QWEN2_7B = dict(
    _QWEN2_COMMON,
    vocab_size=152064,
    hidden_size=3584,
    num_layers=28,
    num_heads=28,
    num_kv_heads=4,
    intermediate_size=18944,
)
# Mistral: LLaMA maths with GQA and sliding-window attention (each token sees the last 4096).
_MISTRAL_COMMON = dict(
    arch="llama",
    family="mistral",
    max_position_embeddings=32768,
    norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    attention_bias=False,
    bos_token_id=1,  # "<s>"
    eos_token_id=2,  # "</s>"
    pad_token_id=0,  # no pad token, as LLaMA-2: padding is never attended nor labelled, <unk> fills it
)
_MISTRAL_7B = dict(
    _MISTRAL_COMMON,
    vocab_size=32000,
    hidden_size=4096,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    intermediate_size=14336,
    sliding_window=4096,
)
# Tiny LLMs of those families: their own flags (biases, GQA, RoPE base, window, untied head)
# at tiny size, with the built-in tokenizer's "</s>" (id 2) as their eos. Mistral's window of
# 16 is shorter than a tiny caption sequence (8 query slots + up to 32 text tokens), so it
# hides keys in training and generation alike.
_TINY_QWEN2 = dict(_QWEN2_COMMON, **_TINY_LLM_SIZES, num_kv_heads=2, eos_token_id=2, pad_token_id=1)
_TINY_MISTRAL = dict(
    _MISTRAL_COMMON,
    **_TINY_LLM_SIZES,
    num_kv_heads=2,
    sliding_window=16,
    bos_token_id=2,
    eos_token_id=2,
    pad_token_id=1,
)
_MINIGPT4_INSTRUCTION = "<Img><ImageHere></Img> Describe this image in detail."
_MINIGPT4_LLAMA2 = dict(
    kind="minigpt4",
    image_encoder="patches",
    patch_group=4,
    prompt=_MINIGPT4_INSTRUCTION,
    max_txt_len=160,
    end_sym="</s>",
    prompt_template="[INST] {} [/INST] ",
)

# FlanT5 (T5 v1.1): gated GELU, relative positions, untied head; sentencepiece ids pad 0 (also
# the decoder's start), eos 1. LAVIS runs FlanT5's FFN with the exact GELU (its config says
# gated-gelu, which transformers reads as the tanh form) and computes T5 in bf16.
_FLANT5_COMMON = dict(
    arch="t5",
    family="t5",
    vocab_size=32128,
    num_layers=24,
    num_decoder_layers=24,
    head_dim_override=64,
    hidden_act="gelu",
    max_position_embeddings=512,
    norm_eps=1e-6,
    tie_word_embeddings=False,
    attention_bias=False,
    bos_token_id=None,
    eos_token_id=1,
    pad_token_id=0,
    dtype="bf16",
)
_FLANT5_XL = dict(_FLANT5_COMMON, hidden_size=2048, num_heads=32, intermediate_size=5120)
_FLANT5_XXL = dict(_FLANT5_COMMON, hidden_size=4096, num_heads=64, intermediate_size=10240)
_TINY_T5 = dict(
    _FLANT5_COMMON,
    vocab_size=512,
    hidden_size=64,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    head_dim_override=16,
    intermediate_size=128,
    max_position_embeddings=128,
    tokenizer="builtin:tiny",
    dtype="fp32",
)
_BLIP2_T5 = dict(kind="llm", prompt="", end_sym="")
# InstructBLIP (LAVIS blip2_vicuna_instruct / blip2_t5_instruct): the Q-Former reads each sample's
# instruction (its prompt) beside the queries, in BERT tokens up to 128; the LLM text (instruction +
# target) is bounded by 256 tokens. Vicuna's tokenizer gains "[PAD]", so its vocabulary is 32001.
_INSTRUCTBLIP = dict(
    kind="llm", instruction_aware=True, prompt="", max_txt_len=256, qformer=dict(max_txt_len=128)
)
_INSTRUCTBLIP_VICUNA = dict(_INSTRUCTBLIP, vision=_EVA_VIT_G, end_sym="</s>")
_TINY_INSTRUCTBLIP = dict(_INSTRUCTBLIP, vision=_TINY_VISION, qformer=dict(_TINY_QFORMER, max_txt_len=64))

# Named model flavours. Each is a partial Blip2Config dict; the defaults fill the rest.
FLAVOURS: dict[str, dict[str, Any]] = {
    "tiny": dict(kind="llm", vision=_TINY_VISION, qformer=_TINY_QFORMER, llm=_TINY_LLM, prompt="a photo of"),
    "tiny_stage1": dict(kind="stage1", vision=_TINY_VISION, qformer=_TINY_QFORMER),
    "blip2_stage1_vitg": dict(kind="stage1", vision=_EVA_VIT_G),
    "blip2_opt2.7b": dict(kind="llm", vision=_EVA_VIT_G, llm=_OPT_2_7B, prompt="a photo of"),
    "blip2_opt6.7b": dict(kind="llm", vision=_EVA_VIT_G, llm=_OPT_6_7B, prompt="a photo of"),
    "blip2_vicuna7b": dict(kind="llm", vision=_EVA_VIT_G, llm=_VICUNA_7B, prompt="", end_sym="</s>"),
    "blip2_vicuna13b": dict(kind="llm", vision=_EVA_VIT_G, llm=_VICUNA_13B, prompt="", end_sym="</s>"),
    "tiny_internlm2": dict(
        kind="llm", vision=_TINY_VISION, qformer=_TINY_QFORMER, llm=_TINY_INTERNLM2, prompt="", end_sym="</s>"
    ),
    "blip2_internlm2_1.8b": dict(
        kind="llm", vision=_EVA_VIT_G, llm=_INTERNLM2_1_8B, prompt="", end_sym="</s>"
    ),
    # One tiny flavour per decoder family, so that a shipped job trains at tiny size as its own
    # family ("tiny" is OPT's): tests/journeys.py picks them by llm.family.
    "tiny_llama": dict(
        kind="llm", vision=_TINY_VISION, qformer=_TINY_QFORMER, llm=_TINY_LLAMA, prompt="", end_sym="</s>"
    ),
    "tiny_qwen2": dict(
        kind="llm", vision=_TINY_VISION, qformer=_TINY_QFORMER, llm=_TINY_QWEN2, prompt="", end_sym="</s>"
    ),
    "tiny_mistral": dict(
        kind="llm", vision=_TINY_VISION, qformer=_TINY_QFORMER, llm=_TINY_MISTRAL, prompt="", end_sym="</s>"
    ),
    "blip2_qwen2_7b": dict(kind="llm", vision=_EVA_VIT_G, llm=_QWEN2_7B, prompt="", end_sym="<|endoftext|>"),
    "blip2_mistral7b": dict(kind="llm", vision=_EVA_VIT_G, llm=_MISTRAL_7B, prompt="", end_sym="</s>"),
    "minigpt4_vicuna7b": dict(
        kind="minigpt4",
        vision=_EVA_VIT_G,
        llm=_VICUNA_7B,
        freeze_qformer=True,
        prompt=_MINIGPT4_INSTRUCTION,
        max_txt_len=160,
        end_sym="###",
        prompt_template="###Human: {} ###Assistant: ",
    ),
    # MiniGPT-4's LLaMA-2 variant (MiniGPT-v2's image path): no Q-Former, 4 patch tokens per slot.
    "minigpt4_llama2_7b": dict(_MINIGPT4_LLAMA2, vision=_EVA_VIT_G, llm=_LLAMA2_CHAT_7B),
    "tiny_minigpt4_llama2": dict(_MINIGPT4_LLAMA2, vision=_TINY_VISION, llm=_TINY_LLAMA),
    # BLIP-2 FlanT5: the query outputs go into T5's encoder before the prompt.
    "tiny_flant5": dict(_BLIP2_T5, vision=_TINY_VISION, qformer=_TINY_QFORMER, llm=_TINY_T5),
    "blip2_flant5xl": dict(_BLIP2_T5, vision=_EVA_VIT_G, llm=_FLANT5_XL),
    "blip2_flant5xxl": dict(_BLIP2_T5, vision=_EVA_VIT_G, llm=_FLANT5_XXL),
    "instructblip_vicuna7b": dict(_INSTRUCTBLIP_VICUNA, llm=dict(_VICUNA_7B, vocab_size=32001)),
    "instructblip_vicuna13b": dict(_INSTRUCTBLIP_VICUNA, llm=dict(_VICUNA_13B, vocab_size=32001)),
    "instructblip_flant5xl": dict(_INSTRUCTBLIP, vision=_EVA_VIT_G, llm=_FLANT5_XL, end_sym=""),
    "instructblip_flant5xxl": dict(_INSTRUCTBLIP, vision=_EVA_VIT_G, llm=_FLANT5_XXL, end_sym=""),
    # Tiny InstructBLIP of each family the real ones have. The built-in tokenizers spell unknown
    # words letter by letter, so an instruction takes all of the tiny Q-Former's 64 positions.
    "tiny_instructblip_llama": dict(_TINY_INSTRUCTBLIP, llm=_TINY_LLAMA, end_sym="</s>"),
    "tiny_instructblip_flant5": dict(_TINY_INSTRUCTBLIP, llm=_TINY_T5, end_sym=""),
}


def flavour_dict(name: str) -> dict[str, Any]:
    """The partial config dict of a named flavour (a deep copy, safe to modify)."""
    if name not in FLAVOURS:
        raise ConfigError(f"unknown model flavour {name!r}; known flavours: {sorted(FLAVOURS)}")
    return copy.deepcopy(FLAVOURS[name])


def build_model_config(flavour: str = "tiny", overrides: dict[str, Any] | None = None) -> Blip2Config:
    """A validated Blip2Config from a flavour name plus nested overrides (prefix ``model``)."""
    data = merge_dicts(flavour_dict(flavour), overrides or {})
    return from_dict(Blip2Config, data, prefix="model")
