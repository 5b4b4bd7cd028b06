#!/usr/bin/env python3
"""Run a throwaway Synapse on loopback for the e2e tests (python3 stdlib only).

    synapse.py start  --venv DIR --dir WORKDIR --port PORT [--turn-uri URI ... --turn-secret S]
    synapse.py register    --dir WORKDIR --user alice --password pw [--admin] [--json]
    synapse.py login       --dir WORKDIR --user alice --password pw
    synapse.py create-room --dir WORKDIR --user alice --password pw --invite @bob:localhost [...]
    synapse.py stop   --dir WORKDIR

`--venv` is the venv made by tests/e2e/setup.sh (holds matrix-synapse).
server_name is `localhost` (user ids look like @alice:localhost). The only listener is
the client API on 127.0.0.1:PORT (http, no federation listener); `--port 0` picks a free
port. WORKDIR gets homeserver.yaml, log.config, the signing key, homeserver.db (SQLite),
media/, homeserver.log (INFO), synapse.out (stdout/stderr), synapse.pid and state.json
(base_url, server_name, shared secret, users registered here and their passwords).
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

SERVER_NAME = "localhost"
HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0

# Every rate limiter Synapse knows, raised so tests never see M_LIMIT_EXCEEDED.
_HIGH = {"per_second": 10000, "burst_count": 100000}
RATE_LIMITS = {
    "rc_message": _HIGH,
    "rc_registration": _HIGH,
    "rc_registration_token_validity": _HIGH,
    "rc_login": {"address": _HIGH, "account": _HIGH, "failed_attempts": _HIGH},
    "rc_admin_redaction": _HIGH,
    "rc_joins": {"local": _HIGH, "remote": _HIGH},
    "rc_joins_per_room": _HIGH,
    "rc_3pid_validation": _HIGH,
    "rc_invites": {"per_room": _HIGH, "per_user": _HIGH, "per_issuer": _HIGH},
    "rc_third_party_invite": _HIGH,
    "rc_media_create": _HIGH,
    "rc_federation": {
        "window_size": 1000,
        "sleep_limit": 10000,
        "sleep_delay": 1,
        "reject_limit": 10000,
        "concurrent": 1000,
    },
    "rc_key_requests": _HIGH,
    "rc_presence": {"per_user": _HIGH},
    "rc_delayed_event_mgmt": _HIGH,
    "rc_reports": _HIGH,
    "rc_room_creation": _HIGH,
    "rc_send_email": _HIGH,
}


def log(msg):
    print(f"synapse.py: {msg}", file=sys.stderr, flush=True)


def die(msg, code=1):
    log(msg)
    sys.exit(code)


# ---------------------------------------------------------------- state / files


def state_path(workdir):
    return os.path.join(workdir, "state.json")


def load_state(workdir):
    try:
        with open(state_path(workdir)) as f:
            return json.load(f)
    except FileNotFoundError:
        die(f"no state.json in {workdir}: run `synapse.py start` first")


def save_state(workdir, state):
    tmp = state_path(workdir) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=2, sort_keys=True)
    os.replace(tmp, state_path(workdir))


def read_pid(workdir):
    try:
        with open(os.path.join(workdir, "synapse.pid")) as f:
            return int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return None


def pid_alive(pid):
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) still answers kill(0); treat it as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def unpadded_b64(data):
    return base64.b64encode(data).decode().rstrip("=")


def yaml_value(v):
    """Scalars as YAML; JSON strings are valid YAML, so use json for quoting."""
    return json.dumps(v)


def to_yaml(obj, indent=0):
    """Tiny YAML emitter for dicts/lists/scalars (JSON flow style for scalars)."""
    pad = "  " * indent
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (dict, list)) and v:
                out.append(f"{pad}{k}:")
                out.append(to_yaml(v, indent + 1))
            elif isinstance(v, (dict, list)):
                out.append(f"{pad}{k}: {json.dumps(v)}")
            else:
                out.append(f"{pad}{k}: {yaml_value(v)}")
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, dict) and v:
                body = to_yaml(v, indent + 1).splitlines()
                out.append(f"{pad}- {body[0].lstrip()}")
                out.extend(body[1:])
            else:
                out.append(f"{pad}- {yaml_value(v)}")
    else:
        out.append(f"{pad}{yaml_value(obj)}")
    return "\n".join(out)


# ---------------------------------------------------------------- HTTP


def http(method, url, body=None, token=None, timeout=30):
    """Returns (status, parsed JSON body or {})."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    # Loopback only: never let an environment proxy see these requests.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as e:
        raw = e.read()
        status = e.code
    try:
        parsed = json.loads(raw) if raw else {}
    except ValueError:
        parsed = {"raw": raw.decode(errors="replace")}
    return status, parsed


