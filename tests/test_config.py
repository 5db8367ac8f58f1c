"""Job and model configs: shipped YAMLs load, errors name the bad key, overrides apply."""

import pytest

from blip2_megatron import accelerator
from blip2_megatron.config import (
    FLAVOURS,
    ConfigError,
    build_model_config,
    job_config_from_dict,
    job_config_to_dict,
    load_job_config,
    save_job_config,
    shipped_job_names,
)
from blip2_megatron.training.ds_config import check_layout, fill_ds_config, read_ds_config, without_idle_zero


@pytest.mark.parametrize("name", shipped_job_names())
def test_every_shipped_job_loads(name):
    job = load_job_config(name)
    assert job.name == name
    assert job.data.image_size == job.model.vision.image_size


def test_shipped_jobs_cover_the_issue_list():
    expected = {
        "stage1",
        "stage2_opt2.7b",
        "stage2_vicuna7b",
        "caption_coco_opt2.7b",
        "tiny_stage1",
        "tiny_stage2",
    }
    assert expected <= set(shipped_job_names())


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_every_flavour_validates(flavour):
    cfg = build_model_config(flavour)
    assert cfg.qformer.encoder_hidden_size == cfg.vision.hidden_size


def test_lavis_hyperparameters_in_shipped_jobs():
    stage1 = load_job_config("stage1")
    assert (stage1.train.lr, stage1.train.min_lr, stage1.train.warmup_lr) == (1e-4, 1e-5, 1e-6)
    assert stage1.train.warmup_steps == 5000 and stage1.data.batch_size == 100
    caption = load_job_config("caption_coco_opt2.7b")
    assert caption.model.vision.image_size == 364 and not caption.model.vision.freeze
    assert caption.model.vision.grad_checkpointing and caption.model.llm.freeze
    assert (caption.train.lr, caption.train.warmup_steps, caption.data.batch_size) == (1e-5, 1000, 16)


