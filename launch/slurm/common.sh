# shellcheck shell=bash
# What train.sbatch and benchmark.sbatch share: the per-node layout, the rendezvous, one
# torchrun per node through srun, and the pre-emption signal path. Sourced by them after
# they set REPO_DIR and their knobs; not a job script by itself.
#
# Why srun + torchrun (and not the `deepspeed` launcher): in SLURM mode DeepSpeed's launcher
# starts the remote ranks itself through pdsh or ssh (or needs its own srun/mpirun config),
# which compute nodes often do not allow. `srun --ntasks-per-node=1` starts exactly one
# torchrun per allocated node through slurmd (so SLURM tracks, signals and cleans up every
# process), and torchrun's c10d rendezvous needs only a host:port that all nodes reach.
# launch/train.py reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from torchrun and calls
# deepspeed.initialize itself, so nothing is lost by not using the DeepSpeed launcher.
#
# Signals (verified on a local slurmctld/slurmd 22.05 by tests/test_slurm.py):
# - `#SBATCH --signal=B:USR1@120` sends USR1 to this batch shell only, 120 s before the time
#   limit. bash runs a trap only between commands, so srun runs in the background and the
#   shell sits in `wait`, which a trapped signal interrupts at once.
# - The trap forwards USR1 with `scancel --signal=USR1 $SLURM_JOB_ID`: every process of
#   every step on every node gets it (slurmd signals the whole step, not only the task),
#   so the training processes see it directly.
# - torchrun must not die of it: USR1's default action kills a process, torchrun does not
#   handle USR1, and slurmstepd tears the step down once its task (torchrun) exits, which
#   would cut the checkpoint write short. So torchrun starts with USR1/USR2 ignored
#   (`trap '' USR1 USR2` before exec: an ignored signal stays ignored across exec); the
#   trainer installs its own USR1 handler, saves at the next step boundary and exits 0,
#   and torchrun then exits 0 like after any normal run. Until the trainer has installed
#   its handler (imports, model build) USR1 is ignored there too, so the batch shell sends
#   it again every PREEMPT_RESEND_S seconds (default 30) until the step ends.
# - Then, for USR1 (time limit), the shell requeues the job (`scontrol requeue`); the same
#   RUN_NAME means the same output directory, so the next start resumes from
#   checkpoints/latest (train.resume=auto). USR2 means "save and stop": no requeue.
# - A plain `scancel`/pre-emption sends SIGTERM to all processes: torchrun forwards it, the
#   trainer saves and exits, within SLURM's KillWait (torchrun waits
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds before it kills the workers).

BLIP2_LOG_PREFIX="[blip2-slurm]"

blip2_log() { echo "$BLIP2_LOG_PREFIX $(date '+%F %T') $*"; }

# Fails the job early with a clear message (rather than deep inside torchrun).
blip2_die() {
  echo "$BLIP2_LOG_PREFIX error: $*" >&2
  exit 2
}

# First port at or above $1 that nothing listens on here (the batch script runs on the
# first node of the allocation, which is the rendezvous host).
blip2_free_port_from() {
  "${PYTHON:-python3}" - "$1" <<'EOF'
import socket, sys
port = int(sys.argv[1])
for candidate in range(port, port + 200):
    with socket.socket() as s:
        try:
            s.bind(("", candidate))
        except OSError:
            continue
        print(candidate)
        break
else:
    print(port)
EOF
}