def check(status, body, what):
    if status != 200:
        die(f"{what} failed: HTTP {status} {json.dumps(body)}")
    return body


def client_url(state, path):
    return state["base_url"] + "/_matrix/client/v3" + path


def q(s):
    return urllib.parse.quote(s, safe="")


def password_login(state, user, password):
    status, body = http(
        "POST",
        client_url(state, "/login"),
        {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": password,
            "initial_device_display_name": "synapse.py",
        },
    )
    return status, body


def user_id_for(user):
    return user if user.startswith("@") else f"@{user}:{SERVER_NAME}"


# ---------------------------------------------------------------- start


def write_config(args, workdir, port):
    base_url = f"http://{HOST}:{port}"
    key_path = os.path.join(workdir, f"{SERVER_NAME}.signing.key")
    if not os.path.exists(key_path):
        # Synapse's format: "ed25519 <key id> <unpadded base64 of the 32-byte seed>";
        # any 32 random bytes are a valid ed25519 seed (same as --generate-keys writes).
        with open(key_path, "w") as f:
            f.write(f"ed25519 a_{secrets.token_hex(2)} {unpadded_b64(os.urandom(32))}\n")

    old = {}
    if os.path.exists(state_path(workdir)):
        with open(state_path(workdir)) as f:
            old = json.load(f)
    shared_secret = old.get("registration_shared_secret") or secrets.token_urlsafe(32)
    macaroon = old.get("macaroon_secret_key") or secrets.token_urlsafe(32)
    form_secret = old.get("form_secret") or secrets.token_urlsafe(32)

    log_config_path = os.path.join(workdir, "log.config")
    log_config = {
        "version": 1,
        "formatters": {
            "precise": {
                "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - "
                "%(request)s - %(message)s"
            }
        },
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "formatter": "precise",
                "filename": os.path.join(workdir, "homeserver.log"),
                "encoding": "utf8",
            }
        },
        "loggers": {"synapse.storage.SQL": {"level": "INFO"}},
        "root": {"level": "INFO", "handlers": ["file"]},
        "disable_existing_loggers": False,
    }
    with open(log_config_path, "w") as f:
        f.write(to_yaml(log_config) + "\n")

    config = {
        "server_name": SERVER_NAME,
        "public_baseurl": base_url + "/",
        "pid_file": os.path.join(workdir, "homeserver.pid"),
        "listeners": [
            {
                "port": port,
                "bind_addresses": ["0.0.0.0"] if getattr(args, "bind_all", False) else [HOST],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client"], "compress": False}],
            }
        ],
        "database": {
            "name": "sqlite3",
            "args": {"database": os.path.join(workdir, "homeserver.db")},
        },
        "log_config": log_config_path,
        "media_store_path": os.path.join(workdir, "media"),
        "signing_key_path": key_path,
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "report_stats": False,
        "enable_metrics": False,
        "enable_registration": False,
        "registration_shared_secret": shared_secret,
        "macaroon_secret_key": macaroon,
        "form_secret": form_secret,
        "url_preview_enabled": False,
        # Presence only adds sync wake-ups; calls do not need it.
        "presence": {"enabled": False},
        "federation_domain_whitelist": [],
        "allow_public_rooms_over_federation": False,
        "update_profile_information": True,
    }
    config.update(RATE_LIMITS)
    if args.turn_uri:
        config["turn_uris"] = args.turn_uri
        if args.turn_secret:
            config["turn_shared_secret"] = args.turn_secret
        config["turn_user_lifetime"] = args.turn_user_lifetime
        config["turn_allow_guests"] = True

    path = os.path.join(workdir, "homeserver.yaml")
    with open(path, "w") as f:
        f.write("# written by tests/e2e/synapse.py\n" + to_yaml(config) + "\n")

    state = dict(old)
    state.update(
        {
            "base_url": base_url,
            "server_name": SERVER_NAME,
            "port": port,
            "registration_shared_secret": shared_secret,
            "macaroon_secret_key": macaroon,
            "form_secret": form_secret,
            "venv": os.path.abspath(args.venv),
        }
    )
    state.setdefault("users", {})
    save_state(workdir, state)
    return path, state


