#!/usr/bin/env bash
# End-to-end check of the interop peer against itself on a real Synapse:
# bob answers, alice calls (video), both must connect and receive audio and video.
#   tests/interop/selftest.sh [WORKDIR]
# Runs itself inside a loopback-only network namespace (tests/e2e/loopback-only.sh).
# Needs: tests/e2e/setup.sh (Synapse venv) and `npm ci` in tests/interop (done here if missing).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

if [ -z "${LOOPBACK_ONLY_NS:-}" ]; then
    LOOPBACK_ONLY_NS=1 exec "$REPO/tests/e2e/loopback-only.sh" "$0" "$@"
fi

WORK="${1:-$REPO/target/e2e/interop-selftest}"
rm -rf "$WORK"
mkdir -p "$WORK"
PY="$("$REPO/tests/e2e/setup.sh")"
VENV="$(dirname "$(dirname "$PY")")"
if [ ! -d "$HERE/node_modules/@roamhq/wrtc" ]; then
    (cd "$HERE" && npm ci --no-audit --no-fund >&2)
fi
S="python3 $REPO/tests/e2e/synapse.py"

BOB_PID=""
cleanup() {
    if [ -n "$BOB_PID" ] && kill -0 "$BOB_PID" 2>/dev/null; then kill "$BOB_PID" || true; fi
    $S stop --dir "$WORK/synapse" || true
}
trap cleanup EXIT

INFO="$($S start --venv "$VENV" --dir "$WORK/synapse" --port 0)"
BASE="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["base_url"])' "$INFO")"
ALICE="$($S register --dir "$WORK/synapse" --user alice --password alice-pw)"
BOB="$($S register --dir "$WORK/synapse" --user bob --password bob-pw)"
ROOM="$($S create-room --dir "$WORK/synapse" --user alice --password alice-pw --invite "$BOB")"
echo "selftest: synapse $BASE, room $ROOM" >&2

node "$HERE/peer.mjs" --homeserver "$BASE" --user "$BOB" --password bob-pw --answer \
    --max-wait-s 60 >"$WORK/bob.json" 2>"$WORK/bob.log" &
BOB_PID=$!
for _ in $(seq 1 300); do
    grep -q "waiting for an incoming call" "$WORK/bob.log" 2>/dev/null && break
    kill -0 "$BOB_PID" 2>/dev/null || break
    sleep 0.1
done

t0=$(date +%s%N)
set +e
node "$HERE/peer.mjs" --homeserver "$BASE" --user "$ALICE" --password alice-pw --call "$ROOM" \
    --duration-s "${DURATION_S:-5}" --require audio,video >"$WORK/alice.json" 2>"$WORK/alice.log"
alice_rc=$?
wait "$BOB_PID"
bob_rc=$?
BOB_PID=""
set -e
echo "selftest: caller ran $(( ($(date +%s%N) - t0) / 1000000 )) ms" >&2
echo "alice (rc=$alice_rc): $(cat "$WORK/alice.json")"
echo "bob   (rc=$bob_rc): $(cat "$WORK/bob.json")"
if [ "$alice_rc" -ne 0 ] || [ "$bob_rc" -ne 0 ]; then
    echo "selftest: FAILED; logs in $WORK (alice.log, bob.log, synapse/homeserver.log)" >&2
    exit 1
fi
echo "selftest: both peers connected and received media"
