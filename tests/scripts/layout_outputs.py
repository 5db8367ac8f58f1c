"""Eval loss and greedy tokens of a run's checkpoint in a given layout (run under a launcher).

    deepspeed --num_gpus 2 tests/scripts/layout_outputs.py --checkpoint RUN --sample ROOT --out out.json
    python tests/scripts/layout_outputs.py --checkpoint RUN --sample ROOT --out out.json model.llm.tp=1

The model is laid out as the checkpoint's config says (or the overrides), built with the
run's saved weights, and run on the first 8 val images of the built-in data: the loss of
their first reference captions through the training engine (the pipeline engine when
PP > 1), and, when the whole model is on each rank (PP = 1), greedy tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--sample", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    from blip2_megatron import accelerator
    from blip2_megatron.build import predictor_for
    from blip2_megatron.config import load_job_config
    from blip2_megatron.convert.run_checkpoint import find_checkpoint
    from blip2_megatron.data.batch import build_batch_builder
    from blip2_megatron.data.processors import ImageEvalProcessor
    from blip2_megatron.parallel import state
    from blip2_megatron.training.ds_config import read_ds_config
    from blip2_megatron.training.engine import build_engine

    checkpoint = find_checkpoint(args.checkpoint)
    job = load_job_config(str(checkpoint / "config.yaml"), ["data.batch_size=8", *args.overrides])
    state.init_distributed()
    state.initialize_model_parallel(job.tp, job.pp)
    accelerator.manual_seed(0)
    engine = build_engine(job, read_ds_config(REPO / "ds_configs" / "zero1.json"), 1, 1, trained=checkpoint)
    root = Path(args.sample)
    val = json.loads((root / "val.json").read_text())[:8]
    process = ImageEvalProcessor(job.model.vision.image_size)
    samples = {
        "image": torch.stack([process(root / "images" / item["image"]) for item in val]),
        "text_input": [item["caption"][0] for item in val],
    }
    builder = build_batch_builder(job.model)
    result = {"loss": engine.eval_loss(builder(samples)), "tp": job.tp, "pp": job.pp}
    if job.pp == 1:
        predictor = predictor_for(engine.model, job.model, builder).eval()
        tokens = predictor.generate_tokens(samples, num_beams=1, max_new_tokens=8, min_new_tokens=8)
        result["tokens"] = tokens.tolist()
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(result))
    state.destroy()


if __name__ == "__main__":
    main()
