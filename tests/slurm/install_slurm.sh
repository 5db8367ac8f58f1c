#!/usr/bin/env bash
# Install what the SLURM tests need: Debian's slurmctld, slurmd, the SLURM client commands
# and munge (SLURM's authentication daemon) for tests/test_slurm.py's one-node cluster, and
# iproute2 (`ip`) and util-linux (`unshare`, `nsenter`) for the network namespaces of
# tests/test_slurm_multinode.py's two-node cluster.
#
# Idempotent: does nothing when the binaries are already there. Never fails the caller:
# where it cannot install (not root, no apt-get, apt failing offline) it says why and
# exits 0, and the SLURM tests then skip with the same reason (or, under
# BLIP2_REQUIRE_SLURM=1 as in CI, fail with it).
set -u

declare -A package_of=(
  [slurmctld]=slurmctld [slurmd]=slurmd [sbatch]=slurm-client [scontrol]=slurm-client
  [munged]=munge [ip]=iproute2 [unshare]=util-linux [nsenter]=util-linux
)
missing=()
packages=()
for bin in slurmctld slurmd sbatch scontrol munged ip unshare nsenter; do
  if ! command -v "$bin" >/dev/null 2>&1; then
    missing+=("$bin")
    [[ " ${packages[*]} " == *" ${package_of[$bin]} "* ]] || packages+=("${package_of[$bin]}")
  fi
done
if ((${#missing[@]} == 0)); then
  echo "install_slurm: slurmctld, slurmd, slurm client, munge, ip, unshare and nsenter already installed"
  exit 0
fi

if [[ $(id -u) != 0 ]]; then
  echo "install_slurm: missing ${missing[*]} and not root: skipping (the SLURM tests will skip)"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_slurm: missing ${missing[*]} and no apt-get on this system: skipping (the SLURM tests will skip)"
  exit 0
fi

echo "install_slurm: installing ${packages[*]} (missing: ${missing[*]})"
export DEBIAN_FRONTEND=noninteractive
# The package lists may be absent in a fresh container; refresh them only when an install fails.
if ! apt-get install -y -q "${packages[@]}" >/dev/null 2>&1; then
  apt-get update -q >/dev/null 2>&1 || true
  if ! apt-get install -y -q "${packages[@]}"; then
    echo "install_slurm: apt-get install failed (offline?): skipping (the SLURM tests will skip)"
    exit 0
  fi
fi
echo "install_slurm: done"
exit 0
