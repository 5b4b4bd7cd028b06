//! `call-assist serve` (the hub daemon) against a real Synapse, on loopback inside a network
//! namespace that has only `lo`: its HTTP API places, lists and hangs up a call to a
//! listening agent, refuses requests without the bearer token, rejects bad configs naming
//! the key, and SIGHUP changes who is answered for the next call.
//!
//! Needs `tests/e2e/setup.sh` (Synapse venv) and `cargo build -p call-assist`. Run:
//!
//! ```sh
//! tests/e2e/loopback-only.sh cargo test -p call-assist-tests --test serve -- --test-threads=1
//! ```

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use call_assist_tests::live::*;
use serde_json::{json, Value};

/// Logged in and through the first sync.
const READY: Duration = Duration::from_secs(30);
/// From placing a call to connected with media flowing, on loopback.
const CONNECT: Duration = Duration::from_secs(40);
/// A process with nothing left to do exits within this.
const EXIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------- a tiny HTTP client

/// One request to 127.0.0.1:`port`; the status and the JSON body.
fn http(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value) {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connecting to the API at {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("read timeout");
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes()).expect("sending the request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("reading the response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{method} {path}: no HTTP head in {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: no status in {head:?}"));
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{method} {path}: not JSON: {head}"
    );
    let value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{method} {path}: body {body:?} is not JSON: {e}"));
    (status, value)
}

/// An open `GET /events` stream; its `data:` lines, parsed, arrive in `events`.
struct Events {
    events: Arc<Mutex<Vec<Value>>>,
}

impl Events {
    fn open(port: u16, token: Option<&str>) -> Events {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        write!(s, "GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n").expect("send");
        s.set_read_timeout(Some(Duration::from_secs(300)))
            .expect("read timeout");
        let mut r = BufReader::new(s);
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            r.read_line(&mut line).expect("event-stream head");
            if line.trim().is_empty() {
                break;
            }
            head.push(line.trim().to_owned());
        }
        assert!(
            head.first().is_some_and(|l| l.contains(" 200 ")),
            "GET /events: {head:?}"
        );
        assert!(
            head.iter()
                .any(|h| h.eq_ignore_ascii_case("content-type: text/event-stream")),
            "GET /events is not an event stream: {head:?}"
        );
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        thread::spawn(move || {
            for line in r.lines() {
                let Ok(line) = line else { return };
                if let Some(data) = line.strip_prefix("data: ") {
                    let v: Value = serde_json::from_str(data)
                        .unwrap_or_else(|e| json!({"unparsable": data, "error": e.to_string()}));
                    sink.lock().unwrap_or_else(|p| p.into_inner()).push(v);
                }
            }
        });
        Events { events }
    }

    fn all(&self) -> Vec<Value> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits for an event satisfying `pred`.
    fn wait(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.all().into_iter().find(&pred) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} on the event stream within {timeout:?}; got {:?}",
                self.all()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Polls `GET /calls/ID` until `pred` holds; returns the last answer.
fn wait_call(
    port: u16,
    id: &str,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, call) = http(port, "GET", &format!("/calls/{id}"), None, None);
        assert_eq!(status, 200, "GET /calls/{id}: {call}");
        if pred(&call) {
            return call;
        }
        assert!(
            Instant::now() < deadline,
            "call {id} not {what} within {timeout:?}: {call}"
        );
        thread::sleep(Duration::from_millis(300));
    }
}

// ---------------------------------------------------------------- the hub process

/// A config for `hub` on `homeserver` with `api` and `stations` (TOML text).
fn config(dir: &Path, homeserver: &str, hub: &str, api: &str, stations: &str) -> String {
    format!(
        "[matrix]\nhomeserver = \"{homeserver}\"\nuser = \"{hub}\"\nstate_dir = \"{}\"\n\n\
         [api]\n{api}\n\n[network]\nallow_loopback = true\ninterfaces = [\"lo\"]\n\n{stations}",
        dir.join("hub-state").display()
    )
}

fn write(path: &Path, text: &str) -> PathBuf {
    fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path.to_path_buf()
}

/// `call-assist serve --config FILE --json` with the password in the environment; an ALSA
/// configuration the test wrote as `dir/asound.conf` (see `alsa_config`) is the hub's.
fn serve(dir: &Path, config: &Path, password: &str) -> Proc {
    let mut cmd = Command::new(agent_binary());
    cmd.args(["serve", "--json", "--config"])
        .arg(config)
        .env("CALL_ASSIST_PASSWORD", password)
        .env_remove("CALL_ASSIST_ACCESS_TOKEN")
        .env_remove("CALL_ASSIST_API_TOKEN")
        .env("NO_COLOR", "1");
    let alsa = dir.join("asound.conf");
    if alsa.exists() {
        cmd.env("ALSA_CONFIG_PATH", alsa);
    }
    if std::env::var_os("CALL_ASSIST_LOG").is_none() {
        cmd.env("CALL_ASSIST_LOG", "info");
    }
    Proc::spawn("hub", cmd, dir)
}

/// The API port from the hub's `{"event":"api"}` line.
fn api_port(hub: &mut Proc) -> u16 {
    let e = hub.wait_event("api", READY);
    let listen = e.value["listen"].as_str().unwrap_or_default().to_owned();
    listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {}", e.value))
}

/// `serve` as `hub_user` on the test's Synapse with `stations`, its API on a free loopback
/// port: the process and the port, once it is logged in and synced.
fn start_hub(live: &Live, hub_user: &User, stations: &str) -> (Proc, u16) {
    let cfg = write(
        &live.dir.join("hub.toml"),
        &config(
            &live.dir,
            &live.hs.base_url,
            &hub_user.id,
            "listen = \"127.0.0.1:0\"",
            stations,
        ),
    );
    let mut hub = serve(&live.dir, &cfg, &hub_user.password);
    let port = api_port(&mut hub);
    hub.wait_event("ready", READY);
    (hub, port)
}

fn call_id(v: &Value) -> String {
    v["call_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no call_id in {v}"))
        .to_owned()
}

// ---------------------------------------------------------------- tests