# config.json of the checkpoints the Qwen2 and Mistral flavours stand for (Qwen/Qwen2-7B and
# mistralai/Mistral-7B-v0.1 as published).
QWEN2_7B_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.37.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
}
MISTRAL_7B_CONFIG = {
    "architectures": ["MistralForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.34.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}


@pytest.mark.parametrize(
    ("flavour", "hf_config", "parameters"),
    [
        ("blip2_qwen2_7b", QWEN2_7B_CONFIG, 7_615_616_512),
        ("blip2_mistral7b", MISTRAL_7B_CONFIG, 7_241_732_096),
    ],
)
def test_qwen2_and_mistral_flavours_accept_the_published_checkpoints(flavour, hf_config, parameters):
    from blip2_megatron.convert.hf_llm import check_hf_config_matches
    from blip2_megatron.models.param_count import count_parameters

    cfg = build_model_config(flavour)
    check_hf_config_matches(cfg.llm, hf_config, flavour)  # what loading the directory checks
    assert count_parameters(cfg).parts["LLM"].total == parameters  # the published model's count
    changed = dict(hf_config, num_key_value_heads=hf_config["num_attention_heads"])
    with pytest.raises(ConfigError, match="llm.num_kv_heads"):
        check_hf_config_matches(cfg.llm, changed, flavour)


@pytest.mark.parametrize("flavour", ["tiny_llama", "tiny_qwen2", "tiny_mistral", "tiny_internlm2"])
def test_tiny_flavours_keep_their_family_flags(flavour):
    """Each tiny LLM has its family's maths (and so its checkpoint layout), not OPT's."""
    real = {
        "tiny_llama": "blip2_vicuna7b",
        "tiny_qwen2": "blip2_qwen2_7b",
        "tiny_mistral": "blip2_mistral7b",
        "tiny_internlm2": "blip2_internlm2_1.8b",
    }[flavour]
    tiny, full = build_model_config(flavour).llm, build_model_config(real).llm

    def flags(llm):
        return (
            llm.hf_family,
            llm.arch,
            llm.attention_bias,
            llm.has_o_proj_bias,
            llm.tie_word_embeddings,
            llm.rope_type,
            llm.rope_theta,
            llm.kv_heads < llm.num_heads,
            llm.sliding_window > 0,
        )

    assert flags(tiny) == flags(full)
    assert (tiny.vocab_size, tiny.hidden_size, tiny.tokenizer, tiny.eos_token_id) == (
        512,
        64,
        "builtin:tiny",
        2,
    )
    if tiny.sliding_window:  # a window the tiny captions outgrow (8 query slots + up to 32 text tokens)
        assert tiny.sliding_window < 8 + 32


def test_readme_job_table_names_every_shipped_job():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("| job | what it trains |") :].split("\n\n", 1)[0]
    named = set(re.findall(r"`([^`]+)`", table))
    missing = sorted(
        name for name in shipped_job_names() if not name.startswith("bench_") and name not in named
    )
    assert not missing, f"shipped jobs missing from the README's job table: {missing}"


def test_overrides_apply_and_unknown_keys_are_named():
    job = load_job_config(None, ["train.max_steps=7", "model.llm.tp=2", "data.batch_size=3"])
    assert (job.train.max_steps, job.model.llm.tp, job.data.batch_size) == (7, 2, 3)
    with pytest.raises(ConfigError, match=r"model\.llm\.tpx"):
        load_job_config(None, ["model.llm.tpx=2"])
    with pytest.raises(ConfigError, match=r"train\.bogus"):
        load_job_config(None, ["train.bogus=1"])
    with pytest.raises(ConfigError, match=r"train\.max_steps"):
        load_job_config(None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match=r"train\.schedule.*cosine"):
        load_job_config(None, ["train.schedule=linear"])


def test_heads_not_divisible_by_tp_is_a_clear_error():
    with pytest.raises(
        ConfigError, match=r"llm\.tp=3 must divide llm\.num_heads=4.*allowed tp values: \[1, 2, 4\]"
    ):
        load_job_config(None, ["model.llm.tp=3"])


def test_unknown_flavour_lists_known_ones():
    with pytest.raises(ConfigError, match="known flavours"):
        load_job_config(None, ["model.flavour=opt-9000"])


def test_image_size_mismatch_is_an_error():
    with pytest.raises(ConfigError, match="data.image_size=64 differs"):
        load_job_config(None, ["data.image_size=64"])


def test_malformed_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {max_steps: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_job_config(str(bad))
    with pytest.raises(ConfigError, match="neither a file nor a shipped job"):
        load_job_config(str(tmp_path / "missing.yaml"))


def test_resolved_config_round_trips(tmp_path):
    job = load_job_config("stage2_vicuna7b", ["train.max_steps=11"])
    save_job_config(job, tmp_path / "config.yaml")
    again = load_job_config(str(tmp_path / "config.yaml"))
    assert job_config_to_dict(again) == job_config_to_dict(job)
    stage1 = load_job_config("tiny_stage1")
    assert job_config_from_dict(job_config_to_dict(stage1)).model.llm is None


@pytest.mark.parametrize(
    ("world", "overrides", "ds", "message"),
    [
        (3, ["model.llm.tp=2"], "zero1.json", "world size 3 is not divisible"),
        (4, ["model.llm.pp=2"], "zero2.json", "ZeRO stage 2 cannot be combined with pipeline"),
        (4, ["model.llm.tp=2"], "zero3.json", "ZeRO stage 3 with tensor parallelism"),
    ],
)
def test_parallel_layout_errors(world, overrides, ds, message):
    job = load_job_config(None, overrides)
    with pytest.raises(ConfigError, match=message):
        check_layout(job, read_ds_config(f"ds_configs/{ds}"), world)


@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero3", "zero2_offload"])
def test_ds_configs_fill_every_auto(name):
    job = load_job_config(None, ["data.batch_size=4", "train.grad_accum=2", "train.precision=bf16"])
    cfg = fill_ds_config(job, read_ds_config(f"ds_configs/{name}.json"), dp_size=3)
    assert cfg["train_batch_size"] == 24 and cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert "auto" not in str(cfg)


@pytest.mark.parametrize(
    ("name", "dp", "precision", "runs"),
    [
        ("zero1", 1, "fp32", 0),
        ("zero2", 1, "fp32", 0),
        ("zero3", 1, "fp32", 3),
        ("zero2_offload", 1, "fp32", 2),
        ("zero2", 2, "fp32", 2),
        ("zero0", 1, "fp32", 0),
        # In half precision stage 0 means DeepSpeed's unfused fp16 optimizer (a host read per tensor).
        ("zero2", 1, "bf16", 2),
        ("zero1", 1, "fp16", 1),
    ],
)
def test_zero_1_and_2_run_as_stage_0_with_one_data_parallel_rank_on_cpu_in_fp32(name, dp, precision, runs):
    """Nothing to partition over one rank: no flat copies or gradient hooks. Offloading needs ZeRO."""
    job = load_job_config(None, ["data.batch_size=4", f"train.precision={precision}"])
    configured = fill_ds_config(job, read_ds_config(f"ds_configs/{name}.json"), dp_size=dp)
    ran = without_idle_zero(configured, dp, precision)
    assert ran["zero_optimization"]["stage"] == runs
    assert configured["zero_optimization"]["stage"] == int(name[4])  # the configured one is left alone


def test_zero_is_kept_at_one_data_parallel_rank_on_an_accelerator(monkeypatch):
    """On a GPU / NPU ZeRO-1/2 stay at DP 1 whatever the precision (stage 0 was measured faster on CPU only)."""
    monkeypatch.setattr(accelerator, "is_cpu", lambda: False)
    job = load_job_config(None, ["data.batch_size=4"])
    configured = fill_ds_config(job, read_ds_config("ds_configs/zero2.json"), dp_size=1)
    assert without_idle_zero(configured, 1, "fp32")["zero_optimization"]["stage"] == 2


def test_malformed_ds_config(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_ds_config(path)
