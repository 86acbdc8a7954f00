#!/usr/bin/env bash
# Build the wheels the GPU image lacks into .whl/ (git-ignored), for bench/gpu_check.sh to install there.
#
# The lent GPU machine (Python 3.12, torch 2.11 CUDA, transformers 5.17, peft, timm, torchvision) has no
# network and no deepspeed / webdataset / braceexpand. deepspeed is published as an sdist only and
# builds no ops (DS_BUILD_OPS=0), so `pip wheel` gives a pure-Python wheel; its requirements missing
# there are hjson and pydantic (pydantic-core is compiled: the cp312 manylinux x86_64 wheel).
# Run once here (needs PyPI), then pass `.whl` in the device tool's `carry` list.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
# pure-Python (built here from sdists where that is all PyPI has)
python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8 webdataset==1.0.2 braceexpand==0.1.7 hjson==3.1.0 \
    pydantic==2.13.4 annotated-types==0.7.0 typing-inspection==0.4.2 typing_extensions==4.16.0
# compiled: the GPU machine's interpreter, not this one's
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl pydantic-core==2.46.4
ls -l .whl
du -sh .whl
