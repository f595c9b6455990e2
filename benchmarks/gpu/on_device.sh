#!/usr/bin/env bash
# Run ON THE GPU MACHINE (device tool), from the repo root: bash benchmarks/gpu/on_device.sh STEP...
# Steps (in the order given; results under $OUT):
#   setup      wheels of .whl/.servewhl (whichever were carried) into /tmp/site-*, ahead of the image's
#              packages on PYTHONPATH; builds native/ (carry lithos_ray/proto/agent_pb2*.py: the
#              image has no grpc_tools to generate them)
#   ray-part   keeps the carried .raywhl/part_* in /tmp for a later call (the machine stays warm 30 s)
#   ray        joins every part (kept or carried, in name order) and installs ray 2.60.0
#   native     GPU tests of the shim (tests/test_native_gpu.py) and the whole overhead benchmark (~5 min)
#   gpu-tests  the GPU tests of the shim alone (~2 min; GPU_TESTS_K=EXPR: only those pytest -k selects)
#   profile    benchmarks/native/overhead.py --profile (the end-to-end A/B with per-section launch timers, ~1.5 min)
#   correctness  benchmarks/native/correctness.py (bitwise results with and without the shim)
#   overhead-ab  benchmarks/native/overhead.py --in-process-only (launch and step A/B in one process, ~2 min)
#   launch-cpu benchmarks/native/launch_path_cpu.py (the shim's own work per launch on this CPU, warm/cold, ~1 min)
#   interference benchmarks/native/interference.py (an LC BERT next to a matmul job under MPS, ~2.5 min)
#   interference-graph  the same, a CUDA-graph BERT next to a matmul, a memory-bound copy loop and the benchmark's
#              ResNet-50 training step (~2 min): which neighbour slows a graph service on TPCs of its own?
#   colocate   lithos-ray bench colocate, all systems (COLOCATE_BUDGET_S, default 500 s; ~9 minutes)
#   colocate-lending  solo, static and lithos only, both mixes (about 5 minutes), lending decided at launch
#                     time (--dispatch off, the default until 3ff5789)
#   colocate-pace-always  the same with best-effort borrowers pacing always
#   colocate-pace-off     the same with pacing off (a borrower whose queue is too deep keeps its own TPCs)
#   dispatch   held launches (LITHOS_DISPATCH): their GPU tests and correctness.py --dispatch (~3 min)
#   colocate-dispatch     colocate-lending with the best-effort job's launches held (--dispatch on, the default)
#   colocate-decompose    solo, static, static_lc_alone, static_held, lithos, lithos_lc_alone (~6.5 min): the
#                         services' tail apart from the best-effort job (quota size vs interference)
#   colocate-loop         (COLOCATE_BUDGET_S, default 400 s) solo, static, lithos and lithos_loop (the agent's lending control loop during the phase;
#                         ~7 min): does "latency-critical borrowers first" change tails and best-effort throughput?
#   colocate-unroll       graph variant only: solo, static, lithos, lithos_lc_alone, lithos_unroll (~7.5 min): do
#                         services under CUDA graphs gain when their replays are unrolled so that kernels borrow?
#   colocate-lc-heavy     colocate-dispatch with the services on 7+7 / 14 of the 15 groups: the best-effort
#                         job lives mostly on lent TPCs (LithOS's own set-up)
#   borrow-training       benchmarks/native/borrow_training.py (ResNet-50 training next to an idle lender, 5 modes, ~5 min)
#   borrow-ceiling        the same, 1 trial, without `lending`: what the dispatcher thread alone changes (~2 min)
#   graph-context  benchmarks/native/graph_context_probe.py (can a graph's kernels move to another green
#              context without a new capture? ~30 s; no MPS)
#   leak-probe     benchmarks/native/leak_probe.py (which training kernels run unconfined, on which allowance shapes,
#              and the shim's reason; ~2 min; no MPS)
#   wide-cluster   benchmarks/native/wide_cluster_probe.py (can a 16-CTA cluster of one CTA per SM run inside a green
#              context of 16-SM co-scheduled groups? which 8-SM groups lie in each; ~20 s; no MPS)
#   reclaim        benchmarks/native/reclaim_probe.py (an owner's launch after idling to its whole quota running, on the
#              GPU's clock: lithos lending against static, plain MPS and the owner alone; ~1 min; starts MPS)
#   memory-ops     benchmarks/native/memory_op_probe.py (do device-to-device copies and memsets need SMs, and does a
#              green context confine them? ~15 s; no MPS)
#   graph-nodes    benchmarks/native/graph_nodes_probe.py (what the benchmark's CUDA graphs hold: could the shim
#              unroll their replays? ~1 min; no MPS)
#   node-tests tests/test_gpu_node.py (the agent on the real GPU; no ray needed)
#   ray-tests  tests/test_gpu_node.py tests/test_gpu_ray.py (needs ray)
#   serve      examples/serve_three_models.py on the real GPU, eager then --cuda-graphs (needs ray and .servewhl)
#   serve-lending-ab  the same, eager, with the agent's lending off then on (LITHOS_LENDING=0/1)
# The checkout there has no .git: pass LITHOS_COMMIT=<sha> (git rev-parse --short HEAD here).
# Calls back to back (the machine keeps /tmp while warm: 30 s after a call; one call runs <= 600 s; the
# working tree (~32 MB with benchmarks/results) plus what is carried must stay under 64 MiB, so the
# 25 MiB parts of ray (aa, ab, ac, and a small ad) go one per call):
#   1. carry [.whl, .servewhl, .raywhl/part_ad, proto stubs]
#      LITHOS_COMMIT=... bash benchmarks/gpu/on_device.sh setup ray-part native       (~6.5 min)
#   2. carry [.raywhl/part_aa, proto stubs]  ... ray-part colocate                    (the whole comparison, ~9 min)
#   3. carry [.raywhl/part_ab, proto stubs]  ... ray-part overhead-ab launch-cpu
#   4. carry [.raywhl/part_ac, proto stubs]  ... ray ray-tests serve
#   (LITHOS_COMMIT=... must prefix the script, so every step records it)
#   Held launches: carry [.whl, proto stubs]  ... setup gpu-tests dispatch borrow-training (~7 min), then
#   carry [proto stubs]  ... colocate-dispatch (~6 min). Copy what comes back into benchmarks/results/ at once.
#   Where the services' tail goes: call 1 with `setup ray-part gpu-tests graph-context colocate-decompose`.
#   At 083c31c: carry [.whl, proto stubs] ... setup memory-ops gpu-tests interference-graph, then ... colocate-loop, then
#   the full comparison (colocate); results *_083c31c.* in benchmarks/results/. Then ... setup reclaim (fc8918f:
#   reclaim_probe_fc8918f.json). Unrolling with held launches (not
#   yet run): colocate_run by hand, e.g. python3 -m benchmarks.colocate --systems solo,lithos,lithos_unroll --variants
#   graph --dispatch all --trials 2 --budget-s 300 --out-dir "$OUT".
# (a later call's setup installs only what it carried; earlier wheels stay in /tmp/site-* while warm)
set -uo pipefail
: "${OUT:?run this through the device tool (OUT unset)}"
: "${LITHOS_COMMIT:?pass LITHOS_COMMIT=<sha>}"
# Carried wheels come first (ray's serve needs grpcio >= 1.85.1; the image has 1.84), one folder per
# wheel set: pip --target replaces a shared namespace folder (google/) instead of merging it.
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled PATH=/tmp/site-ray/bin:$PATH \
  PYTHONPATH=/tmp/site-whl:/tmp/site-servewhl:/tmp/site-ray:$PWD
