#!/usr/bin/env bash
# The README's main job, on the embedded default (the shipped demo model, local Ray, no Redis, no GPU, no downloads):
#   1. local inference with ola_model: a picture and a spoken question -> a streamed answer;
#   2. the same request through the platform: `ola serve` (five Ray Serve apps behind the gRPC proxy) and
#      `ola chat`, which streams the text and writes the sentence-wise speech to a WAV file.
set -euo pipefail
cd "$(dirname "$0")/.."
OLA=.venv/bin/ola
OUT=${DEMO_DIR:-.cache/demo}
QUESTION=${1:-What do you see and hear?}
PORT=${DEMO_PORT:-9000}
mkdir -p "$OUT"

echo "== 1. local inference (ola demo)"
"$OLA" demo --out "$OUT" --max-new-tokens 48 "$QUESTION"

echo "== 2. serving: ola serve on 127.0.0.1:$PORT"
"$OLA" serve --port "$PORT" --ray-temp-dir "$PWD/.cache/ray" >"$OUT/serve.log" 2>&1 &
serve_pid=$!
trap 'kill -INT $serve_pid 2>/dev/null; wait $serve_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  grep -q "ready at" "$OUT/serve.log" 2>/dev/null && break
  kill -0 $serve_pid 2>/dev/null || { cat "$OUT/serve.log"; echo "ola serve failed" >&2; exit 1; }
  sleep 1
done
grep -q "ready at" "$OUT/serve.log" || { cat "$OUT/serve.log"; echo "ola serve did not become ready" >&2; exit 1; }

echo "== 3. ola chat: text streams to stdout, speech goes to $OUT/answer.wav"
"$OLA" chat --target "127.0.0.1:$PORT" --image "$OUT/media/shapes.png" --audio "$OUT/media/question.wav" \
  --speak "$OUT/answer.wav" --max-new-tokens 48 "$QUESTION"
echo "speech written to $OUT/answer.wav"
