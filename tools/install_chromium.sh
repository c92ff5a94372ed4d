#!/usr/bin/env bash
# Install Debian's headless-capable `chromium` for the MLflow UI end-to-end test
# (tests/e2e/test_mlflow_ui.py). Idempotent: when chromium is already installed it only
# prints its version. Needs root (apt-get) on a machine where it is missing.
set -euo pipefail

if command -v chromium >/dev/null; then
    chromium --version
    exit 0
fi
if [[ $EUID -ne 0 ]]; then
    echo "install_chromium.sh: chromium is missing and installing it needs root: sudo $0" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# Other setup scripts (the SLURM cluster) may be running apt at the same time: wait for the lock.
apt-get -o DPkg::Lock::Timeout=600 update -qq
apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends chromium >/dev/null
chromium --version
