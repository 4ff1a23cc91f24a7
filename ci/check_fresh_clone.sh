#!/usr/bin/env bash
# Run CI as it runs on a submission: a fresh clone of the committed main, then .ci/run.
# The clone gets its own virtual environment (seeing the system's packages), so its editable
# install does not replace the one of the checkout this is run from.
set -euo pipefail
repo="$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/midasflow"
python -m venv --system-site-packages "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
cd "$work/midasflow"
time CI=true bash .ci/run
