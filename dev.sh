#!/usr/bin/env bash
# One entry point for a fresh machine: installs what lockstep needs, then runs it.
#   bash dev.sh demo   # the main job: model check, CPU/gloo run, conformance, diagrams, report
#   bash dev.sh test   # the test suite (what CI runs)
#   bash dev.sh <any lockstep subcommand and options>
set -euo pipefail
here=$PWD
cmd=${1:-demo}; shift || true
cmd_is_accel=0; [ "$cmd" = accel ] && cmd_is_accel=1
cd "$(dirname "$0")"
VENV=.venv
stamp=$VENV/.lockstep-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  if ! command -v dot >/dev/null 2>&1 || ! command -v spin >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      (apt-get update -qq && apt-get install -y -qq graphviz spin >/dev/null) \
        || echo "dev.sh: apt-get install graphviz spin failed; diagrams/SPIN cross-check will be skipped" >&2
    fi
  fi
  [ -x $VENV/bin/python ] || python3 -m venv $VENV
  # torch is pinned to the CPU wheel: an unpinned torch pulls a multi-GB CUDA build.
  $VENV/bin/pip install -q --disable-pip-version-check "torch==2.13.0" -e ".[test]" 2>&1 \
    | grep -v "^WARNING: Location" || true
  $VENV/bin/python -c "import torch, z3, networkx, hypothesis" || { echo "dev.sh: install failed" >&2; exit 1; }
  touch "$stamp"
fi
# The compiled build of the driver modules (lockstep/accel.py): rebuilds only what has no
# build of its current source; without Cython or a C compiler it says so and all runs as
# Python. LOCKSTEP_PURE=1 skips it (and runs pure).
if [ "${LOCKSTEP_PURE:-0}" = 0 ] && [ "$cmd_is_accel" = 0 ]; then
  $VENV/bin/lockstep accel build >&2 || echo "dev.sh: compiled build failed; running pure" >&2
fi
case "$cmd" in
  test)
    set +e
    $VENV/bin/python -m pytest "$@"
    rc=$?
    set -e
    # pytest exits 5 when it collected no tests: that is a failure of the suite, not a pass.
    if [ $rc -eq 5 ]; then echo "dev.sh: pytest collected no tests" >&2; exit 1; fi
    exit $rc ;;
  *)
    # The caller's directory: relative paths (--out r) mean what they say.
    lockstep=$PWD/$VENV/bin/lockstep
    cd "$here"
    exec "$lockstep" "$cmd" "$@" ;;
esac
