#!/bin/bash
# Make the wheels folder that launch/gpu/validate.sh installs from on a machine without
# internet (a GPU machine that has torch, transformers, pillow and pytest, nothing more).
#
#   bash launch/gpu/make_wheels.sh [--python-version 3.12] [DIR]    # DIR: launch/gpu/wheels
#
# Run it anywhere with pip and internet (any Python >= 3.10), then copy DIR next to the
# checkout on the GPU machine (or point WHEELS at it). It holds only what the package and
# the gpu tests import and such a machine lacks, at the versions the test suite runs
# against (constraints.txt, or the versions named here for what it does not pin):
#
#   deepspeed       built here as a py3-none-any wheel (`pip wheel --no-deps`; PyPI has only
#                   its source, which `pip install --no-index` cannot build without setuptools
#                   and a network), no ops pre-built: they are JIT-built where needed;
#   megatron-core   a binary wheel for the target Python (cp312 exists for 0.16.1);
#   DeepSpeed's dependencies that torch and transformers do not bring: hjson, pydantic,
#                   pydantic-core (binary, so per Python version), annotated-types,
#                   typing-inspection, einops, msgpack, ninja, py-cpuinfo, psutil;
#   the data pipeline's: webdataset, braceexpand.
#
# Everything comes with --no-deps, so no torch, nvidia-* or CUDA wheel can be dragged in:
# DIR holds 14 wheels, about 8 MB (2.2 MB DeepSpeed, 2.6 MB megatron-core, 2.1 MB pydantic-core,
# ...). --python-version defaults to this Python's (the CI test builds for
# the Python it runs); the GPU machine's is 3.12. Needs ~15 s (DeepSpeed's build).
set -euo pipefail

PYTHON=${PYTHON:-python3}
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TARGET_PY=""
DIR=""
while (($#)); do
  case $1 in
    --python-version) TARGET_PY=$2; shift 2 ;;
    --python-version=*) TARGET_PY=${1#*=}; shift ;;
    -h | --help) sed -n '2,25p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "make_wheels: unknown option $1" >&2; exit 2 ;;
    *) DIR=$1; shift ;;
  esac
done
TARGET_PY=${TARGET_PY:-$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
DIR=${DIR:-$REPO_DIR/launch/gpu/wheels}
if [[ ! $TARGET_PY =~ ^3\.[0-9]+$ ]]; then
  echo "make_wheels: --python-version wants X.Y, got '$TARGET_PY'" >&2
  exit 2
fi

# pin NAME: NAME==version from constraints.txt (the versions the test suite runs against)
pin() {
  local version
  version=$(sed -n "s/^$1==\([^ #]*\).*/\1/ip" "$REPO_DIR/constraints.txt" | head -n 1)
  if [[ -z $version ]]; then
    echo "make_wheels: $1 is not pinned in constraints.txt" >&2
    exit 2
  fi
  echo "$1==$version"
}

# Not in constraints.txt (they come with deepspeed there): the versions the suite runs with.
DEEPSPEED_DEPS=(
  hjson==3.1.0
  pydantic==2.13.4
  pydantic-core==2.46.4
  annotated-types==0.7.0
  typing-inspection==0.4.2
  einops==0.8.2
  msgpack==1.2.4
  ninja==1.13.2
  py-cpuinfo==9.0.0
  psutil==7.2.2
)
BINARY=(
  "$(pin megatron-core)"
  "$(pin webdataset)"
  braceexpand==0.1.7
  "${DEEPSPEED_DEPS[@]}"
)

mkdir -p "$DIR"
echo "[make_wheels] Python $TARGET_PY wheels into $DIR"
# A pip-wide constraints file (PIP_CONSTRAINT, pip.conf) would only narrow what we pin here.
"$PYTHON" -m pip wheel -q --no-deps --wheel-dir "$DIR" "$(pin deepspeed)"
# pip does not widen manylinux_2_28 to older glibc tags by itself: name the ones wheels use.
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --dest "$DIR" \
  --python-version "$TARGET_PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform any \
  "${BINARY[@]}"
if compgen -G "$DIR/torch-*" >/dev/null || compgen -G "$DIR/nvidia*" >/dev/null; then
  echo "make_wheels: a torch or nvidia wheel landed in $DIR; remove it" >&2
  exit 1
fi
echo "[make_wheels] $(find "$DIR" -name '*.whl' | wc -l) wheels, $(du -sh "$DIR" | cut -f1)"
