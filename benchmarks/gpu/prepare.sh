#!/usr/bin/env bash
# Run HERE (the CPU machine, repo root) before a GPU session: fetches what the GPU machine lacks as
# wheels for its Python 3.12 into git-excluded folders that device calls carry.
#   .whl/          lithos_ray's own needs (pydantic, grpcio, protobuf, jsonschema, ...)   ~11 MB
#   .raywhl/       ray 2.60.0 split in three parts of <= 25 MiB (a call carries 64 MiB with the tree) ~77 MB
#   .servewhl/     what ray[default,serve] needs beyond that, minus what the GPU image has ~20 MB
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
for d in .whl .raywhl .servewhl; do grep -qx "/$d/" .git/info/exclude || echo "/$d/" >> .git/info/exclude; done
get() {  # get DIR REQUIREMENT...
  local dir=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$dir" "$@"
}
get .whl pydantic==2.13.4 pydantic-core==2.46.4 annotated-types typing-inspection protobuf==7.36.2 \
  grpcio==1.85.1 jsonschema jsonschema-specifications referencing rpds-py
mkdir -p /tmp/lithos-raywhl && get /tmp/lithos-raywhl ray==2.60.0
rm -rf .raywhl && mkdir .raywhl && split -b 25M /tmp/lithos-raywhl/ray-2.60.0-*.whl .raywhl/part_
get .servewhl aiohttp aiohttp_cors aiohappyeyeballs aiosignal frozenlist multidict propcache yarl colorful \
  opencensus opencensus-context google-api-core googleapis-common-protos proto-plus prometheus_client \
  opentelemetry-sdk opentelemetry-api opentelemetry-semantic-conventions opentelemetry-exporter-prometheus \
  opentelemetry-proto smart_open wrapt msgpack fastapi starlette annotated-doc anyio uvicorn h11 httptools \
  watchfiles websockets python-dotenv grpcio-reflection mmh3 click google-auth pyasn1-modules pyasn1 cryptography cffi pycparser
du -sh .whl .raywhl/* .servewhl
