#!/usr/bin/env bash
# Creates .venv with everything r1edge and its tests need, on a fresh Debian machine, saying
# what it installs as it goes (a step and its seconds on stderr; a fresh machine takes minutes).
# torch==2.13.0 goes first: it is a local CPU wheel, while a bare `torch` would pull a
# multi-GB CUDA build as a dependency of the project.
# Where Node.js is installed, node-opcua-client goes into .node/ (git-ignored): the OPC UA
# tests use it as a client independent of the server's library (they skip without node).
set -euo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
step() { echo "bootstrap: $* ..." >&2; STEP=$SECONDS; }
done_step() { echo "bootstrap:   done in $((SECONDS - STEP)) s" >&2; }

if ! command -v mbpoll >/dev/null 2>&1 || ! command -v openssl >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    step "installing mbpoll and openssl (Debian packages: an independent Modbus client and TLS peer the tests use)"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq mbpoll openssl >/dev/null
    done_step
else
    echo "bootstrap: mbpoll and openssl already installed" >&2
fi
if [ ! -x .venv/bin/python ]; then
    step "creating the virtual environment .venv"
    python3 -m venv .venv
    done_step
fi
step "upgrading pip in .venv"
.venv/bin/python -m pip install -q --upgrade pip
done_step
step "installing torch==2.13.0 (the CPU wheel)"
.venv/bin/python -m pip install -q torch==2.13.0
done_step
step "installing r1edge (editable) with its dependencies and the test extra (pytest, transformers, mkdocs, ...)"
.venv/bin/python -m pip install -q -e '.[test]'
done_step
if command -v npm >/dev/null 2>&1 && [ ! -d .node/node_modules/node-opcua-client ]; then
    step "installing node-opcua-client into .node/ (an independent OPC UA client for the tests)"
    mkdir -p .node
    npm install --prefix .node --no-audit --no-fund --loglevel=error node-opcua-client@2 >/dev/null
    done_step
fi
echo "bootstrap: ready in $((SECONDS - START)) s: $(.venv/bin/r1edge --version)" >&2
