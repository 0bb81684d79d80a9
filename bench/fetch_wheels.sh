#!/usr/bin/env bash
# Download, on a machine with a package index, the wheels the GPU machine lacks, into ./.whl
# (git-ignored). gpu_check.sh installs whatever lies in ./.whl before it runs; a GPU machine with
# no network gets them by copying the folder along with the tree.
#
#   bash bench/fetch_wheels.sh            (Liger Kernel, pure Python; torch and triton are expected there)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d .whl "liger-kernel==0.8.5"
ls -l .whl
