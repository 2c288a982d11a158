#!/usr/bin/env bash
# Regenerate docs/tensorboard.png: the SmolLM2 SFT example with pictures on, a local TensorBoard, headless Chromium.
# Needs Debian's chromium (apt-get install -y chromium) and the `examples` extra (matplotlib, trl, gguf).
#   bash docs/screenshot.sh [OUTPUT_DIR]      (the example's run, a few minutes of CPU training)
set -euo pipefail
out=${1:-/tmp/shot}
bin=$(dirname "$(command -v python)")
python examples/sft_smollm2.py --output-dir "$out" --images 2
port=$(python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$bin/tensorboard" --logdir "$out/runs" --host 127.0.0.1 --port "$port" >"$out/tensorboard.log" 2>&1 &
tb=$!
trap 'kill $tb' EXIT
for _ in $(seq 60); do curl -sf -o /dev/null "http://127.0.0.1:$port/data/runs" && break; sleep 1; done
# forceSVG: TensorBoard's WebGL line charts do not draw reliably in headless Chromium; SVG ones do.
filter=$(python -c "import urllib.parse; print(urllib.parse.quote(r'intruders_total$|intruder_energy_share$|intruder_grid|(cosine|spectrum)/model.layers.6.mlp.up_proj', safe=''))")
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --window-size=1400,1250 \
  --virtual-time-budget=30000 --run-all-compositor-stages-before-draw --screenshot=docs/tensorboard.png \
  "http://127.0.0.1:$port/?forceSVG=true&smoothing=0&runFilter=%5Espectral%24&tagFilter=$filter#timeseries"
