#!/usr/bin/env bash
# Run a command in a fresh network namespace whose only interface is `lo` (brought up).
#   tests/e2e/loopback-only.sh CMD [ARGS...]
# Everything that must talk to each other (Synapse, coturn, the interop peers, the agent)
# has to run inside the same namespace: start them all from CMD (e.g. a test binary or a
# script). The namespace disappears when its last process exits; nothing to clean up.
# Why: libwebrtc (the node peer) binds and gathers ICE candidates on every interface that
# has an address; with only `lo` present it can use 127.0.0.1/::1 and nothing else.
set -euo pipefail
if [ $# -eq 0 ]; then
    echo "usage: $0 CMD [ARGS...]" >&2
    exit 2
fi
if [ "$(id -u)" -eq 0 ]; then
    flags=(--net)
else
    flags=(--map-root-user --net) # unprivileged: a user namespace owns the new netns
fi
exec unshare "${flags[@]}" -- /bin/sh -c 'ip link set lo up && exec "$@"' loopback-only "$@"
