//! The live modes: the same core on real UDP sockets, a real clock and a real homeserver.
//!
//! [`driver`] is the one place where datagrams, HTTP answers, signals and time enter the core;
//! each mode is a small [`driver::Policy`] on top of it: `call` ([`call`]), `listen`
//! ([`listen`]), `check` ([`check`]) and the hub daemon `serve` (`crate::serve`).

mod call;
mod calls;
mod check;
pub mod config;
pub(crate) mod driver;
mod listen;
pub(crate) mod net;
pub mod session;

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::Value;
use smol::channel::{Receiver, Sender, TrySendError};
use tracing::{debug, info, warn};

use call_assist_core::CallPolicy;

use self::config::{LiveCommand, LiveOptions, Mode, Target};
use self::driver::{Driver, Setup, StationSetup};

/// Exit codes of the live commands.
pub mod exit {
    pub const OK: u8 = 0;
    pub const NOT_CONNECTED: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const LOGIN_REFUSED: u8 = 3;
    pub const UNREACHABLE: u8 = 4;
    pub const NO_SUCH_ROOM: u8 = 5;
    /// The camera refused our credentials, or has nothing we can send.
    pub const MEDIA_SOURCE: u8 = 6;
}

/// How a mode tells the user what happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Style {
    /// Human lines on stdout (`say`); JSON lines are dropped.
    Text,
    /// One JSON object per line on stdout.
    Json,
    /// JSON lines go to the log (`serve` without `--json`).
    Log,
}

/// A consumer of some kinds of lines that may fall behind (a webhook).
struct Sink {
    kinds: Vec<String>,
    tx: Sender<String>,
    dropped: Arc<AtomicU64>,
}

/// The event lines of a run: to stdout or the log, and to every event-stream subscriber.
pub(crate) struct Lines {
    style: Style,
    subscribers: Vec<Sender<String>>,
    sinks: Vec<Sink>,
    /// Stdout was closed: the run goes on, its lines go only to subscribers.
    stdout_closed: bool,
}

impl Lines {
    pub fn new(style: Style) -> Self {
        Lines {
            style,
            subscribers: Vec::new(),
            sinks: Vec::new(),
            stdout_closed: false,
        }
    }

    pub fn emit(&mut self, v: Value) {
        match self.style {
            Style::Json => self.print(&v.to_string()),
            Style::Text => {}
            Style::Log => {
                // User and room ids only at debug level (house rule), the rest at info.
                debug!("{v}");
                let mut brief = v.clone();
                if let Some(o) = brief.as_object_mut() {
                    // A pressed digit may be part of a station's PIN: debug level only too.
                    for k in ["from", "user", "room_id", "digit"] {
                        o.remove(k);
                    }
                }
                info!("{brief}");
            }
        }
        if self.subscribers.is_empty() && self.sinks.is_empty() {
            return;
        }
        let line = v.to_string();
        let kind = v["event"].as_str().unwrap_or_default();
        for sink in self
            .sinks
            .iter()
            .filter(|s| s.kinds.iter().any(|k| k == kind))
        {
            if sink.tx.try_send(line.clone()).is_err() {
                // Full: the receiver is slow or dead; the loop never waits for it.
                if sink.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                    warn!("a webhook's queue is full: events dropped (counted in /health)");
                }
            }
        }
        self.subscribers.retain(|s| match s.try_send(line.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                warn!(
                    "an event-stream client fell {} events behind: dropped",
                    s.capacity().unwrap_or(0)
                );
                false
            }
            Err(TrySendError::Closed(_)) => false,
        });
    }

    /// A human line (text style only).
    pub fn say(&mut self, line: &str) {
        if self.style == Style::Text {
            self.print(line);
        }
    }

    fn print(&mut self, line: &str) {
        if !self.stdout_closed && !crate::stdout_line(line) {
            self.stdout_closed = true;
            warn!("stdout is closed: no more event lines there (the run goes on)");
        }
    }

    /// Lines of these kinds (`"event"`) also go to `tx`; when it is full they are dropped and
    /// counted in `dropped`.
    pub fn add_sink(&mut self, kinds: Vec<String>, tx: Sender<String>, dropped: Arc<AtomicU64>) {
        self.sinks.push(Sink { kinds, tx, dropped });
    }

    /// A new event stream of at most `max` at once, each `queue` events deep.
    pub fn subscribe(&mut self, max: usize, queue: usize) -> Option<Receiver<String>> {
        self.subscribers.retain(|s| !s.is_closed());
        if self.subscribers.len() >= max {
            return None;
        }
        let (tx, rx) = smol::channel::bounded(queue);
        self.subscribers.push(tx);
        Some(rx)
    }
}

/// Whose invites ring.
pub(crate) fn call_policy(mode: &Mode) -> CallPolicy {
    match mode {
        Mode::Listen { allow, .. } if !allow.is_empty() => CallPolicy::Allow(allow.clone()),
        Mode::Listen { .. } => CallPolicy::Anyone,
        // A caller rings for nobody, but joins a room its target invites it to.
        Mode::Call {
            target: Target::User(u),
            ..
        } => CallPolicy::Allow(vec![u.clone()]),
        Mode::Call { .. } | Mode::Check => CallPolicy::Allow(Vec::new()),
    }
}

/// Runs `call`, `listen` or `check`; returns the exit code.
pub fn run(command: LiveCommand) -> ExitCode {
    let opts = match LiveOptions::new(command, |k| std::env::var(k).ok()) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}\n\n(see --help)");
            return ExitCode::from(exit::USAGE);
        }
    };
    crate::init_logs(opts.json);
    ExitCode::from(smol::block_on(run_async(opts)))
}

async fn run_async(opts: LiveOptions) -> u8 {
    let a = &opts.account;
    let login = format!("logging in to {} as {}", a.homeserver, a.user);
    let setup = Setup {
        account: opts.account.clone(),
        network: opts.network.clone(),
        stations: vec![StationSetup {
            name: None,
            media: opts.media.clone(),
            video: opts.video,
            rtsp_password: opts.rtsp_password.clone(),
        }],
        policy: call_policy(&opts.mode),
        lines: Lines::new(if opts.json { Style::Json } else { Style::Text }),
        give_up_unreachable: true,
        reload_on_hup: false,
    };
    let (mut driver, rx) = match Driver::<()>::start(setup).await {
        Ok(d) => d,
        Err(code) => return code,
    };
    driver.lines.say(&login);
    match opts.mode {
        Mode::Call {
            target,
            duration,
            dtmf,
        } => {
            let mut mode = call::Call::new(target, duration, dtmf);
            let code = driver.run(rx, &mut mode).await;
            mode.log.summary(&mut driver);
            code
        }
        Mode::Listen {
            max_calls,
            hangup_after,
            ..
        } => {
            let mut mode = listen::Listen::new(max_calls, hangup_after);
            let code = driver.run(rx, &mut mode).await;
            mode.log.summary(&mut driver);
            code
        }
        // The check's report is the last word.
        Mode::Check => driver.run(rx, &mut check::Check::new()).await,
    }
}