#[test]
fn api_places_lists_and_hangs_up_a_call() {
    if !in_loopback_namespace("api_places_lists_and_hangs_up_a_call") {
        return;
    }
    let live = Live::start("api_places_lists_and_hangs_up_a_call");
    let hub_user = live.user("hub");
    let alice = live.user("alice");
    live.hs.create_dm(&hub_user, &alice);
    let mut callee = live.listen(&alice, &["--allow", &hub_user.id, "--max-calls", "1"]);
    callee.wait_event("ready", READY);

    let rec = live.dir.join("recordings");
    // Two webhooks: a receiver that answers, and one that accepts and never answers.
    let (good, received) = webhook_receiver();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let secret = "s3cret-webhook-id";
    let good_url = write(
        &live.dir.join("good-webhook"),
        &format!("http://{good}/api/webhook/{secret}"),
    );
    let dead_url = write(
        &live.dir.join("dead-webhook"),
        &format!("http://{}/api/webhook/{secret}", dead.local_addr().unwrap()),
    );
    let stations = format!(
        "[[station]]\nname = \"door\"\nvideo = \"testclip\"\naudio = \"tone\"\n\
         record = \"{}\"\nmay_call = [\"{}\"]\n\n\
         [[station]]\nname = \"garden\"\nvideo = \"none\"\n\n\
         [[webhook]]\nurl_file = \"{}\"\n\n\
         [[webhook]]\nurl_file = \"{}\"\nevents = [\"state\", \"ended\"]\n",
        rec.display(),
        alice.id,
        good_url.display(),
        dead_url.display(),
    );
    let (mut hub, port) = start_hub(&live, &hub_user, &stations);

    let (status, health) = http(port, "GET", "/health", None, None);
    assert_eq!((status, &health["status"]), (200, &json!("ok")), "{health}");
    assert_eq!(
        health["stations"].as_array().map(Vec::len),
        Some(2),
        "{health}"
    );
    let events = Events::open(port, None);

    // Refusals, each with a clear message.
    let post = |station: &str, to: &str| {
        http(
            port,
            "POST",
            "/calls",
            None,
            Some(&json!({"station": station, "to": to})),
        )
    };
    let (status, e) = post("garden", &alice.id);
    assert_eq!(status, 403, "garden may call nobody: {e}");
    assert!(
        e["error"].as_str().unwrap_or("").contains("may_call"),
        "{e}"
    );
    let (status, e) = post("attic", &alice.id);
    assert_eq!(status, 404, "{e}");
    let (status, e) = post("door", "alice");
    assert_eq!(status, 400, "{e}");
    let (status, e) = http(port, "DELETE", "/calls/nope", None, None);
    assert_eq!(status, 404, "{e}");
    let (status, e) = http(port, "PUT", "/health", None, None);
    assert_eq!(status, 405, "{e}");

    let (status, placed) = post("door", &alice.id);
    assert_eq!(status, 201, "{placed}\n{}", hub.report());
    let id = placed["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {placed}"))
        .to_owned();
    assert_eq!(placed["station"], "door");
    assert_eq!(placed["peer"], alice.id.as_str());

    let call = wait_call(
        port,
        &id,
        "connected with frames flowing both ways",
        CONNECT,
        |c| {
            c["state"] == "connected"
                && c["stats"]["frames_sent"].as_u64() > Some(0)
                && c["stats"]["video_frames_received"].as_u64() > Some(0)
                && c["stats"]["audio_frames_received"].as_u64() > Some(0)
        },
    );
    assert_eq!(call["direction"], "outgoing", "{call}");
    assert_eq!(call["stats"]["local_candidate"], "host", "{call}");
    let (status, list) = http(port, "GET", "/calls", None, None);
    assert_eq!(status, 200);
    let listed: Vec<&Value> = list
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    assert_eq!(listed.len(), 1, "{list}");
    assert_eq!(
        (&listed[0]["id"], &listed[0]["state"]),
        (&json!(id), &json!("connected")),
        "{list}"
    );
    let incoming = callee.wait_event("incoming", Duration::ZERO);
    assert_eq!(call_id(&incoming.value), id);

    let (status, hung) = http(port, "DELETE", &format!("/calls/{id}"), None, None);
    assert_eq!(status, 200, "{hung}");
    assert_eq!(callee.wait_exit(EXIT), 0, "{}", callee.report());
    let ended = callee.events_of("ended");
    assert_eq!(ended.len(), 1, "{}", callee.report());
    assert_eq!(
        (&ended[0]["reason"], &ended[0]["by"]),
        (&json!("user_hangup"), &json!("remote"))
    );
    let call = wait_call(port, &id, "ended", EXIT, |c| c["state"] == "ended");
    assert_eq!(
        (&call["reason"], &call["ended_by"]),
        (&json!("user_hangup"), &json!("local")),
        "{call}"
    );
    let (status, e) = http(port, "DELETE", &format!("/calls/{id}"), None, None);
    assert_eq!(status, 409, "hanging up twice: {e}");

    // The event stream saw the call go through its states, one JSON object per data line.
    for state in ["invite_sent", "connected"] {
        events.wait(&format!("state {state}"), EXIT, |v| {
            v["event"] == "state"
                && v["call_id"] == id.as_str()
                && v["state"] == state
                && v["station"] == "door"
        });
    }
    events.wait("ended", EXIT, |v| {
        v["event"] == "ended" && v["call_id"] == id.as_str()
    });
    let recorded = events.wait("recorded", EXIT, |v| {
        v["event"] == "recorded" && v["call_id"] == id.as_str()
    });
    let path = recorded["path"].as_str().unwrap_or_default();
    assert!(
        Path::new(path).starts_with(&rec) && fs::metadata(path).map(|m| m.len()).unwrap_or(0) > 0,
        "no recording at {path:?}: {recorded}"
    );

    // The answering receiver got the call's events in order, while the dead one held its
    // queue: the call above connected and ended all the same.
    let deadline = Instant::now() + EXIT;
    let kinds = loop {
        let kinds: Vec<String> = received
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v["call_id"] == id.as_str())
            .map(|v| match v["event"].as_str() {
                Some("state") => v["state"].as_str().unwrap_or("?").to_owned(),
                other => other.unwrap_or("?").to_owned(),
            })
            .collect();
        if kinds.iter().any(|k| k == "ended") || Instant::now() > deadline {
            break kinds;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let at = |k: &str| kinds.iter().position(|x| x == k);
    assert!(
        at("invite_sent") < at("connected")
            && at("connected") < at("ended")
            && at("invite_sent").is_some(),
        "webhook events out of order or missing: {kinds:?}"
    );
    let (_, health) = http(port, "GET", "/health", None, None);
    let hooks = health["webhooks"].as_array().cloned().unwrap_or_default();
    assert_eq!(hooks.len(), 2, "{health}");
    assert!(hooks[0]["delivered"].as_u64() >= Some(3), "{health}");
    assert_eq!(hooks[1]["delivered"], 0, "{health}");
    assert!(!health.to_string().contains(secret), "{health}");
    drop(dead);

    hub.terminate();
    assert_eq!(hub.wait_exit(EXIT), 0, "{}", hub.report());
    assert!(
        !hub.report().contains(secret),
        "a webhook id reached the hub's output"
    );
}

/// A local HTTP server that takes webhook POSTs (one request per connection or kept alive)
/// and keeps their JSON bodies in arrival order.
fn webhook_receiver() -> (SocketAddr, Arc<Mutex<Vec<Value>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let store = received.clone();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let store = store.clone();
            thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut stream = stream;
                loop {
                    let mut length = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let l = line.trim_end();
                        if l.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = l.split_once(':') {
                            if k.eq_ignore_ascii_case("content-length") {
                                length = v.trim().parse().unwrap_or(0);
                            }
                        }
                    }
                    let mut body = vec![0u8; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                        store.lock().unwrap().push(v);
                    }
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
                }
            });
        }
    });
    (addr, received)
}

#[test]
fn api_beyond_loopback_refuses_requests_without_the_token() {
    if !in_loopback_namespace("api_beyond_loopback_refuses_requests_without_the_token") {
        return;
    }
    let dir = test_dir("api_beyond_loopback_refuses_requests_without_the_token");
    let token = "hub-api-token-5b0c";
    let token_file = write(&dir.join("api-token"), &format!("{token}\n"));
    // No homeserver answers: the API still serves (health says so), the daemon keeps trying.
    let homeserver = format!("http://127.0.0.1:{}", closed_port());
    let api = format!(
        "listen = \"0.0.0.0:0\"\ntoken_file = \"{}\"",
        token_file.display()
    );
    let stations = "[[station]]\nname = \"door\"\nmay_call = [\"@me:localhost\"]\n";
    let cfg = write(
        &dir.join("hub.toml"),
        &config(&dir, &homeserver, "@hub:localhost", &api, stations),
    );
    let mut hub = serve(&dir, &cfg, "unused-pw");
    let port = api_port(&mut hub);
    assert_eq!(
        hub.wait_event("api", Duration::ZERO).value["token_required"],
        true
    );

    for (what, t) in [
        ("no token", None),
        ("a wrong token", Some("hub-api-token-5b0d")),
    ] {
        for (method, path) in [
            ("GET", "/health"),
            ("GET", "/calls"),
            ("POST", "/calls"),
            ("GET", "/events"),
        ] {
            let body = json!({"station": "door", "to": "@me:localhost"});
            let (status, e) = http(port, method, path, t, Some(&body));
            assert_eq!(status, 401, "{method} {path} with {what}: {e}");
            assert!(e["error"].as_str().unwrap_or("").contains("token"), "{e}");
        }
    }
    let (status, health) = http(port, "GET", "/health", Some(token), None);
    assert_eq!(status, 503, "no homeserver, so not healthy: {health}");
    assert_eq!(health["homeserver_reachable"], false, "{health}");
    let (status, calls) = http(port, "GET", "/calls", Some(token), None);
    assert_eq!((status, calls), (200, json!([])));
    let (status, e) = http(
        port,
        "POST",
        "/calls",
        Some(token),
        Some(&json!({"station": "door", "to": "@me:localhost"})),
    );
    assert_eq!(status, 503, "calls need the homeserver: {e}");

    hub.terminate();
    assert_eq!(hub.wait_exit(EXIT), 0, "{}", hub.report());
    let out = fs::read_to_string(dir.join("hub.stdout")).unwrap_or_default()
        // as_str: matrix-sdk-base (via the crypto store) brings decancer's `Add` impls, and
        // `+ &String` no longer infers.
        + fs::read_to_string(dir.join("hub.stderr"))
            .unwrap_or_default()
            .as_str();
    assert!(!out.contains(token), "the API token was printed");
}

