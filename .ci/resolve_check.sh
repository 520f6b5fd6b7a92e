#!/usr/bin/env bash
# Checks that modjax resolves for CPython 3.12 and 3.13 on Linux x86_64 (the machines here have
# only 3.11). uv resolves from the packages' metadata alone (PyPI's metadata files; nothing is
# installed or compiled), all at once:
#   * 3.12 and 3.13 with constraints.txt: the tested set, with every extra (test, notebooks, tpu,
#     cuda12);
#   * 3.12 (Colab's Python) without constraints: what the notebooks' install cell asks for, from
#     the ranges in pyproject.toml.
# Wheels only, for glibc 2.31 and later (Colab, the TPU VM images), except the packages published
# only as source: rouge-score and promise (pure Python) everywhere and, on 3.13, editdistance
# (seqio's; a C++ extension with no cp313 wheel, so a 3.13 install compiles it).
# Needs uv (in the test extra) and PyPI. Prints one line per resolve; exit status 1 if any fails.
set -euo pipefail
cd "$(dirname "$0")/.."

PLATFORM=x86_64-manylinux_2_31
SOURCE_ONLY=(rouge-score promise)
SOURCE_ONLY_313=(editdistance)

command -v uv >/dev/null || {
  echo "error: uv not found; install the test extra: pip install -c constraints.txt -e \".[test]\"" >&2
  exit 2
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

resolve() { # NAME PYTHON ARGS...: resolves pyproject.toml for PYTHON into $work/NAME.txt
  local name=$1 python=$2 package
  shift 2
  local source_only=("${SOURCE_ONLY[@]}")
  [[ $python != 3.13 ]] || source_only+=("${SOURCE_ONLY_313[@]}")
  local args=(--only-binary :all:)
  for package in "${source_only[@]}"; do args+=(--no-binary "$package"); done
  uv pip compile --quiet --no-header --python-version "$python" --python-platform "$PLATFORM" \
    "${args[@]}" "$@" pyproject.toml -o "$work/$name.txt" >"$work/$name.log" 2>&1
}

declare -A JOBS=()
resolve tested-3.12 3.12 -c constraints.txt --extra test --extra tpu --extra cuda12 &
JOBS[tested-3.12]=$!
resolve tested-3.13 3.13 -c constraints.txt --extra test --extra tpu --extra cuda12 &
JOBS[tested-3.13]=$!
resolve ranges-3.12 3.12 --extra notebooks --extra tpu --extra cuda12 &
JOBS[ranges-3.12]=$!

failed=0
for name in tested-3.12 tested-3.13 ranges-3.12; do
  if wait "${JOBS[$name]}"; then
    count=$(grep -c '==' "$work/$name.txt")
    jax=$(grep -m1 '^jax==' "$work/$name.txt")
    torch=$(grep -m1 '^torch==' "$work/$name.txt")
    echo "resolves: $name ($count packages; $jax, $torch)"
  else
    echo "does not resolve: $name" >&2
    sed 's/^/  /' "$work/$name.log" >&2
    failed=1
  fi
done
exit "$failed"
