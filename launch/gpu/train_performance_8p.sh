#!/bin/bash
# Seed-1 throughput run on 8 x GPU: the caption fine-tuning job for a bounded number of
# steps (default 1000, --steps=N), no evaluation; FPS averaged after --warmup steps (default 50).
#
#   bash launch/gpu/train_performance_8p.sh --data_path=/data/coco --ckpt_path=/models
#
# Prints "Final Performance images/sec" and writes <run>/BLIP2_OPT2.7B_caption_bs16_8p_perf.log.
# Any option of launch/common/run_seed_job.sh may follow and overrides these defaults.
exec bash "$(dirname "${BASH_SOURCE[0]}")/../common/run_seed_job.sh" --device=gpu --mode=performance --nproc=8 "$@"