#[test]
fn a_bad_config_is_rejected_naming_the_key_and_line() {
    let dir = test_dir("a_bad_config_is_rejected_naming_the_key_and_line");
    let station =
        "[[station]]\nname = \"door\"\nvideo = \"testclip\"\nanswer = [\"@me:localhost\"]\n";
    let good = config(
        &dir,
        "http://127.0.0.1:9",
        "@hub:localhost",
        "listen = \"127.0.0.1:0\"",
        station,
    );
    let line_of = |text: &str, needle: &str| {
        text.lines()
            .position(|l| l.contains(needle))
            .map(|i| i + 1)
            .unwrap_or_else(|| panic!("{needle:?} not in the config"))
    };
    let cases = [
        (
            good.replace("video = ", "vidoe = "),
            "vidoe = ",
            vec!["vidoe"],
        ),
        (
            good.replace("allow_loopback = true", "allow_loopback = \"yes\""),
            "allow_loopback",
            vec!["network.allow_loopback"],
        ),
        (
            good.replace("[\"@me:localhost\"]", "[\"me\"]"),
            "answer = ",
            vec!["answer", "\"me\""],
        ),
        (
            good.replace("127.0.0.1:0", "0.0.0.0:8765"),
            "listen = ",
            vec!["api.listen", "token"],
        ),
        (
            good.replace("video = \"testclip\"", "video = \"webcam\""),
            "video = ",
            vec!["video", "webcam"],
        ),
    ];
    for (i, (text, at, words)) in cases.iter().enumerate() {
        let cfg = write(&dir.join(format!("bad-{i}.toml")), text);
        let out = run(
            Command::new(agent_binary())
                .args(["serve", "--json", "--config"])
                .arg(&cfg)
                .env("CALL_ASSIST_PASSWORD", "pw")
                .env_remove("CALL_ASSIST_API_TOKEN"),
            EXIT,
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "config {i} accepted?\n{text}\n{stderr}"
        );
        let line = format!("line {}", line_of(text, at));
        for w in words.iter().map(|w| w.to_string()).chain([line]) {
            assert!(
                stderr.contains(&w),
                "config {i}: {w:?} not in the error: {stderr}"
            );
        }
        assert!(
            out.stdout.is_empty(),
            "config {i}: something started: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn sighup_changes_who_is_answered_for_the_next_call() {
    if !in_loopback_namespace("sighup_changes_who_is_answered_for_the_next_call") {
        return;
    }
    let live = Live::start("sighup_changes_who_is_answered_for_the_next_call");
    let hub_user = live.user("hub");
    let bob = live.user("bob");
    let room = live.hs.create_dm(&bob, &hub_user);
    let station = |answer: &str, audio: &str| {
        format!("[[station]]\nname = \"door\"\naudio = \"{audio}\"\nanswer = [\"{answer}\"]\n")
    };
    let cfg_path = live.dir.join("hub.toml");
    let cfg = |answer: &str, audio: &str| {
        write(
            &cfg_path,
            &config(
                &live.dir,
                &live.hs.base_url,
                &hub_user.id,
                "listen = \"127.0.0.1:0\"",
                &station(answer, audio),
            ),
        )
    };
    cfg(&bob.id, "tone");
    let mut hub = serve(&live.dir, &cfg_path, &hub_user.password);
    api_port(&mut hub);
    hub.wait_event("ready", READY);

    // 1. bob is answered; while that call is up, the allow list changes to carol only.
    let mut first = live.call(&bob, &["--room", &room, "--duration-s", "8"]);
    let connected = hub.wait_state("connected", CONNECT);
    let first_id = call_id(&connected.value);
    cfg("@carol:localhost", "tone");
    let sent = Instant::now();
    signal(hub.pid(), "HUP");
    let reload = hub.wait_for_after("a reload line", sent, EXIT, |v| v["event"] == "reload");
    assert_eq!(reload.value["ok"], true, "{}", reload.value);
    assert_eq!(reload.value["needs_restart"], json!([]), "{}", reload.value);
    // The call in progress is not dropped: bob hangs up when his 8 s are over.
    assert_eq!(first.wait_exit(CONNECT), 0, "{}", first.report());
    assert_eq!(
        first.summary()["hangup_reason"],
        "user_hangup",
        "{}",
        first.report()
    );
    let ended = hub.wait_for("the first call's end", EXIT, |v| {
        v["event"] == "ended" && v["call_id"] == first_id.as_str()
    });
    assert_eq!(
        (&ended.value["reason"], &ended.value["by"]),
        (&json!("user_hangup"), &json!("remote"))
    );

    // 2. bob's next call is not answered (the hub does not even ring for it).
    let mut second = live.call(&bob, &["--room", &room, "--duration-s", "2"]);
    let invite = second.wait_state("invite_sent", READY);
    let second_id = call_id(&invite.value);
    // Synapse hands the invite to the hub's long-poll within about a second; give it 10.
    thread::sleep(Duration::from_secs(10));
    assert!(
        !hub.events()
            .iter()
            .any(|e| e.value["call_id"] == second_id.as_str()),
        "the hub saw bob's call after bob left the allow list\n{}",
        hub.report()
    );
    second.terminate();
    assert_eq!(second.wait_exit(EXIT), 1, "{}", second.report());

    // 3. bob is allowed again (and the audio changes, which needs a restart): answered.
    cfg(&bob.id, "none");
    let sent = Instant::now();
    signal(hub.pid(), "HUP");
    let reload = hub.wait_for_after("a second reload line", sent, EXIT, |v| {
        v["event"] == "reload"
    });
    assert_eq!(reload.value["ok"], true, "{}", reload.value);
    assert_eq!(
        reload.value["needs_restart"],
        json!(["station \"door\" sources or sinks"]),
        "{}",
        reload.value
    );
    let mut third = live.call(&bob, &["--room", &room, "--duration-s", "2"]);
    assert_eq!(third.wait_exit(CONNECT), 0, "{}", third.report());
    let s = third.summary();
    assert_eq!(s["connected"], true, "{}", third.report());
    // The running station still sends the tone: the audio change waits for a restart.
    assert!(count(&s, "audio_frames_received") > 0, "{s}");

    // A broken config on SIGHUP is refused and the running one stays.
    write(&cfg_path, "[matrix]\nhomeserver = 5\n");
    let sent = Instant::now();
    signal(hub.pid(), "HUP");
    let reload = hub.wait_for_after("a refused reload", sent, EXIT, |v| v["event"] == "reload");
    assert_eq!(reload.value["ok"], false, "{}", reload.value);
    assert!(
        reload.value["message"]
            .as_str()
            .unwrap_or("")
            .contains("line 2"),
        "{}",
        reload.value
    );

    hub.terminate();
    assert_eq!(hub.wait_exit(EXIT), 0, "{}", hub.report());
}

#[test]
fn serve_keeps_running_across_a_homeserver_outage() {
    if !in_loopback_namespace("serve_keeps_running_across_a_homeserver_outage") {
        return;
    }
    let live = Live::start("serve_keeps_running_across_a_homeserver_outage");
    let hub_user = live.user("hub");
    let alice = live.user("alice");
    live.hs.create_dm(&hub_user, &alice);
    let stations = format!(
        "[[station]]\nname = \"door\"\nmay_call = [\"{}\"]\n",
        alice.id
    );
    let (mut hub, port) = start_hub(&live, &hub_user, &stations);

    let down = Instant::now();
    live.hs.stop();
    hub.wait_for_after("homeserver unreachable", down, CONNECT, |v| {
        is_reachability(v, false)
    });
    let (status, health) = http(port, "GET", "/health", None, None);
    assert_eq!(status, 503, "{health}");
    assert_eq!(health["status"], "degraded", "{health}");
    let up = Instant::now();
    live.hs.restart();
    hub.wait_for_after("homeserver reachable again", up, CONNECT, |v| {
        is_reachability(v, true)
    });
    assert!(hub.poll_exit().is_none(), "{}", hub.report());

    // After the outage the hub still places calls.
    let mut callee = live.listen(&alice, &["--allow", &hub_user.id, "--max-calls", "1"]);
    callee.wait_event("ready", READY);
    let (status, health) = http(port, "GET", "/health", None, None);
    assert_eq!(status, 200, "{health}");
    let body = json!({"station": "door", "to": alice.id});
    let (status, placed) = http(port, "POST", "/calls", None, Some(&body));
    assert_eq!(status, 201, "{placed}\n{}", hub.report());
    let id = placed["id"].as_str().unwrap_or_default().to_owned();
    wait_call(port, &id, "connected", CONNECT, |c| {
        c["state"] == "connected"
    });
    let (status, _) = http(port, "DELETE", &format!("/calls/{id}"), None, None);
    assert_eq!(status, 200);
    assert_eq!(callee.wait_exit(EXIT), 0, "{}", callee.report());
    hub.terminate();
    assert_eq!(hub.wait_exit(EXIT), 0, "{}", hub.report());
}

#[test]
fn a_camera_station_answers_and_survives_a_camera_restart() {
    let name = "a_camera_station_answers_and_survives_a_camera_restart";
    if !in_loopback_namespace(name) {
        return;
    }
    let live = Live::start(name);
    let hub_user = live.user("hub");
    let bob = live.user("bob");
    let room = live.hs.create_dm(&bob, &hub_user);
    let cam_port = closed_port();
    let camera = rtsp_server(&live.dir, "rtsp-1", cam_port);
    let pw = write(&live.dir.join("camera-password"), "secret\n");
    let stations = format!(
        "[[station]]\nname = \"door\"\nvideo = \"rtsp://cam@127.0.0.1:{cam_port}/cam\"\n\
         rtsp_password_file = \"{}\"\nanswer = [\"{}\"]\n",
        pw.display(),
        bob.id
    );
    let (mut hub, port) = start_hub(&live, &hub_user, &stations);
    let (_, health) = http(port, "GET", "/health", None, None);
    assert_eq!(health["stations"][0]["camera_up"], true, "{health}");

    let rec = live.dir.join("bob-recordings");
    let rec_s = rec.display().to_string();
    let mut caller = live.call(
        &bob,
        &["--room", &room, "--duration-s", "14", "--record", &rec_s],
    );
    let connected = hub.wait_state("connected", CONNECT);
    thread::sleep(Duration::from_secs(4));
    // The camera dies and comes back on the same port: the call goes on.
    signal(camera.pid(), "KILL");
    thread::sleep(Duration::from_secs(1));
    let _camera2 = rtsp_server(&live.dir, "rtsp-2", cam_port);
    assert_eq!(
        caller.wait_exit(Duration::from_secs(60)),
        0,
        "{}",
        caller.report()
    );
    hub.wait_for("the call's end", EXIT, |v| {
        v["event"] == "ended" && v["call_id"] == connected.value["call_id"]
    });
    let states: Vec<String> = hub
        .events_of("camera")
        .iter()
        .filter(|c| c["station"] == "door")
        .filter_map(|c| c["state"].as_str().map(str::to_owned))
        .collect();
    assert!(
        states
            .iter()
            .skip_while(|s| *s != "lost")
            .any(|s| s == "playing"),
        "camera loss and return not seen: {states:?}\n{}",
        hub.report()
    );
    // Bob saw the camera's picture: H.264 at 640x480, from before and after the restart.
    let s = caller.summary();
    assert_eq!(s["connected"], true, "{}", caller.report());
    assert!(count(&s, "video_frames_received") >= 100, "{s}");
    let recorded = caller.events_of("recorded");
    let path = recorded
        .first()
        .and_then(|r| r["path"].as_str())
        .unwrap_or_else(|| panic!("bob recorded nothing\n{}", caller.report()))
        .to_owned();
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-show_streams", "-of", "json", &path])
        .output()
        .expect("ffprobe (Debian ffmpeg) is installed by .ci/run");
    let probe: Value = serde_json::from_slice(&out.stdout).expect("ffprobe JSON");
    let video = probe["streams"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["codec_type"] == "video").cloned())
        .unwrap_or_else(|| panic!("no video stream in {path}: {probe}"));
    assert_eq!(video["codec_name"], "h264", "{probe}");
    assert_eq!(
        (video["width"].as_u64(), video["height"].as_u64()),
        (Some(640), Some(480)),
        "{probe}"
    );
    hub.terminate();
    assert_eq!(hub.wait_exit(EXIT), 0, "{}", hub.report());
    let logs = fs::read_to_string(live.dir.join("hub.stderr")).unwrap_or_default();
    assert!(!logs.contains("secret"), "the camera password was logged");
}

/// Key-frame flags of the video packets of a recording (ffprobe, no decoding).
fn video_keyframes(path: &str) -> usize {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v",
            "-show_entries",
            "packet=flags",
            "-of",
            "csv=p=0",
            path,
        ])
        .output()
        .expect("ffprobe (Debian ffmpeg) is installed by .ci/run");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('K'))
        .count()
}