status=0
step() { echo "=== $1 ($(date -u +%H:%M:%S))"; }
# both mixes, 2 trials: colocate_run TAG BUDGET_S SYSTEMS [extra args of benchmarks.colocate]
colocate_run() {
  local tag=$1 budget=$2 systems=$3; shift 3
  timeout $((budget + 60)) python3 -m benchmarks.colocate --systems "$systems" --trials 2 --budget-s "$budget" "$@" \
    --tag "$tag" --out-dir "$OUT" 2>&1 | tee "$OUT/colocate_${tag}_console.txt" | tail -40
}
# solo, static and lithos, short: colocate_short TAG [extra args]
colocate_short() {
  local tag=$1; shift
  colocate_run "$tag" 300 solo,static,lithos "$@"
}
for s in "$@"; do
  step "$s"
  case $s in
    setup)
      for d in whl servewhl; do
        [ -d .$d ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-$d .$d/*.whl
      done
      make -C native >/dev/null && mkdir -p lithos_ray/_lib && cp native/build/liblithos.so lithos_ray/_lib/ || status=1
      nvidia-smi --query-gpu=name,driver_version --format=csv,noheader ;;
    ray-part) mkdir -p /tmp/rw && cp .raywhl/part_* /tmp/rw/ ;;
    ray)
      mkdir -p /tmp/rw && cp .raywhl/part_* /tmp/rw/ 2>/dev/null
      cat /tmp/rw/part_* > /tmp/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl &&
        python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site-ray /tmp/ray-2.60.0-*.whl || status=1 ;;
    native)
      timeout 150 python3 -m pytest -v -rs tests/test_native_gpu.py 2>&1 | tee "$OUT/native_gpu_tests.txt" | tail -15 || status=1
      timeout 390 python3 benchmarks/native/overhead.py "$OUT" 2>&1 | tail -20 || status=1 ;;
    gpu-tests)
      timeout 220 python3 -m pytest -v -s -rs tests/test_native_gpu.py ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} 2>&1 |
        tee "$OUT/native_gpu_tests.txt" | tail -15 || status=1 ;;
    profile)
      timeout 240 python3 benchmarks/native/overhead.py "$OUT" --profile 2>&1 | tail -60 || status=1 ;;
    overhead-ab)
      timeout 200 python3 benchmarks/native/overhead.py "$OUT" --in-process-only 2>&1 | tail -30 || status=1 ;;
    launch-cpu)
      timeout 200 python3 benchmarks/native/launch_path_cpu.py "$OUT" --repeat 3 2>&1 | tail -14 || status=1 ;;
    interference)
      timeout 240 python3 benchmarks/native/interference.py "$OUT" 2>&1 | cut -c1-400 | tail -12 || status=1 ;;
    interference-graph)
      timeout 200 python3 benchmarks/native/interference.py "$OUT" \
        lc_solo_graph,lc_graph_be8192,lc_graph_be_membw,lc_graph_be_membw_copies_unrouted,lc_graph_be_membw_kernel,lc_graph_be_resnet50_train 2>&1 | cut -c1-400 | tail -8 || status=1 ;;
    correctness)
      timeout 300 python3 benchmarks/native/correctness.py "$OUT" 2>&1 | tail -20 || status=1 ;;
    colocate)
      timeout "$((${COLOCATE_BUDGET_S:-500} + 50))" python3 -m benchmarks.colocate --trials 2 \
        --budget-s "${COLOCATE_BUDGET_S:-500}" --out-dir "$OUT" 2>&1 |
        tee "$OUT/colocate_console.txt" | tail -40 || status=1 ;;
    colocate-lending) colocate_short lending --dispatch off || status=1 ;;
    colocate-pace-always) colocate_short pace_always --dispatch off --lend-pace always || status=1 ;;
    colocate-pace-off) colocate_short pace_off --dispatch off --lend-pace off || status=1 ;;
    dispatch)
      timeout 200 python3 -m pytest -v -rs tests/test_native_gpu.py -k "held or attribute" 2>&1 | tee "$OUT/dispatch_gpu_tests.txt" | tail -8 || status=1
      timeout 300 python3 benchmarks/native/correctness.py "$OUT" 0-31 --dispatch 2>&1 | tail -12 || status=1 ;;
    colocate-dispatch) colocate_short dispatch --dispatch on || status=1 ;;
    colocate-decompose)
      colocate_run decompose 380 solo,static,static_lc_alone,static_held,lithos,lithos_lc_alone || status=1 ;;
    colocate-loop) colocate_run loop "${COLOCATE_BUDGET_S:-400}" solo,static,lithos,lithos_loop || status=1 ;;
    colocate-unroll)
      colocate_run unroll 400 solo,static,lithos,lithos_lc_alone,lithos_unroll --variants graph || status=1 ;;
    colocate-lc-heavy) colocate_short lc_heavy --dispatch on --lc-groups inference=7,7 --lc-groups hybrid=14 || status=1 ;;
    borrow-training)
      timeout 500 python3 benchmarks/native/borrow_training.py "$OUT" 2>&1 | tail -30 || status=1 ;;
    borrow-ceiling)
      timeout 300 python3 benchmarks/native/borrow_training.py "$OUT" --trials 1 \
        --modes own_only,own_held,held,whole_gpu 2>&1 | tail -30 || status=1 ;;
    graph-context)
      timeout 120 python3 benchmarks/native/graph_context_probe.py "$OUT" 2>&1 | tail -15 || status=1 ;;
    leak-probe)
      timeout 400 python3 benchmarks/native/leak_probe.py "$OUT" 2>&1 | tail -20 || status=1 ;;
    memory-ops)
      timeout 120 python3 benchmarks/native/memory_op_probe.py "$OUT" 2>&1 | tail -10 || status=1 ;;
    reclaim)
      timeout 300 python3 benchmarks/native/reclaim_probe.py "$OUT" 2>&1 | tail -10 || status=1 ;;
    wide-cluster)
      timeout 120 python3 benchmarks/native/wide_cluster_probe.py "$OUT" 2>&1 | tail -30 || status=1 ;;
    graph-nodes)
      timeout 200 python3 benchmarks/native/graph_nodes_probe.py "$OUT" 2>&1 | cut -c1-600 | tail -6 || status=1 ;;
    node-tests)
      timeout 200 python3 -m pytest -v -rs tests/test_gpu_node.py 2>&1 | tee "$OUT/node_gpu_tests.txt" | tail -8 || status=1 ;;
    ray-tests)
      timeout 300 python3 -m pytest -v -s -rs tests/test_gpu_node.py tests/test_gpu_ray.py 2>&1 |
        tee "$OUT/ray_gpu_tests.txt" | tail -20 || status=1 ;;
    serve)
      timeout 240 python3 examples/serve_three_models.py --seconds 20 2>&1 | tee "$OUT/serve_three_models.txt" | tail -30 || status=1
      timeout 240 python3 examples/serve_three_models.py --seconds 20 --cuda-graphs 2>&1 |
        tee "$OUT/serve_three_models_graphs.txt" | tail -12 || status=1
      echo "--- the shim's notices in the Ray workers' logs (count, line)"
      grep -h "lithos:" /tmp/ray/session_latest/logs/worker-*.err 2>/dev/null | sort | uniq -c | sort -rn | head -20 ;;
    serve-lending-ab)
      for lending in 0 1; do
        echo "--- LITHOS_LENDING=$lending (eager)"
        LITHOS_LENDING=$lending timeout 200 python3 examples/serve_three_models.py --seconds 15 2>&1 |
          tee "$OUT/serve_three_models_lending$lending.txt" | grep -v raylet | tail -14 || status=1
      done ;;
    *) echo "unknown step $s"; status=2 ;;
  esac
done
exit $status
