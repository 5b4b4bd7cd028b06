//! `call-assist check`: proves a STUN/TURN setup works before calls rely on it.
//!
//! Runs the live agent without calls: it logs in and fetches `/voip/turnServer` (or takes
//! `--turn` from the config), does a STUN binding against every UDP STUN/TURN server, a TURN
//! allocation on every UDP TURN server, then sends a datagram through each relay to itself
//! and one from itself to the relay. Prints what works; exit 0 only when some relay carried
//! datagrams both ways.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use call_assist_core::AgentEvent;
use serde_json::json;

use super::driver::{Driver, Policy};
use super::exit;

/// How long allocations may take before the self-test starts anyway.
const ALLOCATE_WAIT: Duration = Duration::from_secs(20);
/// How long the self-test datagrams may take.
const ECHO_WAIT: Duration = Duration::from_secs(5);
/// Without TURN servers from the homeserver or config after this, there is nothing to test.
const TURN_SERVERS_WAIT: Duration = Duration::from_secs(15);
/// How often the waits are checked.
const STEP_EVERY: Duration = Duration::from_millis(250);

#[derive(Debug, Default, Clone)]
struct Relay {
    local: Option<SocketAddr>,
    relay: Option<SocketAddr>,
    error: Option<String>,
    outbound: bool,
    inbound: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Check {
    started: Option<Instant>,
    logged_in_at: Option<Instant>,
    stun: BTreeMap<SocketAddr, SocketAddr>,
    relays: BTreeMap<SocketAddr, Relay>,
    testing_since: Option<Instant>,
    done: Option<u8>,
    turn_uris: Vec<String>,
    next_step: Option<Instant>,
}

impl Policy for Check {
    type Command = ();

    fn on_event(&mut self, _d: &mut Driver<()>, e: &AgentEvent, now: Instant) {
        self.observe(e, now);
    }

    fn on_tick(&mut self, d: &mut Driver<()>, now: Instant) {
        self.started.get_or_insert(now);
        self.next_step = Some(now + STEP_EVERY);
        if let Some((code, text, json)) = self.step(&mut d.agent, now) {
            d.lines.say(text.trim_end());
            d.lines.emit(json);
            d.finish(code);
        }
    }

    /// The waits above are checked this often.
    fn deadline(&self) -> Option<Instant> {
        self.next_step
    }

    fn stop_code(&self, _d: &Driver<()>) -> u8 {
        exit::NOT_CONNECTED
    }
}

impl Check {
    pub fn new() -> Self {
        Check {
            started: None,
            logged_in_at: None,
            stun: BTreeMap::new(),
            relays: BTreeMap::new(),
            testing_since: None,
            done: None,
            turn_uris: Vec::new(),
            next_step: None,
        }
    }

    fn observe(&mut self, e: &AgentEvent, now: Instant) {
        match e {
            AgentEvent::LoggedIn { .. } => self.logged_in_at = Some(now),
            AgentEvent::ReflexiveAddress { local, mapped } => {
                self.stun.insert(*local, *mapped);
            }
            AgentEvent::RelayAllocated {
                server,
                local,
                relay,
                ..
            } => {
                let r = self.relays.entry(*server).or_default();
                r.local = Some(*local);
                r.relay = Some(*relay);
                r.error = None;
            }
            AgentEvent::RelayFailed {
                server,
                code,
                reason,
            } => {
                let r = self.relays.entry(*server).or_default();
                if r.relay.is_none() {
                    r.error = Some(match code {
                        Some(401) => format!(
                            "401 {reason} (wrong TURN username/password; with Synapse, its \
                             turn_shared_secret must equal coturn's static-auth-secret)"
                        ),
                        Some(c) => format!("{c} {reason}"),
                        None => reason.clone(),
                    });
                }
            }
            AgentEvent::RelayTested { relay, outbound } => {
                for r in self.relays.values_mut().filter(|r| r.relay == Some(*relay)) {
                    if *outbound {
                        r.outbound = true;
                    } else {
                        r.inbound = true;
                    }
                }
            }
            _ => {}
        }
    }

