#!/usr/bin/env bash
# Install what tests/test_slurm.py needs for its single-node SLURM cluster: Debian's
# slurmctld, slurmd, the SLURM client commands and munge (SLURM's authentication daemon).
#
# Idempotent: does nothing when the binaries are already there. Never fails the caller:
# where it cannot install (not root, no apt-get, apt failing offline) it says why and
# exits 0, and the SLURM test then skips with the same reason.
set -u

missing=()
for bin in slurmctld slurmd sbatch scontrol munged; do
  command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
done
if ((${#missing[@]} == 0)); then
  echo "install_slurm: slurmctld, slurmd, slurm client and munge already installed"
  exit 0
fi

if [[ $(id -u) != 0 ]]; then
  echo "install_slurm: missing ${missing[*]} and not root: skipping (the SLURM test will skip)"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_slurm: missing ${missing[*]} and no apt-get on this system: skipping (the SLURM test will skip)"
  exit 0
fi

echo "install_slurm: installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
export DEBIAN_FRONTEND=noninteractive
# The package lists may be absent in a fresh container; refresh them only when an install fails.
if ! apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null 2>&1; then
  apt-get update -q >/dev/null 2>&1 || true
  if ! apt-get install -y -q slurmctld slurmd slurm-client munge; then
    echo "install_slurm: apt-get install failed (offline?): skipping (the SLURM test will skip)"
    exit 0
  fi
fi
echo "install_slurm: done"
exit 0
