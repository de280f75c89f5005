#!/bin/sh
# The image's entry point: `pagemesh "$@"`, after two things compose may hand over as files
# (mounted under /run/secrets, so that no value appears on a command line or in `docker inspect`):
#
# - ca_bundle: a CA bundle for networks that intercept TLS; pip (the default model's download)
#   and the Hugging Face hub client then trust it.
# - api_keys: the gateway's API keys, one per line (# starts a comment), unless PAGEMESH_API_KEY
#   is set already; the gateway reads them from its environment.
set -eu
if [ -s /run/secrets/ca_bundle ]; then
  export PIP_CERT=/run/secrets/ca_bundle REQUESTS_CA_BUNDLE=/run/secrets/ca_bundle \
    SSL_CERT_FILE=/run/secrets/ca_bundle
fi
if [ -s /run/secrets/api_keys ] && [ -z "${PAGEMESH_API_KEY:-}" ]; then
  PAGEMESH_API_KEY="$(sed -e 's/#.*//' -e 's/[[:space:]]//g' /run/secrets/api_keys | grep -v '^$' | paste -sd, -)"
  export PAGEMESH_API_KEY
fi
exec pagemesh "$@"
