#!/usr/bin/env bash
# Set up and run sdclip's main job on a fresh clone.
# Until the bundled model lands, the main job tokenizes example prompts with the bundled CLIP vocabulary.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
echo "== sdclip tokenize (bundled CLIP BPE vocabulary) ==" >&2
sdclip tokenize "a photo of an astronaut riding a horse on mars" \
  "masterpiece, best quality, (a red fox:1.2) in the snow, 東京, café" \
  "an émoji 🦊 &amp; HTML entities"
