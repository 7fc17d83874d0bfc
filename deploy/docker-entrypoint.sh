#!/bin/sh
# Peers must reach a worker at an address of its own, not the 0.0.0.0 it binds to: unless told
# otherwise, advertise this container's first IP address (Kubernetes sets PDSERVE_ADVERTISE_HOST
# to the pod IP itself, through the downward API).
set -e
if [ -z "${PDSERVE_ADVERTISE_HOST:-}" ]; then
    PDSERVE_ADVERTISE_HOST="$(hostname -i 2>/dev/null | awk '{print $1}')"
    export PDSERVE_ADVERTISE_HOST
fi
exec "$@"
