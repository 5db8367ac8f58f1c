"""Building from weight files at the target precision: host memory stays near the rank's shard.

A Hugging Face OPT directory at OPT-2.7B's widths (hidden 2560, FFN 10240, 32 heads, the
50272-row vocabulary; fewer layers than its 32 so that CI writes and reads 1.5 GB, not
5.3 GB) holds random bf16 weights in sharded safetensors. ``build_model`` with
``llm.dtype=bf16`` builds the BLIP-2 model on it in fresh processes at TP 1 and TP 2, and
a thread samples the process's anonymous resident memory (``RssAnon``: the file pages
safetensors maps are the page cache's, not the process's) while it builds. The peak
growth must stay within 1.2x the bytes of the parameters the rank ends up holding: the
LLM is created on the meta device and each rank reads its slice of each tensor straight
into bf16, so there is no fp32 copy and no random initialisation to overwrite.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed

pytestmark = [pytest.mark.slow, pytest.mark.dist]

OPT_2_7B_WIDTHS = dict(
    vocab_size=50272,
    hidden_size=2560,
    ffn_dim=10240,
    num_attention_heads=32,
    max_position_embeddings=2048,
    word_embed_proj_dim=2560,
)
NUM_LAYERS = 8  # OPT-2.7B has 32; the per-layer shapes are its own
SHARD_BYTES = 512 * 2**20


def write_random_opt(path: Path, num_layers: int = NUM_LAYERS) -> int:
    """A transformers OPT directory with random bf16 weights in sharded safetensors; returns its bytes."""
    import transformers
    from safetensors.torch import save_file

    config = transformers.OPTConfig(num_hidden_layers=num_layers, dtype="bfloat16", **OPT_2_7B_WIDTHS)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.OPTForCausalLM(config).state_dict().items()}
    shapes.pop("lm_head.weight")  # tied to the token embedding, as save_pretrained writes it
    path.mkdir(parents=True)
    config.save_pretrained(path)
    generator = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    for name, shape in shapes.items():
        tensor = torch.empty(shape, dtype=torch.bfloat16).normal_(std=0.02, generator=generator)
        if size and size + tensor.nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
        total += tensor.nbytes
    index = {}
    for number, shard in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / file), metadata={"format": "pt"})
        index.update(dict.fromkeys(shard, file))
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index})
    )
    return total


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakRss:
    """The highest RssAnon seen while the block runs, sampled every millisecond."""

    def __enter__(self) -> PeakRss:
        self.start = self.peak = _rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_anon())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_anon())


def _build_and_measure(rank: int, world_size: int, weights: str, num_layers: int) -> dict:
    from blip2_megatron.build import build_model
    from blip2_megatron.config import build_model_config
    from blip2_megatron.parallel import state

    llm = dict(
        OPT_2_7B_WIDTHS,
        intermediate_size=OPT_2_7B_WIDTHS["ffn_dim"],
        num_heads=OPT_2_7B_WIDTHS["num_attention_heads"],
        num_layers=num_layers,
        weights=weights,
        dtype="bf16",
        tp=world_size,
    )
    for key in ("ffn_dim", "num_attention_heads", "word_embed_proj_dim"):
        llm.pop(key)
    # The tiny flavour's ViT and Q-Former: the LLM is what this measures.
    cfg = build_model_config("tiny", {"llm": llm})
    state.initialize_model_parallel(world_size, 1)
    with PeakRss() as rss:
        model = build_model(cfg, device=torch.device("cpu"))
    tensors = [*model.parameters(), *model.buffers()]
    llm_dtypes = {str(p.dtype) for p in model.language_model.parameters()}
    return {
        "held_bytes": sum(t.numel() * t.element_size() for t in tensors),
        "llm_bytes": sum(p.numel() * p.element_size() for p in model.language_model.parameters()),
        "peak_growth": rss.peak - rss.start,
        "llm_dtypes": sorted(llm_dtypes),
    }


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("opt_2.7b_widths") / "opt"
    total = write_random_opt(path)
    print(f"random OPT-2.7B-width directory, {NUM_LAYERS} layers: {total / 2**30:.2f} GiB of bf16")
    return path


@pytest.mark.parametrize("tp", [1, 2])
def test_building_from_files_in_bf16_peaks_near_the_rank_shard(opt_dir, tp):
    results = run_distributed(_build_and_measure, tp, str(opt_dir), NUM_LAYERS)
    for rank, result in enumerate(results):
        ratio = result["peak_growth"] / result["held_bytes"]
        print(
            f"TP {tp} rank {rank}: holds {result['held_bytes'] / 2**30:.3f} GiB "
            f"(LLM {result['llm_bytes'] / 2**30:.3f} GiB, {result['llm_dtypes']}), "
            f"peak RssAnon growth {result['peak_growth'] / 2**30:.3f} GiB = {ratio:.2f}x"
        )
        assert result["llm_dtypes"] == ["torch.bfloat16"], result
        assert ratio <= 1.2, result
