//! Harness for the live tests (`tests/tests/live.rs`): a real Synapse (`tests/e2e/synapse.py`),
//! the `call-assist` binary and the matrix-js-sdk peer (`tests/interop/peer.mjs`) as child
//! processes, every one of them inside a network namespace whose only interface is `lo`.
//!
//! Every wait has a bound: a child that overstays it is killed and the test fails with the
//! tail of its stderr. Children are killed when their [`Proc`] is dropped and Synapse is
//! stopped when its [`Synapse`] is dropped, so a failing assertion leaves nothing running.
//! Each test keeps its files (Synapse's logs, each child's stdout and stderr) in
//! `target/e2e/live/<pid of the test run>/<test>/`.

use std::collections::VecDeque;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

/// Set in the environment of a test re-run inside `loopback-only.sh`, so it never re-runs twice.
const REEXEC_ENV: &str = "CALL_ASSIST_LIVE_NETNS";
/// How long one `synapse.py` command may take (its own start timeout is 60 s).
const SYNAPSE_PY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a whole test re-run inside the namespace may take.
const REEXEC_TIMEOUT: Duration = Duration::from_secs(600);
/// Stderr lines of a child kept in memory for failure reports (all of them go to its file).
const STDERR_TAIL_LINES: usize = 4000;
/// Stderr lines of a child quoted in a failure report.
const REPORT_LINES: usize = 40;
const POLL: Duration = Duration::from_millis(50);

/// The workspace root (`tests/..`).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Interfaces of this process's network namespace other than `lo`.
pub fn non_loopback_interfaces() -> Vec<String> {
    // /proc/self/net follows the reader's namespace (/sys/class/net would show the mounter's).
    let dev = fs::read_to_string("/proc/self/net/dev").unwrap_or_default();
    dev.lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .filter(|n| !n.is_empty() && *n != "lo")
        .map(str::to_owned)
        .collect()
}

/// True when the test may go on here: this namespace has only `lo`. Otherwise runs test
/// `name` of this binary again inside `tests/e2e/loopback-only.sh`, asserts that it passed
/// and returns false (the caller returns at once). Nothing the live tests start may ever
/// see another interface: libwebrtc binds and gathers on every interface that has an address.
pub fn in_loopback_namespace(name: &str) -> bool {
    let others = non_loopback_interfaces();
    if others.is_empty() {
        return true;
    }
    assert!(
        std::env::var_os(REEXEC_ENV).is_none(),
        "re-run inside tests/e2e/loopback-only.sh, yet interfaces {others:?} are still there"
    );
    let exe = std::env::current_exe().expect("path of the test binary");
    let script = workspace_root().join("tests/e2e/loopback-only.sh");
    let out = run(
        Command::new(&script)
            .arg(&exe)
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env(REEXEC_ENV, std::process::id().to_string()),
        REEXEC_TIMEOUT,
    );
    // Shown by libtest when the test fails (or with --nocapture).
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "{name} failed inside {} ({}); its output is above",
        script.display(),
        out.status
    );
    false
}

/// For a bench binary (`main`, not libtest): when this namespace has another interface than
/// `lo`, runs this binary again with `args` inside `tests/e2e/loopback-only.sh` and exits
/// with its code; otherwise returns and the bench goes on here.
pub fn bench_in_loopback_namespace(args: &[String]) {
    if non_loopback_interfaces().is_empty() {
        return;
    }
    let exe = std::env::current_exe().expect("path of this bench");
    let status = Command::new(workspace_root().join("tests/e2e/loopback-only.sh"))
        .arg(exe)
        .args(args)
        .env(REEXEC_ENV, std::process::id().to_string())
        .status()
        .expect("tests/e2e/loopback-only.sh");
    std::process::exit(status.code().unwrap_or(1));
}

/// The Synapse venv made by `tests/e2e/setup.sh`.
pub fn venv() -> PathBuf {
    let venv = workspace_root().join("target/e2e/venv");
    assert!(
        venv.join("bin/python").exists(),
        "no Synapse venv at {}: run tests/e2e/setup.sh first (it needs the network, so \
         outside the loopback-only namespace)",
        venv.display()
    );
    venv
}

