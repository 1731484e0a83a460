#!/usr/bin/env bash
# Creates tools/golden/.venv with the pinned reference stack (transformers, PEFT, LLaMA-Factory, torch).
# Only the fixture generators need it; building and testing ferrotune never does.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python3 -m venv "$here/.venv"
"$here/.venv/bin/pip" install -q -r "$here/requirements.txt"
"$here/.venv/bin/python" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
