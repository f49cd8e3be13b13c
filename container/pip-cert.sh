#!/usr/bin/env bash
# For image builds behind a proxy that re-signs TLS: copy the CA bundle pip trusts on this host
# (PIP_CERT, else pip's `cert` setting) into container/build-ca/, and print the build argument
# that names it. Prints nothing where pip uses the default trust store.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cert=${PIP_CERT:-}
[ -n "$cert" ] || cert=$(python3 -m pip config get global.cert 2>/dev/null || true)
if [ -n "$cert" ] && [ -f "$cert" ]; then
  dest=$ROOT/container/build-ca/pip-cert.pem
  cmp -s "$cert" "$dest" || cp "$cert" "$dest"
  echo "--build-arg PIP_CERT_FILE=container/build-ca/pip-cert.pem"
fi
