#!/usr/bin/env bash
# Creates tools/golden/.venv-gguf for check_gguf.py: llama-cpp-python (builds its vendored llama.cpp, commit
# 0c1e5709, from source: a few minutes on 2 cores), the gguf reader, and that llama.cpp's converter scripts under
# .venv-gguf/src/llama.cpp (run with tools/golden/.venv's torch; see setup.sh). Only the GGUF check needs it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv="$here/.venv-gguf"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q -r "$here/requirements-gguf.txt" --no-binary llama-cpp-python
# The converter is in the source distribution, not in the wheel.
mkdir -p "$venv/src"
url=$("$venv/bin/python" -c "import json, urllib.request; d = json.load(urllib.request.urlopen('https://pypi.org/pypi/llama-cpp-python/0.3.36/json')); print(next(u['url'] for u in d['urls'] if u['packagetype'] == 'sdist'))")
"$venv/bin/python" -c "import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])" "$url" "$venv/src/sdist.tar.gz"
tar -xzf "$venv/src/sdist.tar.gz" -C "$venv/src" --strip-components=2 llama_cpp_python-0.3.36/vendor/llama.cpp
rm "$venv/src/sdist.tar.gz"
"$venv/bin/python" -c "import llama_cpp, importlib.metadata as m; print('llama-cpp-python', llama_cpp.__version__, 'gguf', m.version('gguf'))"