#[test]
fn a_udp_opus_camera_answers_the_hubs_keyframe_request_with_its_cached_gop() {
    let name = "a_udp_opus_camera_answers_the_hubs_keyframe_request_with_its_cached_gop";
    if !in_loopback_namespace(name) {
        return;
    }
    let live = Live::start(name);
    let hub_user = live.user("hub");
    let alice = live.user("alice");
    let room = live.hs.create_dm(&alice, &hub_user);
    // The camera: RTP over UDP only, Opus audio, Digest auth, one IDR per 20 s (300 frames
    // at 15 fps), so the call below sees the camera's first IDR only: without the cached
    // GOP its picture would stand still.
    let cam_port = closed_port();
    let _camera = rtsp_server_with(
        &live.dir,
        "rtsp",
        cam_port,
        &[
            "--protocols",
            "udp",
            "--audio",
            "opus",
            "--auth",
            "digest",
            "--gop",
            "300",
        ],
    );
    let rec = live.dir.join("hub-recordings");
    let stations = format!(
        "[[station]]\nname = \"door\"\nvideo = \"none\"\naudio = \"none\"\nrecord = \"{}\"\n\
         answer = [\"{}\"]\n",
        rec.display(),
        alice.id
    );
    let (mut hub, port) = start_hub(&live, &hub_user, &stations);

    let url = format!("rtsp://cam:secret@127.0.0.1:{cam_port}/cam");
    let mut caller = live.call(
        &alice,
        &[
            "--room",
            &room,
            "--duration-s",
            "9",
            "--video",
            &url,
            "--rtsp-transport",
            "udp",
        ],
    );
    let connected = hub.wait_state("connected", CONNECT);
    let id = call_id(&connected.value);
    thread::sleep(Duration::from_secs(3));
    let (status, asked) = http(port, "POST", &format!("/calls/{id}/keyframe"), None, None);
    assert_eq!(
        (status, &asked["requested"]),
        (200, &json!(true)),
        "{asked}"
    );
    // A second request within a second is not sent.
    let (_, again) = http(port, "POST", &format!("/calls/{id}/keyframe"), None, None);
    assert_eq!(again["requested"], false, "{again}");
    assert_eq!(
        caller.wait_exit(Duration::from_secs(60)),
        0,
        "{}",
        caller.report()
    );
    let ended = hub.wait_for("the call's end", EXIT, |v| {
        v["event"] == "recorded" && v["call_id"] == id.as_str()
    });

    // The camera refuses TCP (461), so what follows came over UDP; its Opus reaches the
    // recording below.
    // The PLI crossed the call and got the camera's cached GOP (IDR and frames since).
    let answers: Vec<Value> = caller
        .events_of("keyframe_request")
        .iter()
        .map(|k| k["answer"].clone())
        .collect();
    assert!(
        answers.contains(&json!("cached_gop")),
        "keyframe requests seen by the caller: {answers:?}\n{}",
        caller.report()
    );
    let (_, call) = http(port, "GET", &format!("/calls/{id}"), None, None);
    assert!(
        call["stats"]["keyframes_requested"].as_u64() >= Some(1),
        "{call}"
    );

    // The recording: the camera's H.264 at 640x480 and its Opus, and two keyframes (the one
    // the call started with and the one the request brought) within one camera GOP.
    let path = ended.value["path"]
        .as_str()
        .unwrap_or_else(|| panic!("no recording path in {}", ended.value))
        .to_owned();
    let probe = ffprobe(Path::new(&path));
    let streams = probe["streams"].as_array().cloned().unwrap_or_default();
    let video = streams
        .iter()
        .find(|s| s["codec_type"] == "video")
        .unwrap_or_else(|| panic!("no video stream in {path}: {probe}"));
    assert_eq!(video["codec_name"], "h264", "{probe}");
    assert_eq!(
        (video["width"].as_u64(), video["height"].as_u64()),
        (Some(640), Some(480)),
        "{probe}"
    );
    let audio = streams.iter().find(|s| s["codec_type"] == "audio");
    assert_eq!(
        audio.map(|a| a["codec_name"].clone()),
        Some(json!("opus")),
        "{probe}"
    );
    let audio_packets: u64 = audio
        .and_then(|a| a["nb_read_frames"].as_str())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        audio_packets >= 200,
        "{audio_packets} Opus packets in {path}: {probe}"
    );
    // The call began with the GOP so far and the request brought it again, so the
    // recording holds two keyframes (the camera's next IDR is 20 s away) and its frames
    // decode from the start: 8+ s at 15 fps.
    let keyframes = video_keyframes(&path);
    assert!(keyframes >= 2, "{keyframes} keyframes in {path}");
    let frames: u64 = video["nb_read_frames"]
        .as_str()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        frames >= 100,
        "only {frames} decodable video frames in {path}: {probe}"
    );
    hub.terminate();
    assert_eq!(hub.wait_exit(EXIT), 0, "{}", hub.report());
}

