#!/usr/bin/env bash
# The README's test command, one copy-paste on a fresh Debian machine (as root, or with sudo):
#   1. Debian's chromium + chromium-driver for the report tests, if missing;
#   2. the project with its `dev` extra (every package the tests import);
#   3. the whole suite, offline; extra arguments go to pytest (e.g. -k browse, -x).
# Safe to run again: installed packages are left as they are. Exits with pytest's status (5 when no
# test ran, so an empty run is never green).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

missing=()
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=()
  [ "$(id -u)" = 0 ] || sudo=(sudo)
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_and_test.sh: install ${missing[*]} with your system's package manager (no apt-get here)" >&2
    exit 1
  fi
  echo "installing Debian packages: ${missing[*]}" >&2
  "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=600 update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >/dev/null
fi

python -m pip install -q -e ".[dev]"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec python -m pytest -q "$@"
