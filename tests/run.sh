#!/usr/bin/env bash
# The test command (CI runs exactly this, through .ci/run): install requirements.txt and
# requirements-dev.txt when one of their packages is not installed, check the style (ruff: lines of
# at most 100 characters, ruff.toml), then the whole suite in TEST_WORKERS processes (pytest-xdist,
# default 2; a test file stays in one process, so its module fixtures are made once).
#
#   bash tests/run.sh               # the install check, ruff, then python -m pytest -q -n 2
#   bash tests/run.sh -k knn        # extra arguments go to pytest
#   TEST_WORKERS=0 bash tests/run.sh   # one process, as python -m pytest -q
#   PYTHON=.venv/bin/python bash tests/run.sh
#
# requirements.txt pins torch==2.13.0, which pip takes as the CPU build where that file lies on the
# machine. On a GPU machine install the CUDA build of torch 2.13.0 first: only a package that is not
# installed at all triggers the install, so it is kept (as is any package already present at another
# version).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

for req in requirements.txt requirements-dev.txt; do
  missing=$("$PYTHON" -c 'import importlib.metadata as m, re, sys
names = [re.split(r"[\s<>=!~;\[]", line.split("#")[0].strip())[0] for line in open(sys.argv[1])]
print(*[n for n in names if n and not list(m.distributions(name=n))])' "$req")
  if [ -n "$missing" ]; then
    echo "tests/run.sh: not installed: $missing -> $PYTHON -m pip install -r $req" >&2
    "$PYTHON" -m pip install -r "$req"
  fi
done

if ! "$PYTHON" -m ruff format --check --quiet .; then
  echo "tests/run.sh: ruff format would change the files above (run: ruff format .)" >&2
  exit 1
fi
"$PYTHON" -m ruff check --quiet .
exec "$PYTHON" -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
