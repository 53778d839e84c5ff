#!/usr/bin/env bash
# Create .venv in the repo root if absent and install requirements.txt into it (idempotent).
# Also WordNet for DeCLIP's EDA text view (alip/text_aug.py): Debian's wordnet-base and
# wordnet-sense-index (apt-get, needs root), laid out as .venv/nltk_data/corpora/wordnet, which
# is on nltk's default data path. Without root it says how to get it and carries on (only
# DeCLIP's EDA needs it; alip.text_aug raises a clear error when it is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.requirements.sha
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d" " -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q -r requirements.txt
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi

wordnet_src=/usr/share/wordnet
if [ ! -f "$wordnet_src/data.noun" ] || [ ! -f "$wordnet_src/index.sense" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      wordnet-base wordnet-sense-index > /dev/null
  else
    echo "setup_env.sh: WordNet is not installed and this is not a root apt machine; DeCLIP's" \
         "EDA needs it: sudo apt-get install wordnet-base wordnet-sense-index, then rerun" >&2
  fi
fi
if [ -f "$wordnet_src/data.noun" ] && [ ! -f .venv/nltk_data/corpora/wordnet/lexnames ]; then
  .venv/bin/python -m alip.text_aug install-wordnet .venv/nltk_data
fi
