#!/usr/bin/env bash
# The README's first command: install everything, start the mesh, answer a demo call end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
printf '\033[1m==> starting the mesh\033[0m\n'
.venv/bin/tiermesh up
printf '\033[1m==> demo: embedding a question through Envoy\033[0m\n'
.venv/bin/tiermesh embed "Can I afford a \$25,000 car loan on \$4,000 a month?"
printf '\033[1m==> demo: the knowledge-base passages for a question (retriever through Envoy)\033[0m\n'
.venv/bin/tiermesh search "Can my lender charge me for paying off my car loan early?" -k 3
printf '\033[1m==> demo: the intent and entities of a question (classifiers through Envoy)\033[0m\n'
.venv/bin/tiermesh classify "Can I consolidate \$12k of card debt from Chase into one loan next March?"
cat <<'TIP'

The mesh keeps running. Next:
  .venv/bin/tiermesh ask "How does refinancing a car loan work?" --stream
  .venv/bin/tiermesh keys create --name my-app      an API key for the REST API on :8000 (/docs)
  .venv/bin/tiermesh status            health and addresses
  .venv/bin/tiermesh index list        knowledge-base index versions (* = live)
  .venv/bin/tiermesh models list       model versions (* = live); tiermesh train --help to retrain
  .venv/bin/buf curl --protocol grpc --http2-prior-knowledge --list-services http://127.0.0.1:8080
  .venv/bin/tiermesh down              stop it
TIP
