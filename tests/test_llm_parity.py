"""Our tensor-parallel decoder (TP=1) against transformers' OPT and LLaMA (tiny random, CPU fp32).

Also home of the tiny-model helpers the other LLM test files import.
"""

from __future__ import annotations

import pytest
import torch

from blip2_megatron.convert.hf_llm import llm_config_from_hf, load_hf_llm_weights
from blip2_megatron.models.llm import KVCache, ParallelCausalLM

transformers = pytest.importorskip("transformers")

VOCAB = 256
HIDDEN = 64
TOL = dict(rtol=1e-5, atol=1e-5)
# name -> (transformers class name, config kwargs)
TINY_HF = {
    "opt": (
        "OPT",
        dict(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=3,
            num_attention_heads=4,
            ffn_dim=128,
            max_position_embeddings=64,
            dropout=0.0,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
        ),
    ),
    "llama_gqa": (
        "Llama",
        dict(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=64,
            rope_theta=500.0,  # small base: the rotation differs visibly between positions
            rms_norm_eps=1e-6,
            pad_token_id=0,
        ),
    ),
    "llama_mha_bias": (
        "Llama",
        dict(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=64,
            attention_bias=True,
            pad_token_id=0,
        ),
    ),
}


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights away from their defaults (HF starts norms at 1 and biases at 0, which would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        param.copy_(1.0 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.1 * noise)


def make_hf_model(name: str, seed: int = 0, **overrides):
    """A tiny random transformers causal LM (eval mode, eager attention for exact reference maths)."""
    kind, kwargs = TINY_HF[name]
    config = getattr(transformers, f"{kind}Config")(**{**kwargs, **overrides}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
    randomize(model, seed)
    return model


def make_ours(hf_model, **kwargs) -> ParallelCausalLM:
    """Our model with the HF model's weights (uses the running TP group's size)."""
    from blip2_megatron.parallel import state

    cfg = llm_config_from_hf(hf_model.config.to_dict(), tp=state.tp_size())
    model = ParallelCausalLM(cfg, init_weights=False, **kwargs).eval()
    load_hf_llm_weights(model, hf_model.state_dict())
    return model


def make_batch(seed: int = 0, batch: int = 3, seq: int = 12, padding: str = "right", vocab: int = VOCAB):
    """Token ids, a padding mask (row 0 unpadded, others padded) and labels with -100."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(1, batch):
        pad = 2 * row + 1
        if padding == "right":
            mask[row, seq - pad :] = 0
        else:
            mask[row, :pad] = 0
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # a prompt that takes no loss
    if padding == "left":
        # The first real token would be predicted from a padding position, whose output is
        # undefined (HF attends uniformly to masked keys there, we attend to the slot itself).
        first_real = mask.argmax(dim=1)
        labels[torch.arange(batch), first_real] = -100
    return input_ids, mask, labels


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> None:
    """Compare logits at real tokens (padding rows of left-padded inputs are undefined in both)."""
    real = mask.bool()
    torch.testing.assert_close(ours[..., : ref.shape[-1]][real], ref[real], **TOL)


@pytest.mark.parametrize("name", list(TINY_HF))
@pytest.mark.parametrize("padding", ["right", "left"])
def test_logits_and_loss_match_transformers(single_process_group, name, padding):
    hf = make_hf_model(name)
    ours = make_ours(hf)
    input_ids, mask, labels = make_batch(padding=padding)
    with torch.no_grad():
        ref = hf(input_ids=input_ids, attention_mask=mask, labels=labels)
        out = ours(input_ids=input_ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == ref.logits.shape
    assert_logits_close(out.logits, ref.logits, mask)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)


@pytest.mark.parametrize("name", ["opt", "llama_gqa"])
def test_inputs_embeds_path_and_its_gradient(single_process_group, name):
    """BLIP-2's path: query embeddings + token embeddings in, OPT adds positions to all of them."""
    hf = make_hf_model(name)
    ours = make_ours(hf)
    input_ids, mask, labels = make_batch(padding="right")
    gen = torch.Generator().manual_seed(1)
    queries = 0.5 * torch.randn(input_ids.shape[0], 4, HIDDEN, generator=gen)
    mask = torch.cat([torch.ones(input_ids.shape[0], 4, dtype=torch.long), mask], dim=1)
    labels = torch.cat([torch.full((input_ids.shape[0], 4), -100), labels], dim=1)

    ref_queries = queries.clone().requires_grad_()
    ref_embeds = torch.cat([ref_queries, hf.get_input_embeddings()(input_ids)], dim=1)
    ref = hf(inputs_embeds=ref_embeds, attention_mask=mask, labels=labels)
    ref.loss.backward()

    our_queries = queries.clone().requires_grad_()
    our_embeds = torch.cat([our_queries, ours.get_input_embeddings()(input_ids)], dim=1)
    out = ours(inputs_embeds=our_embeds, attention_mask=mask, labels=labels)
    out.loss.backward()

    assert_logits_close(out.logits.detach(), ref.logits.detach(), mask)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    torch.testing.assert_close(our_queries.grad, ref_queries.grad, **TOL)
    # the first decoder weight receives the same gradient too (trainable LLM case)
    hf_q = hf.model.decoder.layers[0] if name == "opt" else hf.model.layers[0]
    torch.testing.assert_close(
        ours.layers[0].self_attn.q_proj.weight.grad, hf_q.self_attn.q_proj.weight.grad, **TOL
    )


@pytest.mark.parametrize("name", ["opt", "llama_gqa"])
def test_kv_cache_decoding_matches_full_forward(single_process_group, name):
    hf = make_hf_model(name)
    ours = make_ours(hf)
    input_ids, mask, _ = make_batch(padding="left", seq=10)
    with torch.no_grad():
        full = ours(input_ids=input_ids, attention_mask=mask).logits
        cache = KVCache()
        prefix = 6
        first = ours(input_ids=input_ids[:, :prefix], attention_mask=mask[:, :prefix], kv_cache=cache)
        steps = [first.logits]
        for t in range(prefix, input_ids.shape[1]):
            out = ours(input_ids=input_ids[:, t : t + 1], attention_mask=mask[:, : t + 1], kv_cache=cache)
            steps.append(out.logits)
    assert cache.seq_length == input_ids.shape[1]
    # LLaMA's default positions count slots, whatever the padding: the same with and without cache.
    assert_logits_close(torch.cat(steps, dim=1), full, mask)


def test_pipeline_stages_compose_to_the_whole_model(single_process_group):
    """pre_process / layer_range / post_process pieces chained reproduce the full forward."""
    hf = make_hf_model("opt")
    full = make_ours(hf)
    first = make_ours(hf, post_process=False, layer_range=(0, 1))
    middle = make_ours(hf, pre_process=False, post_process=False, layer_range=(1, 2))
    last = make_ours(hf, pre_process=False, layer_range=(2, 3))
    assert not hasattr(middle, "embed_tokens") and not hasattr(middle, "lm_head")
    assert [layer.layer_index for layer in last.layers] == [2]
    # tied head on a stage without the embedding: its own copy, loaded from the embedding
    torch.testing.assert_close(last.lm_head.weight, full.embed_tokens.weight)
    input_ids, mask, labels = make_batch()
    with torch.no_grad():
        ref = full(input_ids=input_ids, attention_mask=mask, labels=labels)
        hidden = first(input_ids=input_ids, attention_mask=mask).hidden_states
        hidden = middle(hidden_states=hidden, attention_mask=mask).hidden_states
        out = last(hidden_states=hidden, attention_mask=mask, labels=labels)
    assert_logits_close(out.logits, ref.logits, mask)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)


def _autograd_ops(tensor: torch.Tensor) -> set[str]:
    """The names of the autograd nodes that lead to ``tensor``."""
    ops, todo = set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None:
            ops.add(type(node).__name__)
            todo += [next_node for next_node, _ in node.next_functions]
    return ops


@pytest.mark.parametrize("skip_bias_add", [False, True])
def test_linear_layers_at_one_tp_rank_are_one_plain_product(single_process_group, skip_bias_add):
    """At TP 1 our megatron linears skip megatron's identity region functions and fold the bias in."""
    from megatron.core import ModelParallelConfig, tensor_parallel

    from blip2_megatron.models.llm import ColumnParallelLinear, RowParallelLinear

    config = ModelParallelConfig(tensor_model_parallel_size=1, use_cpu_initialization=True)
    init = torch.nn.init.normal_
    torch.manual_seed(0)
    layers = [
        ColumnParallelLinear(
            HIDDEN, 96, config=config, init_method=init, bias=True, skip_bias_add=skip_bias_add
        ),
        RowParallelLinear(
            96,
            HIDDEN,
            config=config,
            init_method=init,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=skip_bias_add,
        ),
    ]
    megatron_forward = [
        tensor_parallel.ColumnParallelLinear.forward,
        tensor_parallel.RowParallelLinear.forward,
    ]
    for layer, reference in zip(layers, megatron_forward):
        torch.nn.init.normal_(layer.bias)
        x = torch.randn(5, 3, layer.weight.shape[1], requires_grad=True)
        out, bias = layer(x)
        ref_out, ref_bias = reference(layer, x)
        assert bias is ref_bias and (bias is layer.bias) == skip_bias_add
        torch.testing.assert_close(out, ref_out, **TOL)
        ops, ref_ops = _autograd_ops(out), _autograd_ops(ref_out)
        assert any("ModelParallelRegion" in op for op in ref_ops), ref_ops  # megatron's own path
        assert not any("ModelParallelRegion" in op or "LinearWith" in op for op in ops), ops
        if not skip_bias_add:
            assert "AddmmBackward0" in ops and "AddBackward0" not in ops, ops  # the bias inside the product
        grads = torch.autograd.grad(out.square().sum(), [x, layer.weight])
        ref_grads = torch.autograd.grad(ref_out.square().sum(), [x, layer.weight])
        for grad, ref_grad in zip(grads, ref_grads):
            torch.testing.assert_close(grad, ref_grad, **TOL)


def test_activation_checkpointing_gives_the_same_gradients(single_process_group):
    hf = make_hf_model("llama_gqa")
    plain, ckpt = make_ours(hf), make_ours(hf)
    ckpt.grad_checkpointing = True
    input_ids, mask, labels = make_batch()
    grads = []
    for model in (plain, ckpt):
        model.train()
        model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append(model.layers[0].mlp.gate_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_builds_on_meta_device_for_parameter_counting(single_process_group):
    hf = make_hf_model("opt")
    cfg = llm_config_from_hf(hf.config.to_dict())
    with torch.device("meta"):
        model = ParallelCausalLM(cfg)
    assert all(p.is_meta for p in model.parameters())
    # the tied head shares the embedding, so HF's count (which dedups tied weights) is ours
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())


def test_bad_calls_fail_clearly(single_process_group):
    hf = make_hf_model("opt")
    ours = make_ours(hf)
    input_ids, mask, labels = make_batch()
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        ours()
    with pytest.raises(ValueError, match="must cover past and new positions"):
        ours(input_ids=input_ids, attention_mask=mask[:, :-1])
    with pytest.raises(ValueError, match="llm.tp=2"):
        ParallelCausalLM(llm_config_from_hf(hf.config.to_dict(), tp=2))
    with pytest.raises(ValueError, match="layer_range"):
        ParallelCausalLM(llm_config_from_hf(hf.config.to_dict()), layer_range=(2, 5))