# Resolves the layout and rendezvous from SLURM's environment and the knobs:
#   DEVICE (gpu|npu|cpu), GPUS_PER_NODE (gpu/npu), MASTER_PORT (optional)
# and exports NNODES, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT, OMP_NUM_THREADS.
blip2_slurm_setup() {
  [[ -n ${SLURM_JOB_ID:-} ]] || blip2_die "not inside a SLURM job (submit with sbatch)"
  # shellcheck source=../common/device_env.sh
  source "$REPO_DIR/launch/common/device_env.sh"
  blip2_device_env "${DEVICE:?set DEVICE to gpu, npu or cpu}" || blip2_die "DEVICE=$DEVICE"

  NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  if [[ $DEVICE == cpu ]]; then
    # CPU mode (tests, laptops): one process per SLURM task of the node.
    NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_NTASKS_PER_NODE:-$(( ${SLURM_NTASKS:-$NNODES} / NNODES ))}}
  else
    # One process per accelerator: the knob, else what SLURM granted, else what the node has.
    local granted=${SLURM_GPUS_ON_NODE:-}
    [[ -n $granted ]] || granted=$(blip2_devices_per_node "$DEVICE")
    NPROC_PER_NODE=${NPROC_PER_NODE:-${GPUS_PER_NODE:-$granted}}
  fi
  [[ $NPROC_PER_NODE =~ ^[0-9]+$ && $NPROC_PER_NODE -gt 0 ]] \
    || blip2_die "cannot tell how many processes per node to start (DEVICE=$DEVICE): set GPUS_PER_NODE"

  # Rendezvous on the first node of the allocation; the port follows from the job id so that
  # two jobs sharing a node do not collide, and a requeued job (same id) gets the same one.
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  [[ -n $MASTER_ADDR ]] || blip2_die "could not read the first host of SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
  if [[ -z ${MASTER_PORT:-} ]]; then
    MASTER_PORT=$((15000 + SLURM_JOB_ID % 20000))
    # The batch shell runs on the first node: check the port there when it is that node.
    if [[ ${SLURMD_NODENAME:-} == "$MASTER_ADDR" ]]; then
      MASTER_PORT=$(blip2_free_port_from "$MASTER_PORT")
    fi
  fi
  export NNODES NPROC_PER_NODE MASTER_ADDR MASTER_PORT

  # Threads per process: the node's CPUs shared by its processes (torchrun would pick 1).
  local cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
  BLIP2_CPUS_PER_NODE=$cpus
  if [[ -z ${OMP_NUM_THREADS:-} ]]; then
    OMP_NUM_THREADS=$((cpus / NPROC_PER_NODE))
    ((OMP_NUM_THREADS >= 1)) || OMP_NUM_THREADS=1
    export OMP_NUM_THREADS
  fi
  # How long torchrun lets the workers finish (save) after a SIGTERM before it kills them.
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}
  export PYTHONUNBUFFERED=1

  blip2_log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0}: ${NNODES} node(s) x ${NPROC_PER_NODE} process(es), device ${DEVICE}, rendezvous ${MASTER_ADDR}:${MASTER_PORT}, ${OMP_NUM_THREADS} thread(s)/process"
}

BLIP2_PREEMPT_SIGNAL=""
BLIP2_SRUN_PID=""
BLIP2_RESEND_PID=""

# Trap body for USR1/USR2 reaching the batch shell: pass USR1 on to the training processes.
# A training process still starting up (before the trainer installs its handler) ignores
# USR1, as torchrun does, so the signal is sent again every PREEMPT_RESEND_S seconds until
# the step has exited; a trainer that is already saving just notes it again.
_blip2_on_preempt() {
  local sig=$1
  BLIP2_PREEMPT_SIGNAL=$sig
  if [[ -z $BLIP2_SRUN_PID ]]; then
    blip2_log "received SIG$sig before training started"
    return
  fi
  blip2_log "received SIG$sig: asking the training processes to save a checkpoint and exit"
  _blip2_signal_step
  if [[ -z $BLIP2_RESEND_PID ]]; then
    (
      while sleep "${PREEMPT_RESEND_S:-30}" && kill -0 "$BLIP2_SRUN_PID" 2>/dev/null; do
        _blip2_signal_step
      done
    ) &
    BLIP2_RESEND_PID=$!
  fi
}

