#!/usr/bin/env bash
# Runs the GPU checks and benchmarks on a CUDA machine from prebuilt
# binaries (no Rust toolchain needed there).
#
# Usage: scripts/gpu-run.sh BIN_DIR LOG_DIR [PHASE...]
#   BIN_DIR  holds the release `mamba-serve` and tests/ with the test
#            executables built with `--features gpu-tests`.
#   LOG_DIR  receives env.log, tests.log, bench.log (tables and JSON lines)
#            and hf.log.
#   PHASE    any of: env tests tests-parallel server e2e profile ncu ab bench bench-quick hf hf-quick hf-rest
#            (default: env tests bench hf).
# Environment: SHAPES (bench/hf shapes, comma separated), BENCH_ARGS (extra
# flags for `mamba-serve bench`), THREADS and BASE_TESTS (tests-parallel).
#
# cudarc looks for unversioned (or .so.12) CUDA libraries; on machines that
# only ship libcublas.so.13 and friends this script links them under those
# names in a temporary folder on LD_LIBRARY_PATH.
set -uo pipefail
bin=${1:?BIN_DIR}
log=${2:?LOG_DIR}
shift 2
phases=${*:-env tests bench hf}
mkdir -p "$log"
here=$(cd "$(dirname "$0")" && pwd)
shapes=${SHAPES:-mamba-130m,mamba-370m,mamba-790m,mamba-1.4b,mamba-2.8b}

libdir=$(mktemp -d)
extra=""
for lib in libcublas libcublasLt libnvrtc; do
  if ! ldconfig -p 2>/dev/null | grep -q " $lib.so "; then
    f=$(find /usr/local/cuda/lib64 /usr/local/cuda/targets /usr/local /opt /usr/lib -name "$lib.so.[0-9]*" 2>/dev/null \
        | grep -v '\.alt\.' | head -1)
    if [ -n "$f" ]; then
      ln -sf "$f" "$libdir/$lib.so"
      extra="$extra:$(dirname "$f")"
    fi
  fi
done
export LD_LIBRARY_PATH="$libdir$extra${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

run() { # name timeout command...
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*" | tee -a "$log/$name.log"
  timeout "$limit" "$@" >>"$log/$name.log" 2>&1
  local rc=$?
  echo "=== $name exit $rc" | tee -a "$log/$name.log"
  return $rc
}

