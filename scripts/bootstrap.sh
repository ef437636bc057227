#!/usr/bin/env bash
# Creates .venv with everything r1edge and its tests need, on a fresh Debian machine.
# torch==2.13.0 goes first: it is a local CPU wheel, while a bare `torch` would pull a
# multi-GB CUDA build as a dependency of the project.
# Where Node.js is installed, node-opcua-client goes into .node/ (git-ignored): the OPC UA
# tests use it as a client independent of the server's library (they skip without node).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v mbpoll >/dev/null 2>&1 || ! command -v openssl >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq mbpoll openssl >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[test]'
if command -v npm >/dev/null 2>&1 && [ ! -d .node/node_modules/node-opcua-client ]; then
    mkdir -p .node
    npm install --prefix .node --no-audit --no-fund --loglevel=error node-opcua-client@2 >/dev/null
fi
