#!/bin/bash
# Seed-1 accuracy run on 8 x Ascend 910B: BLIP-2 OPT-2.7B COCO caption fine-tuning, 5 epochs,
# batch 16 per device, then BLEU@4 / CIDEr on the Karpathy test split (ModelZoo form).
#
#   bash launch/ascend/train_full_8p.sh --data_path=/data/coco --ckpt_path=/models
#
# Prints "Final Performance images/sec", "E2E Training Duration sec" and "Final Train
# Accuracy" (BLEU@4, CIDEr), and writes <run>/BLIP2_OPT2.7B_caption_bs16_8p_acc.log.
# Any option of launch/common/run_seed_job.sh may follow and overrides these defaults
# (e.g. --output_dir=..., --epochs=1, model.llm.tp=2).
exec bash "$(dirname "${BASH_SOURCE[0]}")/../common/run_seed_job.sh" --device=npu --mode=full --nproc=8 "$@"
