#!/usr/bin/env bash
# Prints the path of a Python >= 3.12 for the accelerator environments (make aurora-env):
# $PYTHON if set, else the first python3.12/python3.13/python3.14 on PATH that runs, else pyenv's
# ($PYENV_VERSION, default 3.12.1). Exits 1 with a message naming the fix when there is none.
ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }
if [ -n "${PYTHON:-}" ]; then
  if ok "$PYTHON"; then command -v "$PYTHON"; exit 0; fi
  echo "PYTHON=$PYTHON is not a Python >= 3.12 that runs; set PYTHON to one (python3.12 or newer)" >&2; exit 1
fi
for c in python3.12 python3.13 python3.14; do
  if command -v "$c" >/dev/null && ok "$c"; then "$c" -c 'import sys; print(sys.executable)'; exit 0; fi
done
if command -v pyenv >/dev/null; then
  v=${PYENV_VERSION:-3.12.1}
  p="$(pyenv root)/versions/$v/bin/python3"
  if [ -x "$p" ] && ok "$p"; then echo "$p"; exit 0; fi
fi
echo "no Python >= 3.12 found (tried \$PYTHON, python3.12/3.13/3.14 on PATH, pyenv's ${PYENV_VERSION:-3.12.1}); " \
     "install one (e.g. pyenv install 3.12) or pass PYTHON=/path/to/python3.12" >&2
exit 1