_blip2_signal_step() {
  # Without --batch/--full, scancel signals every step of the job but not this shell.
  scancel --signal=USR1 "$SLURM_JOB_ID" \
    || { blip2_log "scancel failed; signalling srun instead"; kill -USR1 "$BLIP2_SRUN_PID"; }
}

_blip2_on_term() {
  BLIP2_PREEMPT_SIGNAL=TERM
  blip2_log "received SIGTERM (cancel or pre-emption): waiting for the training processes to save and exit"
}

# blip2_slurm_run ENTRY [ARGS...]: one torchrun per node running ENTRY (a path absolute or
# relative to REPO_DIR) with ARGS, in the background, with the signal path above. Returns
# the step's exit code.
blip2_slurm_run() {
  local entry=$1
  shift
  [[ $entry == /* ]] || entry=$REPO_DIR/$entry
  trap '_blip2_on_preempt USR1' USR1
  trap '_blip2_on_preempt USR2' USR2
  trap '_blip2_on_term' TERM
  if [[ -n $BLIP2_PREEMPT_SIGNAL ]]; then
    return 0 # signalled during set-up: nothing ran, nothing to save
  fi

  local cmd=(
    "${PYTHON:-python3}" -m torch.distributed.run
    --nnodes="$NNODES"
    --nproc_per_node="$NPROC_PER_NODE"
    --rdzv_backend=c10d
    --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT"
    --rdzv_id="blip2-$SLURM_JOB_ID"
    --max_restarts=0
    "$entry" "$@"
  )
  blip2_log "launching: ${cmd[*]}"
  # --cpus-per-task: the one task per node gets all of the node's CPUs (a step would
  # otherwise get one CPU and, with CPU binding, pin every rank of the node to it).
  # --kill-on-bad-exit: a node that fails ends the others instead of leaving them hung in
  # a collective.
  srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 \
    --cpus-per-task="$BLIP2_CPUS_PER_NODE" --kill-on-bad-exit=1 \
    bash -c 'trap "" USR1 USR2; exec "$@"' blip2-node "${cmd[@]}" &
  BLIP2_SRUN_PID=$!

  # `wait` returns early (status > 128) whenever a trapped signal arrives: keep waiting
  # until srun itself has exited.
  local rc
  while true; do
    wait "$BLIP2_SRUN_PID"
    rc=$?
    kill -0 "$BLIP2_SRUN_PID" 2>/dev/null || break
  done
  BLIP2_SRUN_PID=""
  if [[ -n $BLIP2_RESEND_PID ]]; then
    kill "$BLIP2_RESEND_PID" 2>/dev/null
    BLIP2_RESEND_PID=""
  fi
  blip2_log "training step exited with code $rc${BLIP2_PREEMPT_SIGNAL:+ after SIG$BLIP2_PREEMPT_SIGNAL}"
  return "$rc"
}

# After a USR1 (time limit) that training answered by saving and exiting 0: requeue, so the
# job starts again and resumes from the checkpoint. Ends the script when it requeues.
blip2_requeue_if_preempted() {
  local rc=$1
  [[ $BLIP2_PREEMPT_SIGNAL == USR1 ]] || return 0
  if [[ ${REQUEUE_ON_PREEMPT:-1} != 1 ]]; then
    blip2_log "REQUEUE_ON_PREEMPT=${REQUEUE_ON_PREEMPT:-}: not requeueing; resubmit with the same RUN_NAME to resume"
    return 0
  fi
  if [[ $rc != 0 ]]; then
    blip2_log "not requeueing: training exited with code $rc"
    return 0
  fi
  blip2_log "requeueing job $SLURM_JOB_ID; it resumes from the latest checkpoint of the same run"
  # scontrol requeue ends this script at once (the job goes back to PENDING), so it comes last.
  scontrol requeue "$SLURM_JOB_ID" || blip2_log "scontrol requeue failed (submitted with --no-requeue?); resubmit to resume"
}
