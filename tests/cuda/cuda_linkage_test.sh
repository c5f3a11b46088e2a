#!/bin/sh
# Which executables load the CUDA runtime (model/cuda_backend.h): the GPU ones must (else
# `--device cuda` has no backend), the service ones must not (its static TLS would leave their
# metrics server's 100 KB civetweb threads too little stack), and none may load cuBLAS at start
# (cuBLASLt's 94 KB of TLS; it is opened with dlopen, model/cuda/cublas_loader.h).
# Usage: cuda_linkage_test.sh --gpu EXE... --cpu EXE...
set -eu
kind=""
failed=0
for arg in "$@"; do
  case "$arg" in
    --gpu | --cpu) kind=$arg; continue ;;
  esac
  [ -n "$kind" ] || { echo "usage: $0 --gpu EXE... --cpu EXE..."; exit 2; }
  libs=$(ldd "$arg") || { echo "FAIL: ldd $arg"; exit 1; }
  name=$(basename "$arg")
  bad=""
  if echo "$libs" | grep -q 'libcudart'; then
    [ "$kind" = --gpu ] || bad="loads the CUDA runtime"
  else
    [ "$kind" = --cpu ] || bad="lacks the CUDA runtime (no CUDA backend)"
  fi
  if echo "$libs" | grep -q 'libcublas'; then bad="${bad:+$bad; }loads cuBLAS at start"; fi
  if [ -n "$bad" ]; then
    echo "FAIL: $name $bad"
    failed=1
  else
    echo "ok   $name ($kind)"
  fi
done
exit "$failed"
