#!/usr/bin/env bash
# The README's real-digits job as a newcomer runs it, timed: a fresh clone of this repository, a new
# virtual environment on top of the installed torch, the package with its data extra, then
# `cld-fast train --data mnist5k` with its defaults (the preset's 6,000 steps, torch's default threads,
# then sampling, the Frechet distance with its floor, and the sampler table).
#
#   bash bench/fresh_clone_mnist5k.sh [WORKDIR]      # default WORKDIR: /tmp/cld_fast_fresh_clone
#
# Writes bench/results/mnist5k-fresh-clone-cpu.md / .json and the sample grid
# bench/results/mnist5k-fresh-clone-samples.png in the repository it is run from
# (`python -m bench.fresh_clone_report`). Needs about 70 minutes on an idle 2-core CPU; run it on an
# otherwise idle machine, as its wall time is the result.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/tmp/cld_fast_fresh_clone}
rm -rf "$work"
mkdir -p "$work"
git clone -q "$repo" "$work/clone"
python -m venv --system-site-packages "$work/venv"
uptime > "$work/load.log"
(while true; do sleep 60; uptime >> "$work/load.log"; done) &
sampler=$!
trap 'kill $sampler 2>/dev/null || true' EXIT
start=$(date +%s)
(
  source "$work/venv/bin/activate"
  cd "$work/clone"
  pip install --no-build-isolation -e ".[data]" > "$work/install.log" 2>&1
  echo $(( $(date +%s) - start )) > "$work/install_seconds"
  cld-fast train --data mnist5k > "$work/train.log" 2>&1
)
end=$(date +%s)
installed=$(cat "$work/install_seconds")
cd "$repo"
python -m bench.fresh_clone_report --clone "$work/clone" --train-log "$work/train.log" --load-log "$work/load.log" \
  --install-seconds "$installed" --train-seconds $(( end - start - installed ))