def wait_ready(proc, base_url, out_path, timeout):
    deadline = time.monotonic() + timeout
    url = base_url + "/_matrix/client/versions"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = open(out_path, errors="replace").read()[-4000:]
            die(f"synapse exited with {proc.returncode} during start; synapse.out:\n{tail}")
        try:
            status, _ = http("GET", url, timeout=2)
            if status == 200:
                return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    return False


def cmd_start(args):
    workdir = os.path.abspath(args.dir)
    os.makedirs(os.path.join(workdir, "media"), exist_ok=True)
    pid = read_pid(workdir)
    if pid_alive(pid):
        die(f"synapse already running in {workdir} (pid {pid}); stop it first")
    python = os.path.join(os.path.abspath(args.venv), "bin", "python")
    if not os.access(python, os.X_OK):
        die(f"{python} not found: run tests/e2e/setup.sh first")
    port = args.port or free_port()
    config_path, state = write_config(args, workdir, port)

    out_path = os.path.join(workdir, "synapse.out")
    t0 = time.monotonic()
    with open(out_path, "ab") as out:
        proc = subprocess.Popen(
            [python, "-m", "synapse.app.homeserver", "-c", config_path],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # not killed by the caller's Ctrl-C / process group
            env={**os.environ, "SYNAPSE_NO_TLS": "1", "PYTHONUNBUFFERED": "1"},
        )
    with open(os.path.join(workdir, "synapse.pid"), "w") as f:
        f.write(f"{proc.pid}\n")
    if not wait_ready(proc, state["base_url"], out_path, args.timeout):
        stop_pid(proc.pid)
        die(f"synapse did not answer /_matrix/client/versions within {args.timeout} s")
    log(f"synapse ready in {time.monotonic() - t0:.2f} s (pid {proc.pid}, {state['base_url']})")
    print(
        json.dumps(
            {"pid": proc.pid, "base_url": state["base_url"], "server_name": SERVER_NAME}
        ),
        flush=True,
    )


# ---------------------------------------------------------------- stop


def stop_pid(pid, timeout=STOP_TIMEOUT_S):
    if not pid_alive(pid):
        return "not running"
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return "not running"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:  # reap it if it is our child (start's own failure path)
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return "stopped"
        except ChildProcessError:
            pass
        if not pid_alive(pid):
            return "stopped"
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return "stopped"
    return "killed"


def cmd_stop(args):
    workdir = os.path.abspath(args.dir)
    pid = read_pid(workdir)
    if pid is None:
        log("no synapse.pid: nothing to stop")
        return
    result = stop_pid(pid, args.timeout)
    try:
        os.remove(os.path.join(workdir, "synapse.pid"))
    except FileNotFoundError:
        pass
    log(f"pid {pid}: {result}")


# ---------------------------------------------------------------- users / rooms


def cmd_register(args):
    workdir = os.path.abspath(args.dir)
    state = load_state(workdir)
    url = state["base_url"] + "/_synapse/admin/v1/register"
    nonce = check(*http("GET", url), "GET nonce")["nonce"]
    mac = hmac.new(state["registration_shared_secret"].encode(), digestmod=hashlib.sha1)
    for part in (nonce, args.user, args.password):
        mac.update(part.encode())
        mac.update(b"\x00")
    mac.update(b"admin" if args.admin else b"notadmin")
    status, body = http(
        "POST",
        url,
        {
            "nonce": nonce,
            "username": args.user,
            "password": args.password,
            "admin": bool(args.admin),
            "mac": mac.hexdigest(),
        },
    )
    if status == 400 and body.get("errcode") == "M_USER_IN_USE":
        # Idempotent when the password matches.
        status, body = password_login(state, args.user, args.password)
        check(status, body, f"user {args.user} exists; login with the given password")
    else:
        check(status, body, "register")
    state = load_state(workdir)
    state.setdefault("users", {})[body["user_id"]] = args.password
    save_state(workdir, state)
    if args.json:
        print(json.dumps(body))
    else:
        print(body["user_id"])


def cmd_login(args):
    state = load_state(os.path.abspath(args.dir))
    body = check(*password_login(state, args.user, args.password), "login")
    print(json.dumps({k: body.get(k) for k in ("user_id", "access_token", "device_id")}))


