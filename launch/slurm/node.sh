#!/bin/bash
# One node's share of a SLURM job step, started by blip2_slurm_run (common.sh) through
# `srun --ntasks-per-node=1`: says which node it is, sets what only the node itself can
# know, then becomes torchrun (exec, so that SLURM's signals reach torchrun directly).
#
#   bash launch/slurm/node.sh python3 -m torch.distributed.run ... ENTRY ARGS...

# torchrun must not die of the pre-emption signal (see common.sh); an ignored signal stays
# ignored across exec, and the trainer installs its own handler.
trap '' USR1 USR2

if [[ ${BLIP2_HCCL_IF_IP_PER_NODE:-0} == 1 ]]; then
  # This node's own address for HCCL (the batch shell's would be the first node's).
  HCCL_IF_IP=$(hostname -I 2>/dev/null | awk '{print $1}')
  [[ -n $HCCL_IF_IP ]] && export HCCL_IF_IP
fi

echo "[blip2-slurm] $(date '+%F %T') node ${SLURMD_NODENAME:-$(hostname)} (host $(hostname), node $((${SLURM_NODEID:-0} + 1)) of ${SLURM_NNODES:-1}): starting torchrun, rendezvous ${MASTER_ADDR:-?}:${MASTER_PORT:-?}"
exec "$@"
