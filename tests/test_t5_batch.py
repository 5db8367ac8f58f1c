"""BLIP-2 FlanT5's side of the data/model contract: the seq2seq layout, prefix language
modelling, and the settings an encoder-decoder LLM refuses."""

from __future__ import annotations

import pytest
import torch

from blip2_megatron.config import ConfigError, build_model_config, load_job_config
from blip2_megatron.data.batch import IGNORE_INDEX, build_batch_builder


@pytest.fixture
def builder():
    return build_batch_builder(build_model_config("tiny_flant5", {"prompt": "a photo of"}))


def test_encoder_reads_image_slots_then_prompt_and_end_token(builder):
    tok = builder.tokenizer
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
    inputs = builder.layout(["a photo of", "what color"], ["red circle", "a big blue square"])
    slots = builder.num_image_slots
    for row, (prompt, target) in enumerate(
        [("a photo of", "red circle"), ("what color", "a big blue square")]
    ):
        prompt_ids = tok(prompt)["input_ids"]  # T5's tokenizer closes the text with </s>
        assert prompt_ids[-1] == tok.eos_token_id
        real = inputs.attention_mask[row].bool()
        ids = inputs.input_ids[row][real].tolist()
        assert ids == [builder.pad_id] * slots + prompt_ids
        assert (
            inputs.image_slots[row].tolist()[:slots] == [True] * slots
            and inputs.image_slots[row].sum() == slots
        )
        labels = inputs.labels[row]
        target_ids = tok(target)["input_ids"]
        assert labels[: len(target_ids)].tolist() == target_ids  # target, then </s>
        assert (labels[len(target_ids) :] == IGNORE_INDEX).all()
    assert inputs.input_ids.shape[1] % 8 == 0 and inputs.labels.shape[1] % 8 == 0


def test_training_batch_has_decoder_labels_and_no_first_label(builder):
    batch = builder({"image": torch.zeros(2, 3, 32, 32), "text_output": ["red circle", "blue square"]})
    assert batch["first_label"] == 0
    assert batch["labels"].shape == (2, 8)  # the decoder's own length, not the encoder's
    assert (batch["labels"] != IGNORE_INDEX).sum(dim=1).tolist() == [3, 3]  # two words and </s> each


def test_max_txt_len_cuts_texts_but_keeps_the_end_token():
    builder = build_batch_builder(build_model_config("tiny_flant5", {"max_txt_len": 4}))
    inputs = builder.layout(["one two three four five six"], ["a b c d e f g"])
    assert inputs.attention_mask.sum() == builder.num_image_slots + 4
    assert inputs.input_ids[0, builder.num_image_slots + 3] == builder.tokenizer.eos_token_id
    assert (inputs.labels != IGNORE_INDEX).sum() == 4 and inputs.labels[
        0, 3
    ] == builder.tokenizer.eos_token_id


def test_prefix_lm_cuts_each_caption_at_a_word_boundary_the_same_way_every_time():
    builder = build_batch_builder(build_model_config("tiny_flant5", {"prefix_lm": True}))
    caption = "a small red circle on the left of a blue square"
    words = caption.split()
    cuts = set()
    for key in range(40):
        prefix, rest = builder.split_prefix("", caption, f"shard-0/{key}")
        assert f"{prefix} {rest}" == caption and prefix and rest  # both parts non-empty
        assert builder.split_prefix("", caption, f"shard-0/{key}") == (
            prefix,
            rest,
        )  # keyed: a resume cuts alike
        cuts.add(len(prefix.split()))
    assert cuts <= set(range(1, len(words))) and len(cuts) > 3  # cuts spread over the caption
    assert builder.split_prefix("", "one", "k") == ("", "one")  # a one-word caption is all target
    assert builder.split_prefix("a photo of", "red circle", "k") == ("a photo of red", "circle")

    batch = builder(
        {"image": torch.zeros(2, 3, 32, 32), "text_output": [caption, caption], "sample_key": ["s/1", "s/2"]}
    )
    tok = builder.tokenizer
    for row, key in enumerate(["s/1", "s/2"]):
        prefix, rest = builder.split_prefix("", caption, key)
        real = batch["attention_mask"][row].bool()
        assert batch["input_ids"][row][real].tolist()[builder.num_image_slots :] == tok(prefix)["input_ids"]
        labels = batch["labels"][row]
        assert labels[labels != IGNORE_INDEX].tolist() == tok(rest)["input_ids"]


def test_encoder_decoder_settings_refused_by_name():
    with pytest.raises(ConfigError, match="model.end_sym"):
        build_model_config("tiny_flant5", {"end_sym": "\n"})
    with pytest.raises(ConfigError, match="minigpt4"):
        build_model_config("tiny_flant5", {"kind": "minigpt4"})
    with pytest.raises(ConfigError, match="prefix_lm"):
        build_model_config("tiny", {"prefix_lm": True})
    with pytest.raises(ConfigError, match="overflows in fp16"):
        build_model_config("tiny_flant5", {"llm": {"dtype": "fp16"}})
    with pytest.raises(ConfigError, match="overflows in fp16"):
        load_job_config("caption_coco_flant5xl", ["train.precision=fp16", "model.llm.freeze=false"])
    # A frozen bf16 FlanT5 under an fp16 engine computes in bf16: allowed.
    assert load_job_config("caption_coco_flant5xl", ["train.precision=fp16"]).model.llm.dtype == "bf16"
