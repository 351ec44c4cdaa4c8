#!/usr/bin/env bash
# System packages fedge's tests and benchmarks use, from Debian's archive.
# Best effort: without root or apt the Python set-up still proceeds, and the
# tests that need these files skip with a message saying how to get them.
set -uo pipefail
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then exit 0; fi
need=()
[[ -d /usr/share/datasets/fashion-mnist ]] || need+=(dataset-fashion-mnist)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if ((${#need[@]})); then
  apt-get update -qq >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 \
    || echo "setup: could not install ${need[*]} (tests that need them will skip)" >&2
fi
exit 0
