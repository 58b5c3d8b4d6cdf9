#!/usr/bin/env bash
# The one-H200 runs of the GPU-runs issue, in two device commands of under 10 minutes each:
#   bash bench/device.sh bash bench/one_h200.sh speed   $OUT   # baseline vs megatrain bf16 vs FP8 recipes
#   bash bench/device.sh bash bench/one_h200.sh masks   $OUT   # document-mask cost, FP8 loss parity
set -uo pipefail
phase=$1 out=$2
mkdir -p "$out"
case "$phase" in
  speed)
    MT=kernels=auto
    python bench/run_bench.py --budget-s 540 --steps 12 --warmup 4 --out "$out/speed" \
      --run hf:tinyllama:16 --run mt:tinyllama:16:$MT --run mt:tinyllama:16:$MT,fp8=tensorwise \
      --run mt:tinyllama:16:$MT,fp8=rowwise --run hf:llama3.2-1b:8 --run mt:llama3.2-1b:8:$MT \
      --run mt:llama3.2-1b:8:$MT,fp8=tensorwise 2>&1 | tail -60
    ;;
  masks2)
    timeout 200 python bench/documents.py --preset llama3.2-1b --seq 8192 --mb 1 --docs 8 --attention-only \
      --steps 8 --warmup 3 > "$out/documents.log" 2>&1; echo "documents rc=$?"; tail -22 "$out/documents.log"
    timeout 330 python bench/fp8_parity.py --preset tinyllama-1.1b --seq 2048 --mb 16 --steps 300 --lr 3e-4 \
      --recipes tensorwise --fp8_filter auto --out "$out/parity" --work /tmp/parity > "$out/parity.log" 2>&1
    echo "parity rc=$?"; grep -v "^step" "$out/parity.log" | tail -12
    ;;
  parity-compiled)
    timeout 300 python bench/fp8_parity.py --preset tinyllama-1.1b --seq 2048 --mb 16 --steps 100 --lr 3e-4 \
      --recipes tensorwise --fp8_filter auto --ref-compile --out "$out/parity" --work /tmp/parity > "$out/parity.log" 2>&1
    echo "parity rc=$?"; grep -v "^step" "$out/parity.log" | tail -12
    ;;
  masks)
    timeout 250 python bench/documents.py --preset llama3.2-1b --seq 8192 --mb 1 --docs 8 --attention-only \
      --steps 8 --warmup 3 > "$out/documents.log" 2>&1; echo "documents rc=$?"; tail -25 "$out/documents.log"
    timeout 300 python bench/fp8_parity.py --preset tinyllama-1.1b --seq 2048 --mb 4 --steps 300 \
      --recipes tensorwise --fp8_filter auto --out "$out/parity" --work /tmp/parity > "$out/parity.log" 2>&1
    echo "parity rc=$?"; tail -25 "$out/parity.log"
    ;;
esac
