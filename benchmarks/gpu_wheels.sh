#!/usr/bin/env bash
# Download into .whl/ the wheels that the GPU machine's stack (Python 3.12, torch 2.11, torchvision 0.26,
# Lightning 2.6, timm as installed there) lacks for selfsup, built for CPython 3.12 on manylinux x86_64, so they
# can travel to a machine without network access:
#
#   bash benchmarks/gpu_wheels.sh                      # here, where pip reaches the package index
#   pip install --no-index --no-deps .whl/*.whl        # there (see benchmarks/README.md, "GPU check")
#
# kornia (+ kornia_rs) is imported by selfsup.data.augment; jsonargparse (+ docstring_parser, typeshed_client)
# by selfsup.cli; webdataset (+ braceexpand) serves the tar-shard source (pyproject). wandb is not needed:
# selfsup does not import it, and timm and Lightning import it only where it is installed. Pure-python wheels
# match any platform, so the one command fetches them too. Versions are those of the development environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=(kornia==0.9.0 kornia_rs==0.2.0 jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0
        webdataset==1.0.2 braceexpand==0.1.7)
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
ls -l .whl
