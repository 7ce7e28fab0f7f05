#!/usr/bin/env bash
# One call on the GPU machine: GPU tests, then the benchmarks; logs and JSON results under $OUT.
# Usage (from the repo root there): SCALEINFER_COMMIT=<sha> bash bench/gpu_suite.sh [tests|latency|throughput|prefill|offload|kv_tier|inject|encoder|moe|startup|serve|all]
# (the copy of the tree there has no .git: pass the commit so the results record it)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
what=${1:-all}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if [[ $what == tests || $what == all ]]; then
  python3 -m pytest -q -m gpu tests/test_gpu.py tests/kernels tests/layers tests/weights tests/offload 2>&1 \
    | tee "$OUT/gpu_tests.log"
fi
if [[ $what == latency || $what == all ]]; then
  # PEERS: a copy of ../shared/peers carried beside the tree (gpt-fast runs from it); without it, no peer
  peers=${PEERS:+--gpt-fast $PEERS}
  python3 bench/latency.py --shape llama3-8b --quantization bf16,int8,int4,fp8 $peers 2>&1 | tee "$OUT/latency-llama3-8b.log"
  python3 bench/latency.py --shape llama3-1b 2>&1 | tee "$OUT/latency-llama3-1b.log"
  # int4 rows: tinygemm, the GEMM on its layout (a sweep of tiles) and dequant+cuBLAS; q8_0 and int8 GEMVs. Over
  # 200 s on an H200: give it its own call.
  python3 bench/decode_gemms_quant.py --shape llama3-8b --schemes int4 --int4-rows 16,32,64,128 2>&1 \
    | tee "$OUT/gemms-quant-int4.log"
  python3 bench/decode_gemms_quant.py --shape llama3-8b --schemes q8_0,int8,fp8 --int4-rows 16,64,256,512 2>&1 \
    | tee "$OUT/gemms-quant.log"
  python3 bench/profile_step.py --shape llama3-8b 2>&1 | tail -45 | tee "$OUT/profile.log"
  python3 bench/decode_gap.py --shape llama3-8b 2>&1 | tee "$OUT/decode_gap.log"
  # issue 20's FP8 KV target: the decode step of 64 sequences at 4k context, bf16 against e4m3 pages
  for kv in auto fp8; do
    python3 bench/profile_step.py --batch 64 --prompt-len 4096 --kv-cache-gib 40 --kv-cache-dtype $kv 2>&1 \
      | head -40 | tee "$OUT/profile-64x4k-$kv.log"
  done
  python3 bench/decode_attention_tiles.py --cases 64x4096,256x512,256x2048r,1x4096 2>&1 | tee "$OUT/decode-attention-tiles.log"
fi
if [[ $what == throughput || $what == all ]]; then
  python3 bench/throughput.py --shape llama3-8b --num-requests 512 --hf-batch-size 64 \
    --min-prompt 128 --max-prompt 1024 --min-output 128 --max-output 512 2>&1 | tee "$OUT/throughput.log"
  # issue 20's targets (FP8 weights at 1.5x bf16, the FP8 KV cache) and issue 16's token budget: HF once, ours per run
  python3 bench/throughput.py --shape llama3-8b --num-requests 256 --hf-batch-size 64 \
    --runs bf16,fp8,fp8:fp8,bf16:auto:8192 --min-prompt 128 --max-prompt 1024 --min-output 128 --max-output 512 \
    2>&1 | tee "$OUT/throughput-runs.log"
  python3 bench/throughput.py --shape llama3-8b --num-requests 64 --hf-batch-size 64 --runs bf16,bf16:fp8 \
    --min-prompt 4096 --max-prompt 4096 --min-output 256 --max-output 256 2>&1 | tee "$OUT/throughput-4k.log"
fi
if [[ $what == prefill || $what == all ]]; then
  python3 bench/prefill.py --shape llama3.1-8b 2>&1 | tee "$OUT/prefill.log"
fi
if [[ $what == offload || $what == all ]]; then
  # ZeRO-Inference on one GPU: pinned CPU memory (with HF accelerate in the same run), then NVMe files.
  # The 70B shape and --ranks 2 need a 2-GPU machine (256 GB of RAM): see README.
  python3 bench/offload.py --shape llama3-8b 2>&1 | tee "$OUT/offload-cpu.log"
  # int4 layers over PCIe against DeepSpeed's bf16 (needs the peers' wheels installed: PEERS above)
  python3 bench/offload.py --shape llama3-8b --quantization bf16,int4 --deepspeed --skip-flexgen --skip-hf \
    --batches 1 2>&1 | tee "$OUT/offload-int4.log"
  python3 bench/offload.py --shape llama3-8b --offload nvme --offload-path /tmp --batches 1 --new-tokens 3 \
    --skip-flexgen --skip-hf 2>&1 | tee "$OUT/offload-nvme.log"
fi
if [[ $what == kv_tier || $what == all ]]; then
  # The FlexGen workload with half the KV blocks it needs: swap to pinned host memory against recompute.
  python3 bench/kv_tier.py --shape llama3-8b 2>&1 | tee "$OUT/kv_tier.log"
fi
if [[ $what == inject || $what == all ]]; then
  # One process per shape, a few minutes each (HF compiles twice: batch 1 and 32). Under a 10-minute call
  # limit split it: INJECT_SHAPES="gpt2-xl pythia-2.8b" ... inject, INJECT_SHAPES=llama3-8b ... inject, then
  # the encoder target (which inject runs itself only when INJECT_SHAPES is unset).
  for shape in ${INJECT_SHAPES:-gpt2-xl pythia-2.8b llama3-8b}; do
    python3 bench/inject.py --shape "$shape" 2>&1 | tee "$OUT/inject-$shape.log"
  done
fi
if [[ $what == encoder || ( ($what == inject || $what == all) && -z ${INJECT_SHAPES:-} ) ]]; then
  python3 bench/encoder.py 2>&1 | tee "$OUT/encoder.log"
fi
if [[ $what == moe || $what == all ]]; then
  # issue 14: the MoE decode path's tiles, then both shapes against their active-weight floors
  python3 bench/moe_decode_tiles.py --shape qwen3-30b-a3b --batches 1,2,4 2>&1 | tee "$OUT/moe-tiles-qwen3.log"
  python3 bench/moe_decode_tiles.py --shape mixtral-8x7b --batches 1,8 2>&1 | tee "$OUT/moe-tiles-mixtral.log"
  for shape in qwen3-30b-a3b mixtral-8x7b; do
    python3 bench/moe.py --shape $shape --skip-hf 2>&1 | tee "$OUT/moe-$shape.log"
  done
fi
if [[ $what == startup || $what == all ]]; then
  python3 bench/startup.py --shape llama3-8b 2>&1 | tail -3 | tee "$OUT/startup.log"
fi
if [[ $what == serve || $what == all ]]; then
  # The image lacks the server's packages (fastapi, uvicorn, openai, ...): run `bash bench/fetch_wheels.sh` here
  # first and carry .whl; they are installed there as
  #   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  # and /tmp/site goes first on PYTHONPATH (for this target only: it comes last in `all`).
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
  for clients in 128 256; do
    python3 bench/serve_load.py --shape llama3-8b --num-requests 512 --concurrency $clients --max-model-len 2048 \
      --min-prompt 128 --max-prompt 1024 --min-output 128 --max-output 512 2>&1 | tee "$OUT/serve-$clients.log"
  done
fi
find bench/results -name "*.json" -newer "$OUT/gpu.txt" -exec cp {} "$OUT/" \;
