#!/usr/bin/env bash
# Measure `weir serve` on two grpcio releases with the same load (issue: grpc.aio unary throughput
# regressed from 1.75.1, grpc/grpc#43092). Builds a side venv with the other release, then serves the
# demo repository from each venv in turn (twice, alternating, to see the noise), server pinned to
# CPU 0 and `weir bench` to CPU 1, loopback only.
#
#   bench/grpcio_versions.sh [OTHER_GRPCIO_VERSION]     (default 1.85.1; the project pins 1.74.0)
set -euo pipefail
cd "$(dirname "$0")/.."
other=${1:-1.85.1}
side=/tmp/weir-grpcio-$other
if [ ! -x "$side/bin/python" ]; then
  python3 -m venv "$side"
  "$side/bin/pip" install -q torch==2.13.0
  "$side/bin/pip" install -q "grpcio==$other" "grpcio-health-checking==$other" "grpcio-reflection==$other" \
    numpy uvloop prometheus-client redis "protobuf>=6.31.1"
  "$side/bin/pip" install -q --no-deps -e .
fi
.venv/bin/python examples/build_demo_repository.py --out build/demo-repository >/dev/null
port=18701
for venv in .venv "$side" .venv "$side"; do
  log=$(mktemp)
  taskset -c 0 "$venv/bin/python" -m weir.cli serve --model-repository build/demo-repository \
    --listen-address 127.0.0.1 --grpc-port $port --metrics-port -1 \
    --model-control-mode explicit --load-model mlp_classifier 2>"$log" &
  pid=$!
  for _ in $(seq 150); do grep -q '"server started"' "$log" && break; sleep 0.2; done
  version=$("$venv/bin/python" -c "import grpc; print(grpc.__version__)")
  out=bench/results/grpcio-$version-$(date +%s)
  taskset -c 1 .venv/bin/python -m weir.cli bench --url 127.0.0.1:$port --model mlp_classifier \
    --concurrency 1,8,32 --duration 8 --warmup 2 --processes 1 --label "grpcio-$version" --out "$out" >/dev/null
  echo "== grpcio $version ($out)"
  grep -E '^\| c=[0-9]+ \| [0-9,]+ \| [0-9.,]+ \|' "$out/results.md" | cut -d'|' -f2-7
  kill -TERM $pid; wait $pid
  rm -f "$log"
done
