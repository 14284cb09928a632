#!/usr/bin/env bash
# Set up and run sdclip's main job on a fresh clone, on the bundled model sdclip-mini (no checkpoint,
# no network): encode prompts to SD-style conditioning, draw pictures of colour x shape pairs the
# model never saw in training, and classify them zero-shot.  Results go to out/main-job/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
out=out/main-job
rm -rf "$out" && mkdir -p "$out"

echo "== 1. prompts -> conditioning (sdclip encode, bundled model sdclip-mini) ==" >&2
sdclip encode "a (red star:1.2) above a blue square" "a small green circle on a dark background" \
  --dialect a1111 --negative "a purple cross" --out "$out/conditioning.safetensors"

echo "== 2. four pictures of held-out colour x shape pairs (sdclip shapes) ==" >&2
sdclip shapes --out "$out/pictures" --n 4 --seed 2 --held-out

echo "== 3. zero-shot classification of those pictures (sdclip zeroshot) ==" >&2
sdclip zeroshot "$out"/pictures/*.png \
  --labels "red star,red circle,blue square,blue triangle,orange cross,orange hexagon,purple star,purple square"