def cmd_create_room(args):
    workdir = os.path.abspath(args.dir)
    state = load_state(workdir)
    login = check(*password_login(state, args.user, args.password), "login")
    token, me = login["access_token"], login["user_id"]
    invite = [user_id_for(u) for u in args.invite]
    content = {
        "preset": "trusted_private_chat" if args.direct else "private_chat",
        "is_direct": bool(args.direct),
        "invite": invite,
    }
    if args.name:
        content["name"] = args.name
    if args.encrypted:
        # As Element's "Start chat": Megolm from the first event on.
        content["initial_state"] = [
            {
                "type": "m.room.encryption",
                "state_key": "",
                "content": {"algorithm": "m.megolm.v1.aes-sha2"},
            }
        ]
    room_id = check(*http("POST", client_url(state, "/createRoom"), content, token), "createRoom")[
        "room_id"
    ]

    def mark_direct(tok, user_id, other):
        # m.direct account data, as a DM-aware client would set it.
        path = f"/user/{q(user_id)}/account_data/m.direct"
        status, current = http("GET", client_url(state, path), token=tok)
        current = current if status == 200 else {}
        rooms = current.setdefault(other, [])
        if room_id not in rooms:
            rooms.append(room_id)
        check(*http("PUT", client_url(state, path), current, tok), "set m.direct")

    if args.direct and len(invite) == 1:
        mark_direct(token, me, invite[0])

    for user_id in invite:
        pw = args.invitee_password or state.get("users", {}).get(user_id)
        if pw is None:
            log(f"{user_id}: password unknown (not registered via this tool); left invited")
            continue
        their = check(*password_login(state, user_id, pw), f"login {user_id}")
        check(
            *http("POST", client_url(state, f"/join/{q(room_id)}"), {}, their["access_token"]),
            f"join {user_id}",
        )
        if args.direct and len(invite) == 1:
            mark_direct(their["access_token"], user_id, me)
        # Don't leave the helper's devices behind.
        http("POST", client_url(state, "/logout"), {}, their["access_token"])
    http("POST", client_url(state, "/logout"), {}, token)
    print(room_id)


# ---------------------------------------------------------------- main


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("start", help="write config, start synapse, wait until ready")
    s.add_argument("--venv", required=True)
    s.add_argument("--dir", required=True)
    s.add_argument("--port", type=int, required=True, help="0 = pick a free port")
    s.add_argument("--turn-uri", action="append", default=[], help="repeatable")
    s.add_argument("--turn-secret")
    s.add_argument("--turn-user-lifetime", default="1h")
    s.add_argument(
        "--bind-all",
        action="store_true",
        help="listen on every address (tests that put agents in their own network namespaces)",
    )
    s.add_argument("--timeout", type=float, default=START_TIMEOUT_S)
    s.set_defaults(func=cmd_start)

    s = sub.add_parser("register", help="register a user with the shared secret")
    s.add_argument("--dir", required=True)
    s.add_argument("--user", required=True, help="localpart")
    s.add_argument("--password", required=True)
    s.add_argument("--admin", action="store_true")
    s.add_argument("--json", action="store_true", help="print the whole response")
    s.set_defaults(func=cmd_register)

    s = sub.add_parser("login", help="password login; prints user_id, access_token, device_id")
    s.add_argument("--dir", required=True)
    s.add_argument("--user", required=True)
    s.add_argument("--password", required=True)
    s.set_defaults(func=cmd_login)

    s = sub.add_parser("create-room", help="create a room, invite and join the invitees")
    s.add_argument("--dir", required=True)
    s.add_argument("--user", required=True)
    s.add_argument("--password", required=True)
    s.add_argument("--invite", action="append", default=[], help="user id or localpart")
    s.add_argument(
        "--invitee-password",
        help="password for the invitees (default: the one `register` stored)",
    )
    s.add_argument("--name")
    s.add_argument(
        "--no-direct",
        dest="direct",
        action="store_false",
        help="plain private room instead of a DM",
    )
    s.add_argument(
        "--encrypted", action="store_true", help="with m.room.encryption (Megolm) in the initial state"
    )
    s.set_defaults(func=cmd_create_room)

    s = sub.add_parser("stop", help="SIGTERM, then SIGKILL after --timeout; idempotent")
    s.add_argument("--dir", required=True)
    s.add_argument("--timeout", type=float, default=STOP_TIMEOUT_S)
    s.set_defaults(func=cmd_stop)

    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
