#!/usr/bin/env bash
# Checks that the packaging metadata (pyproject.toml + setup.py) is accepted by old setuptools:
# pyproject.toml allows setuptools >= 64, and a GPU machine may have any of them, where
# `setup.py build_ext --inplace` reads the same metadata before it compiles anything. For each
# version given, a throwaway venv with that setuptools (cached under .venv/setuptools-VERSION/)
# runs `setup.py --version` and `setup.py egg_info` on a copy of the metadata with
# VTK_NO_EXTENSION=1 (no torch, no compiler), and the metadata must name the package, its version
# and its license.
#
# Usage: tools/check_setuptools.sh VERSION...   (PYTHON=python3.X to pick the interpreter)
set -u

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
[ $# -gt 0 ] || { echo "usage: $0 SETUPTOOLS_VERSION..."; exit 2; }

version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/pyproject.toml" | head -n 1)"
failed=0
for st in "$@"; do
  venv="$root/.venv/setuptools-$st"
  if [ ! -f "$venv/.stamp" ]; then
    rm -rf "$venv"
    if ! { "$python" -m venv "$venv" && "$venv/bin/python" -m pip install -q --disable-pip-version-check \
             "setuptools==$st" wheel; } >"$root/.venv/setuptools-$st.log" 2>&1; then
      echo "FAIL setuptools $st: could not create its venv (see .venv/setuptools-$st.log)"
      failed=1
      continue
    fi
    touch "$venv/.stamp"
  fi
  got="$("$venv/bin/python" -c 'import setuptools; print(setuptools.__version__)')"
  # A copy of what setup.py reads, so that egg_info writes nothing into the tree.
  work="$(mktemp -d)"
  cp "$root/pyproject.toml" "$root/setup.py" "$root/README.md" "$work/"
  # Every package pyproject.toml lists (subpackages included), Python sources only.
  (cd "$root" && find vtkernels -name '*.py' -not -path '*/__pycache__/*' -print0 \
     | xargs -0 -I{} sh -c 'mkdir -p "$1/$(dirname "$2")" && cp "$2" "$1/$2"' _ "$work" {})
  mkdir -p "$work/vtkernels/assets"
  log="$work/log"
  if ! (cd "$work" && VTK_NO_EXTENSION=1 "$venv/bin/python" setup.py --version >"$log" 2>&1); then
    echo "FAIL setuptools $got: setup.py --version"
    sed 's/^/    /' "$log"
    failed=1
  elif [ "$(tail -n 1 "$log")" != "$version" ]; then
    echo "FAIL setuptools $got: setup.py --version printed '$(tail -n 1 "$log")', expected '$version'"
    failed=1
  elif ! (cd "$work" && VTK_NO_EXTENSION=1 "$venv/bin/python" setup.py -q egg_info >"$log" 2>&1); then
    echo "FAIL setuptools $got: setup.py egg_info"
    sed 's/^/    /' "$log"
    failed=1
  else
    info="$work/vtkernels.egg-info/PKG-INFO"
    if grep -qx "Name: vtkernels" "$info" && grep -qx "Version: $version" "$info" \
       && grep -Eqx "License(-Expression)?: Apache-2.0" "$info"; then
      echo "ok   setuptools $got: metadata read ($(grep -E '^License' "$info" | head -n 1))"
    else
      echo "FAIL setuptools $got: PKG-INFO lacks the name, version or license:"
      sed 's/^/    /' "$info"
      failed=1
    fi
  fi
  rm -rf "$work"
done
exit $failed