/// The doorbell loop with real processes: a caller the door station answers presses a wrong
/// PIN, then the right one (`call --dtmf`); the webhook gets exactly one `door_opened` for
/// that station and call, and `dtmf` events without digits (a PIN station hides them); the
/// PIN is in no line the hub writes. The hub presses digits back with
/// `POST /calls/ID/dtmf` (bad digits 400, unknown call 404) and the caller reports them.
#[test]
fn the_pin_pressed_in_a_call_opens_the_door_through_the_webhook() {
    let name = "the_pin_pressed_in_a_call_opens_the_door_through_the_webhook";
    if !in_loopback_namespace(name) {
        return;
    }
    let live = Live::start(name);
    let hub_user = live.user("hub");
    let alice = live.user("alice");
    let room = live.hs.create_dm(&alice, &hub_user);
    let (stations, received) = pin_station(
        &live,
        &format!(
            "video = \"none\"\naudio = \"tone\"\nanswer = [\"{}\"]",
            alice.id
        ),
    );
    let (mut hub, port) = start_hub(&live, &hub_user, &stations);

    let pressed = "1*8#1*9#";
    let mut caller = live.call(
        &alice,
        &[
            "--room",
            &room,
            "--duration-s",
            "8",
            "--dtmf",
            pressed,
            "--dtmf-after-s",
            "1",
        ],
    );
    let connected = hub.wait_state("connected", CONNECT);
    let id = call_id(&connected.value);

    let press = |call: &str, digits: &str| {
        http(
            port,
            "POST",
            &format!("/calls/{call}/dtmf"),
            None,
            Some(&json!({ "digits": digits })),
        )
    };
    let (status, e) = press(&id, "12x");
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"].as_str().unwrap_or_default().contains("'x'"),
        "{e}"
    );
    assert_eq!(press("no-such-call", "1").0, 404);
    let (status, ok) = press(&id, "9*");
    assert_eq!((status, &ok["queued"]), (200, &json!(2)), "{ok}");

    wait_door_opened(&mut hub, &id, &caller);
    assert_eq!(caller.wait_exit(CONNECT), 0, "{}", caller.report());
    hub.wait_for("the call's end", EXIT, |v| v["event"] == "ended");
    assert_pressed_once_and_opened_once(&hub, &id, pressed, &received);
    let caller_got: String = caller
        .events_of("dtmf")
        .iter()
        .filter_map(|v| v["digit"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(caller_got, "9*", "{}", caller.report());

    // The PIN is in nothing the hub wrote.
    hub.terminate();
    hub.wait_exit(EXIT);
    let stderr = fs::read_to_string(live.dir.join("hub.stderr")).unwrap_or_default();
    let stdout: Vec<String> = hub.events().iter().map(|e| e.value.to_string()).collect();
    assert!(!stderr.contains("1*9") && !stdout.concat().contains("1*9"));
}

/// The start of a talkback or speaker test: its Synapse, with `hub` and `alice` in a DM.
struct Dm {
    live: Live,
    hub_user: User,
    alice: User,
    room: String,
}

/// `None` outside the test's loopback namespace (the test re-ran itself inside one).
fn hub_and_alice(name: &str) -> Option<Dm> {
    hub_and_alice_in(name, false)
}

/// As [`hub_and_alice`], the DM encrypted when `encrypted` (as every DM Element makes).
fn hub_and_alice_in(name: &str, encrypted: bool) -> Option<Dm> {
    if !in_loopback_namespace(name) {
        return None;
    }
    let live = Live::start(name);
    let hub_user = live.user("hub");
    let alice = live.user("alice");
    let room = if encrypted {
        live.hs.create_encrypted_dm(&alice, &hub_user)
    } else {
        live.hs.create_dm(&alice, &hub_user)
    };
    Some(Dm {
        live,
        hub_user,
        alice,
        room,
    })
}

/// The js peer (libwebrtc, its microphone a 440 Hz sine) calls the hub for `seconds`, with
/// `args` for peer.mjs.
fn peer_calls(dm: &Dm, seconds: &str, args: &[&str]) -> Proc {
    let mut all = vec![
        "--call",
        &dm.room,
        "--duration-s",
        seconds,
        "--max-wait-s",
        "60",
    ];
    all.extend(args);
    dm.live.js_peer(&dm.alice, &all)
}

/// A camera with an ONVIF backchannel on `port` (password `secret`) whose speaker writes what
/// it decodes to `speaker`, with `args` for rtsp_server.py; and a station `door` on it with
/// talkback and `keys`, answering alice.
fn talkback_camera(
    dm: &Dm,
    name: &str,
    port: u16,
    speaker: &Path,
    args: &[&str],
    keys: &str,
) -> (Proc, String) {
    let speaker_s = speaker.display().to_string();
    let mut all = args.to_vec();
    all.extend(["--backchannel-out", &speaker_s]);
    let camera = rtsp_server_with(&dm.live.dir, name, port, &all);
    let pw = write(&dm.live.dir.join("camera-password"), "secret\n");
    let station = format!(
        "[[station]]\nname = \"door\"\nvideo = \"rtsp://cam@127.0.0.1:{port}/cam\"\n\
         rtsp_password_file = \"{}\"\ntalkback = true\n{keys}answer = [\"{}\"]\n",
        pw.display(),
        dm.alice.id
    );
    (camera, station)
}

/// Waits for the hub's `event` (`talkback`, `speaker`) in `state`.
fn wait_speaker_state(hub: &mut Proc, event: &str, state: &str, timeout: Duration) -> Value {
    hub.wait_for(&format!("{event} {state}"), timeout, |v| {
        v["event"] == event && v["state"] == state
    })
    .value
}

/// The talkback tests' CPU windows: 3 s, or `CALL_ASSIST_CPU_WINDOW_S` (README's figures: 15 s,
/// with `CALL_ASSIST_BIN=target/release/call-assist`).
fn cpu_window_s() -> u64 {
    std::env::var("CALL_ASSIST_CPU_WINDOW_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

/// The call takes the camera's speaker, its audio `codec` played as `speaker_codec`, and the
/// speaker file gets 2 s of the peer's sine.
fn camera_hears_the_call(hub: &mut Proc, codec: &str, speaker_codec: &str, speaker: &Path) {
    let speaking = wait_speaker_state(hub, "talkback", "speaking", CONNECT);
    assert_eq!(
        (&speaking["codec"], &speaking["speaker_codec"]),
        (&json!(codec), &json!(speaker_codec)),
        "{speaking}"
    );
    wait_for_speaker(speaker, 2.0, Duration::from_secs(20), hub);
    assert_hears_the_sine(speaker, hub);
}

/// Waits until the speaker file holds `seconds` of sound.
fn wait_for_speaker(path: &Path, seconds: f64, timeout: Duration, hub: &Proc) {
    let want = (seconds * 16_000.0) as u64;
    let start = Instant::now();
    while file_len(path) < want {
        assert!(
            start.elapsed() < timeout,
            "the camera's speaker played {} bytes within {timeout:?}\n{}",
            file_len(path),
            hub.report()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

#[test]
fn the_callers_voice_reaches_the_camera_speaker_and_mute_gates_it() {
    let Some(dm) = hub_and_alice("the_callers_voice_reaches_the_camera_speaker_and_mute_gates_it")
    else {
        return;
    };
    let cam_port = closed_port();
    let speaker = dm.live.dir.join("speaker.raw");
    let camera_args = ["--auth", "digest", "--backchannel", "pcmu"];
    let (camera, stations) = talkback_camera(&dm, "rtsp", cam_port, &speaker, &camera_args, "");
    let (mut hub, port) = start_hub(&dm.live, &dm.hub_user, &stations);
    let ready = wait_speaker_state(&mut hub, "talkback", "ready", READY);
    assert_eq!(
        (&ready["codec"], &ready["station"]),
        (&json!("Pcmu"), &json!("door")),
        "{ready}"
    );
    let (_, health) = http(port, "GET", "/health", None, None);
    assert_eq!(health["stations"][0]["talkback"], "ready", "{health}");
    let (_, stations) = http(port, "GET", "/stations", None, None);
    assert_eq!(stations[0]["talkback"], "ready", "{stations}");

    let window = cpu_window_s();
    let mut peer = peer_calls(&dm, &(24 + 2 * window).to_string(), &[]);
    let connected = hub.wait_state("connected", CONNECT);
    let id = call_id(&connected.value);
    let (_, call) = http(port, "GET", &format!("/calls/{id}"), None, None);
    assert_eq!(call["talkback"], "unmuted", "{call}");
    // No transcoding: the hub's answer put PCMU first, so the peer sends what the camera plays.
    camera_hears_the_call(&mut hub, "Pcmu", "Pcmu", &speaker);

    // Muted: nothing more reaches the door, the call goes on.
    let (status, m) = http(port, "POST", &format!("/calls/{id}/mute"), None, None);
    assert_eq!((status, &m["talkback"]), (200, &json!("muted")), "{m}");
    thread::sleep(Duration::from_millis(500));
    let before = file_len(&speaker);
    let cpu_muted = cpu_ticks(hub.pid());
    thread::sleep(Duration::from_secs(window));
    let cpu_muted = cpu_ticks(hub.pid()) - cpu_muted;
    let muted_bytes = file_len(&speaker) - before;
    assert!(
        muted_bytes < 1600,
        "{muted_bytes} bytes reached the speaker while muted"
    );
    let (_, call) = http(port, "GET", &format!("/calls/{id}"), None, None);
    assert_eq!(
        (&call["talkback"], &call["state"]),
        (&json!("muted"), &json!("connected")),
        "{call}"
    );
    // Unmuted: the first sound reaches the speaker file within (hub + camera) latency.
    let before = file_len(&speaker);
    let (status, u) = http(port, "POST", &format!("/calls/{id}/unmute"), None, None);
    let unmuted_at = Instant::now();
    assert_eq!((status, &u["talkback"]), (200, &json!("unmuted")), "{u}");
    while file_len(&speaker) == before && unmuted_at.elapsed() < Duration::from_secs(2) {
        thread::sleep(Duration::from_millis(2));
    }
    let first_sound = unmuted_at.elapsed();
    let before = file_len(&speaker);
    let cpu_talking = cpu_ticks(hub.pid());
    thread::sleep(Duration::from_secs(window));
    let cpu_talking = cpu_ticks(hub.pid()) - cpu_talking;
    let unmuted_bytes = file_len(&speaker) - before;
    assert!(
        unmuted_bytes > 13_000 * window,
        "only {unmuted_bytes} bytes reached the speaker in {window} s after unmute"
    );
    eprintln!(
        "figures: unmute -> first sound at the camera speaker {} ms; hub CPU over {window} s: \
         {} ticks muted, {} ticks talking (10 ms ticks)",
        first_sound.as_millis(),
        cpu_muted,
        cpu_talking
    );

    // The camera dies and comes back: talkback is lost and returns, the call goes on.
    signal(camera.pid(), "KILL");
    hub.wait_for("the speaker lost", EXIT, |v| {
        v["event"] == "talkback" && v["state"] == "lost"
    });
    let (_camera2, _) = talkback_camera(&dm, "rtsp-2", cam_port, &speaker, &camera_args, "");
    let lost_at = Instant::now();
    hub.wait_for_after("the speaker back", lost_at, CONNECT, |v| {
        v["event"] == "talkback" && v["state"] == "ready"
    });
    // The restarted camera builds its pipeline first (slow on a loaded machine).
    wait_for_speaker(&speaker, 2.0, Duration::from_secs(20), &hub);
    assert_hears_the_sine(&speaker, &hub);
    let (_, call) = http(port, "GET", &format!("/calls/{id}"), None, None);
    assert_eq!(call["state"], "connected", "{call}");

    assert_eq!(peer.wait_exit(CONNECT), 0, "{}", peer.report());
    hub.wait_for("the call's end", EXIT, |v| v["event"] == "ended");
    let (status, _) = http(port, "POST", &format!("/calls/{id}/mute"), None, None);
    assert_eq!(status, 409);
    hub.terminate();
    assert_eq!(hub.wait_exit(EXIT), 0, "{}", hub.report());
    let logs = fs::read_to_string(dm.live.dir.join("hub.stderr")).unwrap_or_default();
    assert!(!logs.contains("secret"), "the camera password was logged");
}

#[test]
fn a_pcma_camera_speaker_over_udp_gets_pcma_from_the_peer_untranscoded() {
    let Some(dm) =
        hub_and_alice("a_pcma_camera_speaker_over_udp_gets_pcma_from_the_peer_untranscoded")
    else {
        return;
    };
    let cam_port = closed_port();
    let speaker = dm.live.dir.join("speaker.raw");
    let (_camera, stations) = talkback_camera(
        &dm,
        "rtsp",
        cam_port,
        &speaker,
        &["--protocols", "udp", "--backchannel", "pcma"],
        "rtsp_transport = \"udp\"\n",
    );
    let (mut hub, _port) = start_hub(&dm.live, &dm.hub_user, &stations);
    let ready = wait_speaker_state(&mut hub, "talkback", "ready", READY);
    assert_eq!(ready["codec"], "Pcma", "{ready}");
    let mut peer = peer_calls(&dm, "15", &[]);
    camera_hears_the_call(&mut hub, "Pcma", "Pcma", &speaker);
    assert_eq!(peer.wait_exit(CONNECT), 0, "{}", peer.report());
    hub.wait_for("the call's end", EXIT, |v| v["event"] == "ended");
    hub.terminate();
    assert_eq!(hub.wait_exit(EXIT), 0, "{}", hub.report());
}

/// The Opus decoder (cargo feature `opus`): a peer that offers only Opus is decoded and
/// G.711-encoded for the camera's speaker; prints the hub's CPU with the call muted and talking.
#[test]
fn an_opus_only_callers_voice_is_transcoded_for_the_camera_speaker() {
    let Some(dm) = hub_and_alice("an_opus_only_callers_voice_is_transcoded_for_the_camera_speaker")
    else {
        return;
    };
    let cam_port = closed_port();
    let speaker = dm.live.dir.join("speaker.raw");
    let (_camera, stations) = talkback_camera(
        &dm,
        "rtsp",
        cam_port,
        &speaker,
        &["--backchannel", "pcmu"],
        "",
    );
    let (mut hub, port) = start_hub(&dm.live, &dm.hub_user, &stations);
    wait_speaker_state(&mut hub, "talkback", "ready", READY);
    let window = cpu_window_s();
    let call_s = (8 + 2 * window).to_string();
    let mut peer = peer_calls(&dm, &call_s, &["--audio-codec", "opus"]);
    let connected = hub.wait_state("connected", CONNECT);
    let id = call_id(&connected.value);
    camera_hears_the_call(&mut hub, "Opus", "Pcmu", &speaker);
    // The hub's CPU over a window muted (nothing decoded) and one talking (Opus decoded to
    // PCMU).
    let mut ticks = Vec::new();
    for (path, state) in [("mute", "muted"), ("unmute", "unmuted")] {
        let (status, v) = http(port, "POST", &format!("/calls/{id}/{path}"), None, None);
        assert_eq!((status, &v["talkback"]), (200, &json!(state)), "{v}");
        thread::sleep(Duration::from_millis(500));
        let before = cpu_ticks(hub.pid());
        thread::sleep(Duration::from_secs(window));
        ticks.push(cpu_ticks(hub.pid()) - before);
    }
    eprintln!(
        "figures: Opus -> PCMU talkback: hub CPU over {window} s: {} ticks muted, {} ticks \
         talking (10 ms ticks)",
        ticks[0], ticks[1]
    );
    assert_hears_the_sine(&speaker, &hub);
    assert_eq!(peer.wait_exit(CONNECT), 0, "{}", peer.report());
    hub.terminate();
    assert_eq!(hub.wait_exit(EXIT), 0, "{}", hub.report());
}

#[test]
fn a_station_speaker_plays_the_caller_and_mute_silences_it() {
    let Some(dm) = hub_and_alice("a_station_speaker_plays_the_caller_and_mute_silences_it") else {
        return;
    };
    let speaker = dm.live.dir.join("hub-speaker.raw");
    alsa_config(&dm.live.dir, &speaker);
    let stations = format!(
        "[[station]]\nname = \"door\"\nvideo = \"none\"\nspeaker = \"hubspeaker\"\n\
         answer = [\"{}\"]\n",
        dm.alice.id
    );
    let (mut hub, port) = start_hub(&dm.live, &dm.hub_user, &stations);
    let (_, health) = http(port, "GET", "/health", None, None);
    assert_eq!(health["stations"][0]["speaker"], "ready", "{health}");

    let mut peer = peer_calls(&dm, "30", &[]);
    let connected = hub.wait_state("connected", CONNECT);
    let id = call_id(&connected.value);
    let playing = wait_speaker_state(&mut hub, "speaker", "playing", CONNECT);
    assert_eq!(
        (&playing["codec"], &playing["station"]),
        (&json!("Pcmu"), &json!("door")),
        "{playing}"
    );
    thread::sleep(Duration::from_secs(3));
    assert_hears_the_sine(&speaker, &hub);

    // Muted: the speaker plays silence; unmuted: the sine again.
    let (status, m) = http(port, "POST", &format!("/calls/{id}/mute"), None, None);
    assert_eq!((status, &m["talkback"]), (200, &json!("muted")), "{m}");
    thread::sleep(Duration::from_secs(1));
    let quiet = speaker_tail(&speaker, 0.5);
    let rms = (quiet.iter().map(|v| v * v).sum::<f64>() / quiet.len().max(1) as f64).sqrt();
    assert!(rms < 10.0, "muted, the speaker still played (rms {rms:.0})");
    let (status, u) = http(port, "POST", &format!("/calls/{id}/unmute"), None, None);
    assert_eq!((status, &u["talkback"]), (200, &json!("unmuted")), "{u}");
    thread::sleep(Duration::from_secs(3));
    assert_hears_the_sine(&speaker, &hub);

    hub.terminate();
    assert_eq!(hub.wait_exit(EXIT), 0, "{}", hub.report());
    let _ = peer.wait_exit(EXIT);
}

/// The issue's "done when", with the browser itself: the door station calls its owner in an
/// encrypted DM, matrix-js-sdk in Chromium with its Rust crypto (what Element Web runs) answers, and the owner presses a wrong
/// PIN and then the right one with `MatrixCall.sendDtmfDigit`, the call Element's dial pad
/// makes, through Chromium's RTCDTMFSender. The hub reports each press once and in order, the
/// webhook (Home Assistant's trigger) gets them and exactly one `door_opened`.
#[test]
fn a_browser_presses_the_pin_on_its_dial_pad_and_the_webhook_opens_the_door() {
    let name = "a_browser_presses_the_pin_on_its_dial_pad_and_the_webhook_opens_the_door";
    let Some(dm) = hub_and_alice_in(name, true) else {
        return;
    };
    let (stations, received) = pin_station(
        &dm.live,
        &format!(
            "video = \"testclip\"\naudio = \"tone\"\nmay_call = [\"{}\"]",
            dm.alice.id
        ),
    );
    let (mut hub, port) = start_hub(&dm.live, &dm.hub_user, &stations);

    let pressed = "1*8#1*9#";
    let (mut browser, id) = the_door_calls_the_browser(
        &dm.live,
        &mut hub,
        port,
        &dm.alice,
        &["--dtmf", pressed, "--dtmf-after-s", "1"],
    );

    wait_door_opened(&mut hub, &id, &browser);
    // The owner's automation hangs up once the door is open.
    hang_up_the_browser(port, &id, &mut browser);
    let r = browser.last_json();
    assert_eq!(r["dtmf"]["opponent_supports_dtmf"], true, "{r}");
    assert_eq!(r["dtmf"]["error"], Value::Null, "{r}");
    assert_eq!(r["dtmf"]["sent"], pressed, "{r}");
    // Chromium's RTCDTMFSender played each digit (its tonechange events).
    assert_eq!(r["dtmf"]["tone_change"], pressed, "{r}");
    assert_eq!(r["telephone_event"], true, "{r}");
    assert_eq!(
        (&r["room_encrypted"], &r["decryption_failures"]),
        (&json!(true), &json!(0)),
        "{r}"
    );
    // And the owner saw the door: Chromium decoded the station's video.
    assert!(
        r["rtp"]["inbound"]["video"]["frames_decoded"].as_u64() > Some(0),
        "{r}"
    );

    assert_pressed_once_and_opened_once(&hub, &id, pressed, &received);
    hub.terminate();
    hub.wait_exit(EXIT);
}

/// Talkback's "done when" with Element's stack: the door station (a camera with an ONVIF
/// speaker) calls its owner in an encrypted DM; matrix-js-sdk in Chromium answers with a
/// microphone that plays a 440 Hz sine; the camera's speaker hears that sine (by frequency).
/// The hub's offer puts G.711 first, so Chromium sends PCMU and nothing is transcoded.
#[test]
fn the_doorbell_calls_a_browser_and_the_owner_is_heard_at_the_door() {
    let name = "the_doorbell_calls_a_browser_and_the_owner_is_heard_at_the_door";
    let Some(dm) = hub_and_alice_in(name, true) else {
        return;
    };
    let speaker = dm.live.dir.join("speaker.raw");
    let may_call = format!("may_call = [\"{}\"]\n", dm.alice.id);
    let (_camera, station) = talkback_camera(
        &dm,
        "rtsp",
        closed_port(),
        &speaker,
        &["--backchannel", "pcmu"],
        &may_call,
    );
    let (mut hub, port) = start_hub(&dm.live, &dm.hub_user, &station);
    wait_speaker_state(&mut hub, "talkback", "ready", READY);
    let wav = dm.live.dir.join("owner-440.wav");
    write_sine_wav(&wav, 440, 10);
    let wav_s = wav.display().to_string();
    let (mut browser, id) = the_door_calls_the_browser(
        &dm.live,
        &mut hub,
        port,
        &dm.alice,
        &["--audio-wav", &wav_s, "--raw-audio"],
    );
    camera_hears_the_call(&mut hub, "Pcmu", "Pcmu", &speaker);

    hang_up_the_browser(port, &id, &mut browser);
    let r = browser.last_json();
    assert_eq!(r["room_encrypted"], true, "{r}");
    assert_eq!(r["rtp"]["outbound"]["audio"]["codec"], "audio/PCMU", "{r}");
    hub.terminate();
    hub.wait_exit(EXIT);
}

/// Waits until the hub has the keys of the browser peer's device (a new device each run):
/// a room key shared before that leaves the device out, and the first call event would reach
/// it undecryptable. An owner's phone is no newer than its hub's last sync.
fn hub_knows_the_device_of(hub: &mut Proc, browser: &Proc, user: &User) {
    let line = browser
        .stderr_line("Rust crypto ready (device ")
        .unwrap_or_else(|| panic!("no device id from the browser\n{}", browser.report()));
    let device = line
        .rsplit("(device ")
        .next()
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("no device id in {line:?}"));
    hub.wait_stderr_all(
        &[&format!("e2ee: device keys of {}: ", user.id), device],
        Duration::from_secs(30),
    );
}

/// The door station calls `owner`'s browser peer (`--answer --e2ee` and `args`), once the
/// hub has the new device's keys: the browser and the call's id once the hub is connected.
fn the_door_calls_the_browser(
    live: &Live,
    hub: &mut Proc,
    port: u16,
    owner: &User,
    args: &[&str],
) -> (Proc, String) {
    let mut all = vec!["--answer", "--e2ee", "--max-wait-s", "90"];
    all.extend_from_slice(args);
    let mut browser = live.browser_peer(owner, &all);
    browser.wait_stderr("waiting for an incoming call", Duration::from_secs(60));
    hub_knows_the_device_of(hub, &browser, owner);
    let (status, placed) = http(
        port,
        "POST",
        "/calls",
        None,
        Some(&json!({"station": "door", "to": owner.id})),
    );
    assert_eq!(status, 201, "{placed}\n{}", hub.report());
    let connected = hub.wait_state("connected", CONNECT);
    (browser, call_id(&connected.value))
}

/// The hub hangs up (as the owner's automation does) and the browser peer ends well, having
/// shown the station's media as Element does (one user-media feed).
fn hang_up_the_browser(port: u16, id: &str, browser: &mut Proc) {
    let (status, e) = http(port, "DELETE", &format!("/calls/{id}"), None, None);
    assert!(status == 200 || status == 204, "{status} {e}");
    assert_eq!(browser.wait_exit(CONNECT), 0, "{}", browser.report());
    assert_one_usermedia_feed(&browser.last_json());
}

/// A door station whose PIN is `1*9#` (`lines`: its video, audio and who it answers or may
/// call) and a webhook for `dtmf` and `door`, as Home Assistant's trigger: the stations'
/// config and what the webhook receiver got.
fn pin_station(live: &Live, lines: &str) -> (String, Arc<Mutex<Vec<Value>>>) {
    let (receiver, received) = webhook_receiver();
    let url = write(
        &live.dir.join("webhook"),
        &format!("http://{receiver}/api/webhook/s3cret-webhook-id"),
    );
    let stations = format!(
        "[[station]]\nname = \"door\"\npin = \"1*9#\"\n{lines}\n\n\
         [[webhook]]\nurl_file = \"{}\"\nevents = [\"dtmf\", \"door\"]\n",
        url.display()
    );
    (stations, received)
}

/// The hub's `door_opened` for the door station and call `id`.
fn wait_door_opened(hub: &mut Proc, id: &str, peer: &Proc) {
    let door = hub.wait_event("door", Duration::from_secs(30));
    assert_eq!(
        (
            &door.value["action"],
            &door.value["station"],
            &door.value["call_id"]
        ),
        (&json!("door_opened"), &json!("door"), &json!(id)),
        "{}\n{}",
        door.value,
        peer.report()
    );
}

/// Each of `pressed` reported once (without the digit: a PIN station hides them) and one
/// door for two entries, the wrong one first; the webhook got the same, in order, the door
/// after the last digit.
fn assert_pressed_once_and_opened_once(
    hub: &Proc,
    id: &str,
    pressed: &str,
    received: &Mutex<Vec<Value>>,
) {
    assert_eq!(hub.events_of("door").len(), 1, "{}", hub.report());
    let dtmf = hub.events_of("dtmf");
    assert_eq!(dtmf.len(), pressed.len(), "{}", hub.report());
    assert!(
        dtmf.iter()
            .all(|v| v["digit"].is_null() && v["call_id"] == id && v["station"] == "door"),
        "{dtmf:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let kinds = loop {
        let got: Vec<String> = received
            .lock()
            .unwrap()
            .iter()
            .map(|v| v["event"].as_str().unwrap_or_default().to_owned())
            .collect();
        if got.len() > pressed.len() || Instant::now() > deadline {
            break got;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let mut want = vec!["dtmf".to_owned(); pressed.len()];
    want.push("door".to_owned());
    assert_eq!(kinds, want);
}
