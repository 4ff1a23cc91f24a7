#!/usr/bin/env bash
# Run CI exactly as it runs on a submission: a fresh clone of the committed main, then .ci/run.
set -euo pipefail
repo="$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/midasflow"
cd "$work/midasflow"
time CI=true bash .ci/run
