#!/usr/bin/env bash
# Wheels for the GPU machine, whose image (Python 3.12, x86_64, no network) has torch, triton, transformers
# and accelerate but not the server's packages. Downloads into .whl/ (git-ignored through .git/info/exclude)
# the py3-none-any or cp312 manylinux x86_64 wheels of the packages `bench/gpu_suite.sh serve` needs that
# the image lacks, at the versions installed here (the versions the tests ran with).
#
# Usage, here:  bash bench/fetch_wheels.sh          (PYTHON=path/to/python picks the venv; default .venv)
# There (carry .whl), before the suite:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site
#
# What the image lacks (its package list, .library/device/KINDS.md): fastapi and its starlette, pydantic
# (pydantic-core, annotated-types, typing-inspection) and opentelemetry-api; uvicorn; openai and its
# jiter, sniffio and httpx2 (httpcore2, truststore); gguf; msgspec; pyzmq; xgrammar and its apache-tvm-ffi; and for the tests jsonschema (referencing,
# jsonschema-specifications, rpds-py, attrs). It has numpy, pyyaml, requests, tqdm, click,
# certifi, httpx and prometheus-client; of those with a lower bound above an old release we carry our own
# (typing-extensions, anyio, idna, h11, annotated-doc, prometheus-client: tiny), so the image's version
# never matters.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
NAMES=(fastapi starlette pydantic pydantic-core annotated-types typing-inspection opentelemetry-api uvicorn
       openai jiter sniffio httpx2 httpcore2 truststore gguf
       typing-extensions anyio idna h11 annotated-doc prometheus-client msgspec pyzmq xgrammar apache-tvm-ffi
       jsonschema jsonschema-specifications referencing rpds-py attrs)

grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
# name==version as installed here; one version of each in .whl (two would stop the whole install there).
mapfile -t PINS < <("$PYTHON" - "${NAMES[@]}" <<'EOF'
import importlib.metadata as metadata
import sys

for name in sys.argv[1:]:
    print(f"{name}=={metadata.version(name)}")
EOF
)
for name in "${NAMES[@]}"; do
  find .whl -maxdepth 1 -iname "${name//-/_}-*.whl" -delete
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl "${PINS[@]}"
ls -1 .whl
du -ch .whl/*.whl | tail -1