/// The `call-assist` binary next to this test binary's directory (`target/debug/`), or
/// `$CALL_ASSIST_BIN`. Cargo does not build another package's binary for these tests:
/// `cargo build -p call-assist` must have run.
pub fn agent_binary() -> PathBuf {
    let bin = match std::env::var_os("CALL_ASSIST_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            // target/debug/deps/live-HASH -> target/debug/call-assist
            let exe = std::env::current_exe().expect("path of the test binary");
            let profile_dir = exe
                .parent()
                .and_then(Path::parent)
                .expect("test binary lives in <target>/<profile>/deps");
            profile_dir.join("call-assist")
        }
    };
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p call-assist` before these tests",
        bin.display()
    );
    warn_if_stale(&bin);
    bin
}

/// A binary older than the shell's or core's sources is most likely a forgotten rebuild.
fn warn_if_stale(bin: &Path) {
    let built = fs::metadata(bin).and_then(|m| m.modified()).ok();
    let root = workspace_root();
    let newest = [root.join("shell/src"), root.join("core/src")]
        .iter()
        .filter_map(|d| newest_mtime(d))
        .max();
    if let (Some(built), Some(newest)) = (built, newest) {
        if newest > built {
            eprintln!(
                "warning: {} is older than the sources in shell/ or core/: run `cargo build -p call-assist`",
                bin.display()
            );
        }
    }
}

fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest_mtime(&path)
        } else {
            entry.metadata().and_then(|m| m.modified()).ok()
        };
        newest = newest.max(t);
    }
    newest
}

/// An empty directory for test `name`: `target/e2e/live/<run>/<name>`, kept after the test
/// for its logs. `<run>` is the pid of this test process (of the one that re-ran it inside the
/// namespace, if any), so that runs side by side never share a directory; directories of runs
/// whose process is gone are removed.
pub fn test_dir(name: &str) -> PathBuf {
    let live = workspace_root().join("target/e2e/live");
    let run = std::env::var(REEXEC_ENV)
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or_else(std::process::id);
    if let Ok(entries) = fs::read_dir(&live) {
        for entry in entries.flatten() {
            let pid = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok());
            if pid.is_some_and(|pid| pid != run && !Path::new(&format!("/proc/{pid}")).exists()) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = live.join(run.to_string()).join(name);
    if dir.exists() {
        fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("emptying {}: {e}", dir.display()));
    }
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// A loopback TCP port nobody listens on (bound, then released).
pub fn closed_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

// ---------------------------------------------------------------- bounded commands

/// What a finished command printed.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs `cmd` to its end, killing it (and failing) after `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let read_all = |mut r: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = read_all(Box::new(child.stdout.take().expect("piped stdout")));
    let err = read_all(Box::new(child.stderr.take().expect("piped stderr")));
    let status = match wait_bounded(&mut child, timeout) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {timeout:?}: killed");
        }
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
            Ok(None) => return None,
            Err(e) => panic!("waiting for pid {}: {e}", child.id()),
        }
    }
}

/// Sends `signal` (a name `kill` knows: TERM, INT, KILL) to `pid`.
pub fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

// ---------------------------------------------------------------- Synapse

/// A throwaway Synapse on 127.0.0.1 (server name `localhost`); stopped on drop.
pub struct Synapse {
    pub dir: PathBuf,
    pub base_url: String,
    pub port: u16,
    venv: PathBuf,
}

impl Synapse {
    /// Starts a fresh Synapse in `<dir>/synapse` on a free port.
    pub fn start(dir: &Path) -> Synapse {
        Self::start_with(dir, &[])
    }

    /// As [`Synapse::start`], with more `synapse.py start` options (`--turn-uri`, ...).
    pub fn start_with(dir: &Path, extra: &[&str]) -> Synapse {
        let venv = venv();
        let dir = dir.join("synapse");
        let mut args = vec!["start", "--venv"];
        let venv_s = path_str(&venv);
        args.push(&venv_s);
        args.extend(["--port", "0"]);
        args.extend(extra);
        let info = synapse_py(&dir, &args);
        let info: Value = serde_json::from_str(info.trim())
            .unwrap_or_else(|e| panic!("synapse.py start printed {info:?}: {e}"));
        let base_url = info["base_url"]
            .as_str()
            .unwrap_or_else(|| panic!("no base_url in {info}"))
            .to_owned();
        let port = base_url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {base_url}"));
        Synapse {
            dir,
            base_url,
            port,
            venv,
        }
    }

    /// Registers `localpart` with `password`; returns the user id.
    pub fn register(&self, localpart: &str, password: &str) -> String {
        let out = synapse_py(
            &self.dir,
            &["register", "--user", localpart, "--password", password],
        );
        out.trim().to_owned()
    }

    /// A DM created by `user` (localpart) that `invitee` (user id) has joined; returns its id.
    pub fn create_dm(&self, user: &User, invitee: &User) -> String {
        self.create_room(user, &[invitee], true)
    }

    /// An end-to-end encrypted DM (as Element's "Start chat": trusted_private_chat, is_direct,
    /// `m.room.encryption` in the initial state) created by `user`, joined by `invitee`.
    pub fn create_encrypted_dm(&self, user: &User, invitee: &User) -> String {
        self.room_with(user, &[invitee], &["--encrypted"])
    }

    /// A room created by `user` that each of `invitees` has joined (a DM when `direct`).
    pub fn create_room(&self, user: &User, invitees: &[&User], direct: bool) -> String {
        self.room_with(user, invitees, if direct { &[] } else { &["--no-direct"] })
    }