    /// Moves the check on; `Some(report)` once it is over.
    fn step(
        &mut self,
        agent: &mut call_assist_core::Agent,
        now: Instant,
    ) -> Option<(u8, String, serde_json::Value)> {
        if self.done.is_some() {
            return None;
        }
        if let Some(t) = agent.turn_servers() {
            self.turn_uris = t.uris.clone();
        }
        let logged_in = self.logged_in_at?;
        if self.testing_since.is_none() {
            let waited = now.saturating_duration_since(logged_in);
            let nothing = self.relays.is_empty() && !agent.relays_pending();
            if nothing && waited < TURN_SERVERS_WAIT {
                return None;
            }
            if agent.relays_pending() && waited < ALLOCATE_WAIT {
                return None;
            }
            if !nothing && agent.relays_pending() {
                for r in self
                    .relays
                    .values_mut()
                    .filter(|r| r.relay.is_none() && r.error.is_none())
                {
                    r.error = Some("no answer from the TURN server".into());
                }
            }
            agent.test_relays(now);
            self.testing_since = Some(now);
            return None;
        }
        let since = self.testing_since?;
        let all_answered = self
            .relays
            .values()
            .filter(|r| r.relay.is_some())
            .all(|r| r.outbound && r.inbound);
        if !all_answered && now.saturating_duration_since(since) < ECHO_WAIT {
            return None;
        }
        let code = if self.relays.values().any(|r| r.outbound && r.inbound) {
            exit::OK
        } else {
            exit::NOT_CONNECTED
        };
        self.done = Some(code);
        Some((code, self.text(), self.json(code)))
    }

    fn text(&self) -> String {
        let mut out = String::new();
        let took = self
            .logged_in_at
            .zip(self.started)
            .map_or(0, |(t, started)| {
                t.saturating_duration_since(started).as_millis()
            });
        out.push_str(&format!("login: ok ({took} ms)\n"));
        if self.turn_uris.is_empty() {
            out.push_str(
                "turn servers from the homeserver: none (set turn_uris in Synapse, or --turn)\n",
            );
        } else {
            out.push_str(&format!(
                "turn servers from the homeserver: {}\n",
                self.turn_uris.join(", ")
            ));
        }
        if self.stun.is_empty() {
            out.push_str("stun: no binding answered\n");
        }
        for (local, mapped) in &self.stun {
            out.push_str(&format!("stun: {local} is seen as {mapped}\n"));
        }
        if self.relays.is_empty() {
            out.push_str("turn: no UDP TURN server to test\n");
        }
        for (server, r) in &self.relays {
            match (&r.relay, &r.error) {
                (Some(relay), _) => out.push_str(&format!(
                    "turn {server}: relay {relay}; through the relay to us: {}; from us through the relay: {}\n",
                    if r.outbound { "ok" } else { "FAILED" },
                    if r.inbound { "ok" } else { "FAILED" },
                )),
                (None, Some(e)) => out.push_str(&format!("turn {server}: allocation FAILED: {e}\n")),
                (None, None) => out.push_str(&format!("turn {server}: allocation FAILED: no answer\n")),
            }
        }
        let ok = self.relays.values().any(|r| r.outbound && r.inbound);
        out.push_str(if ok {
            "result: a relay path works\n"
        } else {
            "result: NO relay path works: calls behind strict NATs will not connect\n"
        });
        out
    }

    fn json(&self, code: u8) -> serde_json::Value {
        json!({
            "event": "check",
            "ok": code == exit::OK,
            "turn_uris": self.turn_uris,
            "stun": self.stun.iter().map(|(l, m)| json!({"local": l.to_string(), "mapped": m.to_string()})).collect::<Vec<_>>(),
            "turn": self.relays.iter().map(|(s, r)| json!({
                "server": s.to_string(),
                "relay": r.relay.map(|a| a.to_string()),
                "error": r.error,
                "outbound": r.outbound,
                "inbound": r.inbound,
            })).collect::<Vec<_>>(),
        })
    }
}