integration=$(ls "$bin"/tests/integration-* 2>/dev/null | head -1)
for phase in $phases; do
  case $phase in
    env)
      {
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
        ls -l "$libdir"
        echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
      } >>"$log/env.log" 2>&1
      ;;
    tests)
      MAMBA_TEST_REQUIRE_GPU=1 run tests 300 "$integration" cuda:: --test-threads=1 --nocapture
      ;;
    tests-parallel)
      # The same tests THREADS (3) at a time in one process, after a pass
      # one at a time has filled the driver's compile cache, so that each
      # test's buffers are recycled into the others' (a read of memory
      # nothing wrote shows as garbage or NaN; docs/perf-notes.md, version
      # 18); BASE_TESTS, another build's test executable, runs the same way
      # for comparison.
      MAMBA_TEST_REQUIRE_GPU=1 run tests 300 "$integration" cuda:: --test-threads=1
      MAMBA_TEST_REQUIRE_GPU=1 run tests-parallel 300 "$integration" cuda:: --test-threads="${THREADS:-3}"
      if [ -n "${BASE_TESTS:-}" ]; then
        MAMBA_TEST_REQUIRE_GPU=1 run tests-parallel-base 300 "$BASE_TESTS" cuda:: --test-threads="${THREADS:-3}"
      fi
      ;;
    server)
      # The server's integration tests on the GPU backend. The deployment
      # tests need nginx, and the client and quick-start tests the `openai`
      # package, which this machine lacks.
      MAMBA_TEST_SERVE_BIN="$PWD/$bin/mamba-serve" MAMBA_TEST_DEVICE=cuda run server 300 "$integration" --skip cuda:: --skip deploy:: \
        --skip the_openai_python_client_works --skip the_readme_quick_start_works_as_written --test-threads=4
      ;;
    e2e)
      # The server end to end against the engine alone, on the default model.
      model=${E2E_MODEL:-models/shakespeare-mamba}
      run e2e 120 "$bin/mamba-serve" bench --model "$model" --device cuda --prompt-len 64 --batch 1,64,256 --steps 64 --no-ceilings
      "$bin/mamba-serve" serve --model "$model" --device cuda --port 18080 >"$log/e2e-server.log" 2>&1 &
      srv=$!
      for _ in $(seq 1 100); do curl -sf http://127.0.0.1:18080/ready >/dev/null 2>&1 && break; sleep 0.2; done
      for c in 1 64 256; do
        run e2e 120 "$bin/mamba-serve" loadtest --url http://127.0.0.1:18080 --concurrency $c --requests $((c * 4 > 16 ? c * 4 : 16)) \
          --prompt-len 32 --max-tokens 256 --stream
      done
      kill -TERM $srv; wait $srv; echo "server exit $?" >>"$log/e2e.log"
      ;;
    bench | bench-quick)
      [ "$phase" = bench-quick ] && list=mamba-130m,mamba-1.4b || list=$shapes
      for s in ${list//,/ }; do
        survey=""
        [ "$s" = mamba-1.4b ] && survey=--gemm-survey
        run bench 240 "$bin/mamba-serve" bench --random-shape "$s" --device cuda --prompt-len 512,2048 --chunk 2048 \
          --batch 1,16,64,256,1024 --steps 64 $survey ${BENCH_ARGS:-}
      done
      run bench 120 "$bin/mamba-serve" bench --random-shape mamba-130m --device cuda --prompt-len 512 --chunk 2048 \
        --batch 1,64 --steps 64 --no-graphs --no-ceilings
      ;;
    profile)
      # Time per kernel (events around every launch, graphs off): the
      # 2048-token prefill, then decode steps at batch 1 and 256.
      s=${PROFILE_SHAPE:-mamba-1.4b}
      common=(bench --random-shape "$s" --device cuda --chunk 2048 --no-graphs --no-ceilings --prefill-runs 1)
      MAMBA_SERVE_CUDA_PROFILE=1 run profile 120 "$bin/mamba-serve" "${common[@]}" --prompt-len 2048 --batch 1 --steps 1
      MAMBA_SERVE_CUDA_PROFILE=1 run profile 120 "$bin/mamba-serve" "${common[@]}" --prompt-len 1 --batch 1 --steps 16
      MAMBA_SERVE_CUDA_PROFILE=1 run profile 120 "$bin/mamba-serve" "${common[@]}" --prompt-len 1 --batch 256 --steps 8
      ;;
    ab)
      # Decode with and without programmatic dependent launch, side by side
      # with the bench phase (mamba-130m and mamba-1.4b).
      for shape in mamba-130m mamba-1.4b; do
        run ab 120 env MAMBA_SERVE_NO_PDL=1 "$bin/mamba-serve" bench --random-shape "$shape" --device cuda --prompt-len 64 \
          --batch 1,16,64,256 --steps 64 --no-ceilings
      done
      ;;
    ncu)
      # Nsight Compute: the GPU time of every kernel (graphs off, so each
      # launch is seen; caches left as the previous kernel left them), as
      # CSV, for the 2048-token prefill and decode steps at batch 1, 16
      # and 256; then the hardware sections of the prefill scan and of the
      # decode GEMV.
      s=${PROFILE_SHAPE:-mamba-1.4b}
      ncu_bin=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      common=(bench --random-shape "$s" --device cuda --chunk 2048 --no-graphs --no-ceilings --prefill-runs 1 --steps 1)
      nc=("$ncu_bin" --clock-control none --cache-control none)
      times=(--csv --page raw --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum)
      run ncu 200 "${nc[@]}" "${times[@]}" --launch-count 500 --log-file "$log/ncu-prefill.csv" \
        "$bin/mamba-serve" "${common[@]}" --prompt-len 2048 --batch 1
      for b in ${NCU_BATCHES:-1 16 256}; do
        run ncu 200 "${nc[@]}" "${times[@]}" --launch-skip ${NCU_SKIP:-1500} --launch-count 700 --log-file "$log/ncu-decode-$b.csv" \
          "$bin/mamba-serve" "${common[@]}" --prompt-len 1 --batch "$b"
      done
      sections=(--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats)
      run ncu 200 "${nc[@]}" "${sections[@]}" -k regex:scan_tiled --launch-count 1 "$bin/mamba-serve" "${common[@]}" --prompt-len 2048 --batch 1
      run ncu 200 "${nc[@]}" "${sections[@]}" -k regex:gemv --launch-skip 600 --launch-count 4 "$bin/mamba-serve" "${common[@]}" --prompt-len 1 --batch 1
      ;;
    hf | hf-quick | hf-rest)
      case $phase in
        hf-quick) list=mamba-130m,mamba-1.4b ;;
        hf-rest) list=mamba-370m,mamba-790m,mamba-2.8b ;;
        *) list=$shapes ;;
      esac
      PYTHONUNBUFFERED=1 run hf 420 python3 "$here/hf_bench.py" --shapes "$list" --time-limit 300
      ;;
    *) echo "unknown phase $phase" >&2 ;;
  esac
done
echo "logs in $log: $(ls "$log")"