    fn room_with(&self, user: &User, invitees: &[&User], extra: &[&str]) -> String {
        let mut args = vec![
            "create-room",
            "--user",
            &user.localpart,
            "--password",
            &user.password,
        ];
        for i in invitees {
            args.extend(["--invite", &i.id]);
        }
        args.extend(extra);
        synapse_py(&self.dir, &args).trim().to_owned()
    }

    /// Stops Synapse (SIGTERM; SIGKILL after 10 s). The database and users stay.
    pub fn stop(&self) {
        synapse_py(&self.dir, &["stop"]);
    }

    /// Starts Synapse again on the same port with the same database.
    pub fn restart(&self) {
        let port = self.port.to_string();
        let info = synapse_py(
            &self.dir,
            &["start", "--venv", &path_str(&self.venv), "--port", &port],
        );
        assert!(
            info.contains(&self.base_url),
            "restarted Synapse is not at {}: {info}",
            self.base_url
        );
    }

    /// Whether `GET /_matrix/client/versions` answers 200 right now.
    pub fn answers(&self) -> bool {
        http_get_status(self.port, "/_matrix/client/versions") == Some(200)
    }
}

impl Drop for Synapse {
    fn drop(&mut self) {
        // Never panic here: this runs while a failed test unwinds.
        let _ = Command::new("python3")
            .arg(workspace_root().join("tests/e2e/synapse.py"))
            .args(["stop", "--dir"])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Runs `synapse.py CMD --dir DIR ARGS...` (the first of `args` is the command); returns its
/// stdout, fails with its stderr and the tail of Synapse's own output.
fn synapse_py(dir: &Path, args: &[&str]) -> String {
    let (cmd, rest) = args.split_first().expect("a synapse.py command");
    let out = run(
        Command::new("python3")
            .arg(workspace_root().join("tests/e2e/synapse.py"))
            .arg(cmd)
            .arg("--dir")
            .arg(dir)
            .args(rest),
        SYNAPSE_PY_TIMEOUT,
    );
    if !out.status.success() {
        let synapse_out = fs::read_to_string(dir.join("synapse.out")).unwrap_or_default();
        panic!(
            "synapse.py {} failed ({}):\n{}\n--- tail of {}/synapse.out:\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            dir.display(),
            tail(&synapse_out, 30)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Status code of a plain HTTP/1.0 GET to 127.0.0.1:`port`, None if nothing answered.
fn http_get_status(port: u16, path: &str) -> Option<u16> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut head = String::new();
    BufReader::new(s).read_line(&mut head).ok()?;
    head.split_whitespace().nth(1)?.parse().ok()
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------- one test's world

/// A registered user and its password.
#[derive(Clone, Debug)]
pub struct User {
    pub localpart: String,
    pub id: String,
    pub password: String,
}

/// One live test: its directory and its own Synapse.
pub struct Live {
    pub dir: PathBuf,
    pub hs: Synapse,
}

impl Live {
    /// A fresh directory for test `name` (see [`test_dir`]) and a Synapse running in it.
    pub fn start(name: &str) -> Live {
        let dir = test_dir(name);
        let hs = Synapse::start(&dir);
        Live { dir, hs }
    }

    /// Registers `localpart` with the password `<localpart>-pw`.
    pub fn user(&self, localpart: &str) -> User {
        let password = format!("{localpart}-pw");
        let id = self.hs.register(localpart, &password);
        assert_eq!(id, format!("@{localpart}:localhost"));
        User {
            localpart: localpart.to_owned(),
            id,
            password,
        }
    }

    /// `call-assist listen` as `user` with `--json --allow-loopback` and `args`.
    pub fn listen(&self, user: &User, args: &[&str]) -> Proc {
        self.agent(user, &user.password, "listen", args)
    }

    /// `call-assist call` as `user` with `--json --allow-loopback` and `args`.
    pub fn call(&self, user: &User, args: &[&str]) -> Proc {
        self.agent(user, &user.password, "call", args)
    }

    /// Prints the js peer's call setup figures (ms from placing its call to connected and to
    /// the first decoded video frame), for the README's tables.
    pub fn print_setup_figures(what: &str, peer: &Proc) {
        let r = peer.last_json();
        let t = &r["timings_ms"];
        let since = |k: &str| -> Option<i64> { Some(t[k].as_i64()? - t["placing"].as_i64()?) };
        println!(
            "figure: {what}: placing->connected {:?} ms, placing->first video frame {:?} ms",
            since("connected"),
            since("first_video_frame")
        );
    }

    /// `call-assist listen` as `user` with `env` set besides.
    pub fn listen_with_env(&self, user: &User, args: &[&str], env: &[(&str, &str)]) -> Proc {
        agent_with_env(
            &self.dir,
            &user.localpart,
            &self.hs.base_url,
            &user.id,
            &user.password,
            "listen",
            args,
            env,
        )
    }

    /// `call-assist <subcommand>` as `user`, logging in with `password`.
    pub fn agent(&self, user: &User, password: &str, subcommand: &str, args: &[&str]) -> Proc {
        agent(
            &self.dir,
            &user.localpart,
            &self.hs.base_url,
            &user.id,
            password,
            subcommand,
            args,
        )
    }

    /// The matrix-js-sdk peer (`tests/interop/peer.mjs`) as `user` with `args`
    /// (`--answer` or `--call ROOM`, ...).
    /// `hub` listens (answering only `caller`, one call); `caller`'s js peer calls it in
    /// `room` for 5 s with `peer_args` besides. Returns both after each exited with 0.
    pub fn js_peer_calls_listener(
        &self,
        caller: &User,
        hub: &User,
        room: &str,
        peer_args: &[&str],
    ) -> (Proc, Proc) {
        let mut listener = self.listen(hub, &["--allow", &caller.id, "--max-calls", "1"]);
        listener.wait_event("ready", Duration::from_secs(30));
        let mut args = vec!["--call", room, "--duration-s", "5", "--max-wait-s", "60"];
        args.extend_from_slice(peer_args);
        let mut peer = self.js_peer(caller, &args);
        let peer_exit = peer.wait_exit(Duration::from_secs(75));
        let exit = Duration::from_secs(20);
        assert_eq!(listener.wait_exit(exit), 0, "{}", listener.report());
        assert_eq!(peer_exit, 0, "{}\n{}", peer.report(), listener.report());
        (listener, peer)
    }

    /// The browser peer (`tests/interop/browser-peer.mjs`): matrix-js-sdk in headless
    /// Chromium with the browser's own WebRTC (RTCDTMFSender included), as `user` with `args`.
    /// Chromium missing fails the test: `.ci/run` installs Debian's `chromium`.
    pub fn browser_peer(&self, user: &User, args: &[&str]) -> Proc {
        let interop = workspace_root().join("tests/interop");
        assert!(
            interop.join("node_modules/esbuild").exists(),
            "no esbuild in {}/node_modules: run `npm ci` there first",
            interop.display()
        );
        let chromium = std::env::var_os("CHROMIUM").unwrap_or_else(|| "/usr/bin/chromium".into());
        assert!(
            Path::new(&chromium).exists(),
            "no Chromium at {chromium:?} (Debian: apt-get install chromium; or set CHROMIUM)"
        );
        let mut cmd = Command::new("node");
        cmd.arg(interop.join("browser-peer.mjs"))
            .args(["--homeserver", &self.hs.base_url, "--user", &user.id])
            .env("PEER_PASSWORD", &user.password)
            .env("CHROMIUM", &chromium)
            .args(args);
        Proc::spawn(&format!("{}-browser", user.localpart), cmd, &self.dir)
    }

    pub fn js_peer(&self, user: &User, args: &[&str]) -> Proc {
        let interop = workspace_root().join("tests/interop");
        assert!(
            interop.join("node_modules/@roamhq/wrtc").exists(),
            "no node_modules in {}: run `npm ci` there first (it needs the network)",
            interop.display()
        );
        let mut cmd = Command::new("node");
        cmd.arg(interop.join("peer.mjs"))
            .args(["--homeserver", &self.hs.base_url, "--user", &user.id])
            .args(["--password", &user.password])
            .args(args);
        Proc::spawn(&format!("{}-js", user.localpart), cmd, &self.dir)
    }
}

/// `call-assist <subcommand> --homeserver URL --user ID --json --allow-loopback
/// --state-dir <dir>/<name>-state ARGS...`, the password in `CALL_ASSIST_PASSWORD`.
pub fn agent(
    dir: &Path,
    name: &str,
    homeserver: &str,
    user_id: &str,
    password: &str,
    subcommand: &str,
    args: &[&str],
) -> Proc {
    agent_with_env(
        dir,
        name,
        homeserver,
        user_id,
        password,
        subcommand,
        args,
        &[],
    )
}

/// [`agent`] with `env` set besides (e.g. `ALSA_CONFIG_PATH`).
#[allow(clippy::too_many_arguments)]
pub fn agent_with_env(
    dir: &Path,
    name: &str,
    homeserver: &str,
    user_id: &str,
    password: &str,
    subcommand: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let state = dir.join(format!("{name}-state"));
    let mut cmd = Command::new(agent_binary());
    cmd.arg(subcommand)
        .args(["--homeserver", homeserver, "--user", user_id])
        .args(["--json", "--allow-loopback", "--state-dir"])
        .arg(&state)
        .args(args)
        .env("CALL_ASSIST_PASSWORD", password)
        .env_remove("CALL_ASSIST_ACCESS_TOKEN")
        // Plain log lines in the files and failure reports.
        .env("NO_COLOR", "1");
    if std::env::var_os("CALL_ASSIST_LOG").is_none() {
        cmd.env("CALL_ASSIST_LOG", "info");
    }
    cmd.envs(env.iter().copied());
    Proc::spawn(name, cmd, dir)
}

// ---------------------------------------------------------------- child processes

/// A stdout line that parsed as JSON, with when it arrived.
#[derive(Clone, Debug)]
pub struct Event {
    pub at: Instant,
    pub value: Value,
}

#[derive(Default)]
struct Captured {
    events: Vec<Event>,
    /// Stdout lines that are not JSON.
    other_stdout: Vec<String>,
    stderr: VecDeque<String>,
}

/// A child process whose stdout lines are parsed as JSON and whose stderr is kept (the tail in
/// memory, all of it in `<dir>/<name>.stderr`). Killed on drop if still running.
pub struct Proc {
    pub name: String,
    pub started: Instant,
    child: Child,
    captured: Arc<Mutex<Captured>>,
    readers: Vec<JoinHandle<()>>,
    exit: Option<ExitStatus>,
    stderr_path: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdin closed; its output goes to `<dir>/<name>.stdout|.stderr`.
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Proc {
        // Loopback only: no proxy may be asked to reach 127.0.0.1.
        for var in [
            "http_proxy",
            "https_proxy",
            "all_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("NO_PROXY", "127.0.0.1,localhost,::1");
        let what = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {what}: {e}"));
        let captured = Arc::new(Mutex::new(Captured::default()));
        // A second process of the same name in one test gets `<name>-2`, ...
        let name = (1..)
            .map(|n| match n {
                1 => name.to_owned(),
                n => format!("{name}-{n}"),
            })
            .find(|n| !dir.join(format!("{n}.stdout")).exists())
            .unwrap_or_else(|| name.to_owned());
        let stdout_path = dir.join(format!("{name}.stdout"));
        let stderr_path = dir.join(format!("{name}.stderr"));
        let cmdline = format!("{what}\n");
        let _ = fs::write(dir.join(format!("{name}.cmd")), cmdline);
        let readers = vec![
            read_stdout(
                child.stdout.take().expect("piped stdout"),
                stdout_path,
                captured.clone(),
            ),
            read_stderr(
                child.stderr.take().expect("piped stderr"),
                stderr_path.clone(),
                captured.clone(),
            ),
        ];
        Proc {
            name,
            started: Instant::now(),
            child,
            captured,
            readers,
            exit: None,
            stderr_path,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every JSON line so far, in order.
    pub fn events(&self) -> Vec<Event> {
        self.lock().events.clone()
    }

    /// The JSON values so far whose `"event"` is `kind`.
    pub fn events_of(&self, kind: &str) -> Vec<Value> {
        self.lock()
            .events
            .iter()
            .filter(|e| e.value["event"] == kind)
            .map(|e| e.value.clone())
            .collect()
    }

    /// Stdout lines that were not JSON.
    pub fn non_json_stdout(&self) -> Vec<String> {
        self.lock().other_stdout.clone()
    }

    /// The last `{"event":"summary"}` line; fails if there is none.
    pub fn summary(&self) -> Value {
        let s = self.events_of("summary").pop();
        s.unwrap_or_else(|| panic!("{} printed no summary line\n{}", self.name, self.report()))
    }

    /// The last JSON line (the js peer prints exactly one, at its end).
    pub fn last_json(&self) -> Value {
        let last = self.lock().events.last().map(|e| e.value.clone());
        last.unwrap_or_else(|| panic!("{} printed no JSON line\n{}", self.name, self.report()))
    }

    /// Waits for the first JSON line that satisfies `pred`; fails if it has not come within
    /// `timeout` or the process ended without it.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Event {
        let since = self.started;
        self.wait_for_after(what, since, timeout, pred)
    }

    /// Waits for `{"event": kind}` (the first one).
    pub fn wait_event(&mut self, kind: &str, timeout: Duration) -> Event {
        self.wait_for(&format!("an {kind:?} event"), timeout, |v| {
            v["event"] == kind
        })
    }

    /// Waits for `{"event":"state","state": state}` (the first one, any call).
    pub fn wait_state(&mut self, state: &str, timeout: Duration) -> Event {
        self.wait_for(&format!("state {state:?}"), timeout, |v| is_state(v, state))
    }

    /// Waits for a JSON line that satisfies `pred` and arrived after `after`.
    pub fn wait_for_after(
        &mut self,
        what: &str,
        after: Instant,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Event {
        let deadline = Instant::now() + timeout;
        let find = |p: &Proc| {
            p.lock()
                .events
                .iter()
                .find(|e| e.at >= after && pred(&e.value))
                .cloned()
        };
        loop {
            if let Some(e) = find(self) {
                return e;
            }
            if self.poll_exit().is_some() {
                // Its last lines may still be in the pipe.
                self.drain_readers();
                if let Some(e) = find(self) {
                    return e;
                }
                panic!("{} ended without {what}\n{}", self.name, self.report());
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not print {what} within {timeout:?}\n{}",
                    self.name,
                    self.report()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Waits until a stderr line contains `needle`.
    /// Some stderr line so far contains `needle`.
    pub fn stderr_contains(&self, needle: &str) -> bool {
        self.lock().stderr.iter().any(|l| l.contains(needle))
    }

    /// The first stderr line that contains `needle`.
    pub fn stderr_line(&self, needle: &str) -> Option<String> {
        self.lock()
            .stderr
            .iter()
            .find(|l| l.contains(needle))
            .cloned()
    }
    pub fn wait_stderr(&mut self, needle: &str, timeout: Duration) {
        self.wait_stderr_all(&[needle], timeout);
    }
    /// Waits for one stderr line that contains every one of `needles`.
    pub fn wait_stderr_all(&mut self, needles: &[&str], timeout: Duration) {
        let needle = needles.join(" … ");
        let deadline = Instant::now() + timeout;
        loop {
            if self
                .lock()
                .stderr
                .iter()
                .any(|l| needles.iter().all(|n| l.contains(n)))
            {
                return;
            }
            if self.poll_exit().is_some() {
                panic!(
                    "{} ended before printing {needle:?}\n{}",
                    self.name,
                    self.report()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not print {needle:?} within {timeout:?}\n{}",
                    self.name,
                    self.report()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        if self.exit.is_none() {
            signal(self.pid(), "TERM");
        }
    }

    /// Waits for the process to exit; kills it and fails after `timeout`. Returns its exit
    /// code (fails if a signal killed it).
    pub fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let status = match self.exit {
            Some(s) => s,
            None => match wait_bounded(&mut self.child, timeout) {
                Some(s) => {
                    self.exit = Some(s);
                    s
                }
                None => {
                    let _ = self.child.kill();
                    self.exit = self.child.wait().ok();
                    self.drain_readers();
                    panic!(
                        "{} still running after {timeout:?}: killed\n{}",
                        self.name,
                        self.report()
                    );
                }
            },
        };
        self.drain_readers();
        status.code().unwrap_or_else(|| {
            panic!(
                "{} was killed by a signal ({status})\n{}",
                self.name,
                self.report()
            )
        })
    }

    /// The exit status if it has exited (does not block).
    pub fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Name, exit status, the last stdout JSON lines and the tail of stderr: for failure messages.
    pub fn report(&self) -> String {
        let c = self.lock();
        let events: Vec<String> = c
            .events
            .iter()
            .rev()
            .filter(|e| e.value["event"] != "stats")
            .take(12)
            .map(|e| {
                format!(
                    "  +{:.2}s {}",
                    e.at.duration_since(self.started).as_secs_f64(),
                    e.value
                )
            })
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let stderr: Vec<&str> = c
            .stderr
            .iter()
            .skip(c.stderr.len().saturating_sub(REPORT_LINES))
            .map(String::as_str)
            .collect();
        format!(
            "--- {} (exit: {}), last JSON lines (stats left out):\n{}\n--- non-JSON stdout: {:?}\n--- last {} stderr lines (all in {}):\n{}\n---",
            self.name,
            self.exit.map_or("still running".to_owned(), |s| s.to_string()),
            events.join("\n"),
            c.other_stdout.iter().take(5).collect::<Vec<_>>(),
            stderr.len(),
            self.stderr_path.display(),
            stderr.join("\n")
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Captured> {
        self.captured.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After exit: lets the reader threads reach end of file (bounded: a grandchild could
    /// hold the pipe open).
    fn drain_readers(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        for r in std::mem::take(&mut self.readers) {
            if r.is_finished() {
                let _ = r.join();
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.poll_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn read_stdout(out: ChildStdout, path: PathBuf, captured: Arc<Mutex<Captured>>) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut file = fs::File::create(&path).ok();
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let at = Instant::now();
            if let Some(f) = file.as_mut() {
                let _ = writeln!(f, "{line}");
            }
            let mut c = captured.lock().unwrap_or_else(|p| p.into_inner());
            match serde_json::from_str::<Value>(&line) {
                Ok(value) => c.events.push(Event { at, value }),
                Err(_) => c.other_stdout.push(line),
            }
        }
    })
}

fn read_stderr(err: ChildStderr, path: PathBuf, captured: Arc<Mutex<Captured>>) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut file = fs::File::create(&path).ok();
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            if let Some(f) = file.as_mut() {
                let _ = writeln!(f, "{line}");
            }
            let mut c = captured.lock().unwrap_or_else(|p| p.into_inner());
            if c.stderr.len() == STDERR_TAIL_LINES {
                c.stderr.pop_front();
            }
            c.stderr.push_back(line);
        }
    })
}

// ---------------------------------------------------------------- reading the JSON lines

/// `{"event":"state","state": state}`.
pub fn is_state(v: &Value, state: &str) -> bool {
    v["event"] == "state" && v["state"] == state
}

/// `{"event":"homeserver","reachable": reachable}`.
pub fn is_reachability(v: &Value, reachable: bool) -> bool {
    v["event"] == "homeserver" && v["reachable"] == reachable
}

/// A non-negative integer field; fails naming the line if it is missing.
pub fn count(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no integer {key:?} in {v}"))
}

/// The `{"event":"stats"}` lines of `p` that arrived within `[from, to]`, with their time.
pub fn stats_between(p: &Proc, from: Instant, to: Instant) -> Vec<Event> {
    p.events()
        .into_iter()
        .filter(|e| e.value["event"] == "stats" && e.at >= from && e.at <= to)
        .collect()
}

// ---------------------------------------------------------------- coturn and ffprobe

/// coturn (Debian package `coturn`) started by a test; killed by PID when dropped.
pub struct Coturn(Child);

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Coturn {
    /// `turnserver -n --no-tls --no-dtls --no-cli` with `args`, logging to `<dir>/turnserver.log`.
    pub fn start(dir: &Path, args: &[String]) -> Coturn {
        let child = Command::new("turnserver")
            .args(["-n", "--no-tls", "--no-dtls", "--no-cli", "--simple-log"])
            .args(args)
            .arg(format!(
                "--log-file={}",
                dir.join("turnserver.log").display()
            ))
            .arg(format!(
                "--pidfile={}",
                dir.join("turnserver.pid").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("coturn's turnserver must be installed (apt-get install coturn; .ci/run does)");
        wait_for_stun(args);
        Coturn(child)
    }
}

/// Waits until the STUN server of coturn's `args` (`--listening-ip`, `--listening-port`)
/// answers a binding request: started is not the same as listening.
fn wait_for_stun(args: &[String]) {
    let arg = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(name).map(str::to_owned))
    };
    let ip = arg("--listening-ip=").unwrap_or_else(|| "127.0.0.1".into());
    let port = arg("--listening-port=").unwrap_or_else(|| "3478".into());
    let server: std::net::SocketAddr = format!("{ip}:{port}").parse().expect("coturn address");
    let sock = std::net::UdpSocket::bind((server.ip(), 0)).expect("probe socket");
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    // A STUN binding request: type 0x0001, length 0, the magic cookie, a transaction id.
    let mut request = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    request.extend_from_slice(b"ca-readyprob");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        let _ = sock.send_to(&request, server);
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            if n >= 20 && buf[0] == 0x01 && buf[1] == 0x01 {
                return;
            }
        }
    }
    panic!("coturn did not answer STUN on {server} within 10 s");
}

/// `ffprobe -count_frames -show_streams` of a media file, as JSON (Debian package `ffmpeg`).
pub fn ffprobe(path: &Path) -> Value {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-show_streams",
            "-of",
            "json",
        ])
        .arg(path)
        .output()
        .expect("ffprobe (Debian ffmpeg) is installed by .ci/run");
    assert!(
        out.status.success(),
        "ffprobe {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ffprobe JSON")
}

/// Starts the test camera, `tests/e2e/rtsp_server.py` (GStreamer's RTSP server), on `port`
/// (user `cam`, password `secret`, 640x480 H.264 at 15 fps with one IDR per second, PCMU
/// audio) and waits for its READY line.
pub fn rtsp_server(dir: &Path, name: &str, port: u16) -> Proc {
    rtsp_server_with(dir, name, port, &[])
}

/// [`rtsp_server`] with more of `rtsp_server.py`'s options (`--audio opus`, `--protocols udp`,
/// `--auth digest`, `--gop N`, ...).
pub fn rtsp_server_with(dir: &Path, name: &str, port: u16, extra: &[&str]) -> Proc {
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(workspace_root().join("tests/e2e/rtsp_server.py"))
        .args([
            "--port",
            &port.to_string(),
            "--user",
            "cam",
            "--password",
            "secret",
        ])
        .args(extra);
    let p = Proc::spawn(name, cmd, dir);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !p.non_json_stdout().iter().any(|l| l.starts_with("READY")) {
        assert!(
            Instant::now() < deadline,
            "RTSP server not ready\n{}",
            p.report()
        );
        thread::sleep(Duration::from_millis(50));
    }
    p
}

// ---------------------------------------------------------------- sound and CPU

/// Goertzel power of `freq` Hz in `x` (8 kHz samples), normalised by the signal's energy: near
/// 1 for a pure tone at `freq`, near 0 far from it.
pub fn tone_share(x: &[f64], freq: f64) -> f64 {
    let n = x.len() as f64;
    let coeff = 2.0 * (2.0 * std::f64::consts::PI * freq / 8000.0).cos();
    let (mut s1, mut s2) = (0.0, 0.0);
    for &v in x {
        let s = v + coeff * s1 - s2;
        s2 = s1;
        s1 = s;
    }
    let power = s1 * s1 + s2 * s2 - coeff * s1 * s2;
    let energy: f64 = x.iter().map(|v| v * v).sum();
    if energy == 0.0 {
        0.0
    } else {
        2.0 * power / (n * energy)
    }
}

/// The last `seconds` of what a speaker played (raw s16le, 8 kHz mono).
pub fn speaker_tail(path: &Path, seconds: f64) -> Vec<f64> {
    let raw = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let samples: Vec<f64> = raw
        .chunks_exact(2)
        .map(|b| f64::from(i16::from_le_bytes([b[0], b[1]])))
        .collect();
    let n = (seconds * 8000.0) as usize;
    samples[samples.len().saturating_sub(n)..].to_vec()
}

/// CPU time (user + system, in clock ticks) of process `pid` so far.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

/// The last 2 s at a speaker (a camera's or the hub's) are the peer's 440 Hz sine.
pub fn assert_hears_the_sine(speaker: &Path, hub: &Proc) {
    let heard = speaker_tail(speaker, 2.0);
    assert!(
        heard.len() >= 12_000,
        "the speaker played {} samples in the last 2 s\n{}",
        heard.len(),
        hub.report()
    );
    let rms = (heard.iter().map(|v| v * v).sum::<f64>() / heard.len() as f64).sqrt();
    // Judged per 250 ms (the median of eight windows): a single glitch (a lost packet, a
    // drift correction) breaks the sine's phase in one window, not its pitch.
    let median = |freq: f64| {
        let mut shares: Vec<f64> = heard
            .chunks_exact(2000)
            .map(|w| tone_share(w, freq))
            .collect();
        shares.sort_by(f64::total_cmp);
        shares.get(shares.len() / 2).copied().unwrap_or(0.0)
    };
    let at_440 = median(440.0);
    let elsewhere: Vec<f64> = [300.0, 600.0, 1000.0].iter().map(|&f| median(f)).collect();
    eprintln!(
        "speaker: rms {rms:.0}, 440 Hz share {at_440:.3} (median of 250 ms windows), \
         elsewhere {elsewhere:?}"
    );
    assert!(rms > 300.0, "the speaker heard silence (rms {rms:.0})");
    assert!(
        at_440 > 0.5,
        "440 Hz share {at_440:.3}: not the peer's sine"
    );
    assert!(
        elsewhere.iter().all(|s| *s < 0.05),
        "energy away from 440 Hz: {elsewhere:?}"
    );
}

/// An ALSA config in `dir` whose PCM `hubspeaker` writes what is played to `out`, and whose
/// PCM `hubmic` records `dir/mic.raw` (the `file` plugin's `infile`; what it hands out is
/// copied to `dir/mic-copy.raw`).
pub fn alsa_config(dir: &Path, out: &Path) -> PathBuf {
    let conf = dir.join("asound.conf");
    let text = format!(
        "pcm.hubspeaker {{\n  type file\n  slave {{ pcm {{ type null }} }}\n  \
         file \"{}\"\n  format \"raw\"\n}}\n\
         pcm.hubmic {{\n  type file\n  slave {{ pcm {{ type null }} }}\n  \
         file \"{}\"\n  infile \"{}\"\n  format \"raw\"\n}}\n",
        out.display(),
        dir.join("mic-copy.raw").display(),
        dir.join("mic.raw").display()
    );
    fs::write(&conf, text).unwrap_or_else(|e| panic!("writing {}: {e}", conf.display()));
    conf
}

/// Writes `seconds` of a `freq` Hz sine (48 kHz, mono, 16-bit PCM WAV, a whole number of
/// periods so a looped file has no click): what Chromium's fake microphone plays.
pub fn write_sine_wav(path: &Path, freq: u32, seconds: u32) {
    let rate = 48_000u32;
    let samples = rate * seconds;
    let mut wav = Vec::with_capacity(44 + 2 * samples as usize);
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + 2 * samples).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    wav.extend_from_slice(&16u32.to_le_bytes());
    wav.extend_from_slice(&1u16.to_le_bytes()); // PCM
    wav.extend_from_slice(&1u16.to_le_bytes()); // mono
    wav.extend_from_slice(&rate.to_le_bytes());
    wav.extend_from_slice(&(2 * rate).to_le_bytes());
    wav.extend_from_slice(&2u16.to_le_bytes());
    wav.extend_from_slice(&16u16.to_le_bytes());
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&(2 * samples).to_le_bytes());
    for i in 0..samples {
        let t = f64::from(i) / f64::from(rate);
        let v = (std::f64::consts::TAU * f64::from(freq) * t).sin() * 12_000.0;
        wav.extend_from_slice(&(v as i16).to_le_bytes());
    }
    fs::write(path, wav).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// What matrix-js-sdk made of the hub's media (what Element shows): one user-media feed with
/// its audio and video track. With our msid wrong it made none, though the media flowed.
pub fn assert_one_usermedia_feed(r: &Value) {
    let feeds = r["remote_feeds"].as_array().cloned().unwrap_or_default();
    assert_eq!(feeds.len(), 1, "{r}");
    assert_eq!(
        (
            &feeds[0]["purpose"],
            count(&feeds[0], "audio_tracks"),
            count(&feeds[0], "video_tracks")
        ),
        (&Value::from("m.usermedia"), 1, 1),
        "{r}"
    );
}
