#!/usr/bin/env bash
# The test command (CI runs exactly this, through .ci/run): install requirements.txt when one of its packages is
# not installed, then the whole suite.
#
#   bash tests/run.sh               # the install check, then python -m pytest -q
#   bash tests/run.sh -k knn        # extra arguments go to pytest
#   PYTHON=.venv/bin/python bash tests/run.sh
#
# requirements.txt pins torch==2.13.0, which pip takes as the CPU build where that file lies on the machine. On a
# GPU machine install the CUDA build of torch 2.13.0 first: only a package that is not installed at all triggers
# the install, so it is kept (as is any package already present at another version).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

missing=$("$PYTHON" -c 'import importlib.metadata as m, re
names = [re.split(r"[\s<>=!~;\[]", line.split("#")[0].strip())[0] for line in open("requirements.txt")]
print(*[n for n in names if n and not list(m.distributions(name=n))])')
if [ -n "$missing" ]; then
  echo "tests/run.sh: not installed: $missing -> $PYTHON -m pip install -r requirements.txt" >&2
  "$PYTHON" -m pip install -r requirements.txt
fi

exec "$PYTHON" -m pytest -q "$@"
