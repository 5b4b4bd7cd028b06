#![allow(clippy::disallowed_methods)] // a real Instant as the tests' time base

use super::*;

const REALM: &str = "example.org";
const NONCE: &[u8] = b"nonce-1";

fn local() -> SocketAddr {
    "192.0.2.10:5000".parse().unwrap()
}
fn server() -> SocketAddr {
    "198.51.100.1:3478".parse().unwrap()
}
fn relay() -> SocketAddr {
    "198.51.100.1:49152".parse().unwrap()
}
fn peer() -> SocketAddr {
    "203.0.113.9:7000".parse().unwrap()
}
fn creds(u: &str) -> TurnCredentials {
    TurnCredentials {
        username: Secret::new(u),
        password: Secret::new("pw"),
    }
}
fn key(u: &str) -> [u8; 16] {
    msg::long_term_key(u, REALM, "pw")
}

fn unauthorized(txn: [u8; 12], method: u16, code: u16) -> Vec<u8> {
    Builder::new(method, Class::Error, txn)
        .error(code, "Unauthorized")
        .attr(msg::ATTR_REALM, REALM.as_bytes())
        .attr(msg::ATTR_NONCE, NONCE)
        .build()
}

fn allocate_ok(txn: [u8; 12], k: &[u8], lifetime: u32) -> Vec<u8> {
    Builder::new(msg::ALLOCATE, Class::Success, txn)
        .xor_addr(msg::ATTR_XOR_RELAYED_ADDRESS, relay())
        .xor_addr(
            msg::ATTR_XOR_MAPPED_ADDRESS,
            "203.0.113.1:6000".parse().unwrap(),
        )
        .u32(msg::ATTR_LIFETIME, lifetime)
        .integrity(k)
        .build()
}

struct T {
    c: TurnClient,
    rng: Rng,
    now: Instant,
}

impl T {
    fn new() -> T {
        let now = Instant::now();
        let mut c = TurnClient::default();
        c.set_credentials(creds("alice"), &[local()], now);
        c.add_server(server(), &[local()], now);
        T {
            c,
            rng: Rng::new(7),
            now,
        }
    }
    fn tick(&mut self) {
        self.c.handle_timeout(self.now, &mut self.rng);
    }
    fn sent(&mut self) -> Vec<Vec<u8>> {
        self.tick();
        let mut out = Vec::new();
        while let Some(t) = self.c.poll_transmit(self.now) {
            assert_eq!((t.source, t.destination), (local(), server()));
            out.push(t.contents);
        }
        out
    }
    fn recv(&mut self, data: &[u8]) -> Option<Option<Relayed>> {
        self.c
            .handle_receive(server(), local(), data, self.now, &mut self.rng)
    }
    /// Runs the 401 dance and the authenticated Allocate; returns the relay event.
    fn allocate(&mut self) {
        let first = self.sent();
        assert_eq!(first.len(), 1);
        let m = Message::parse(&first[0]).unwrap();
        assert_eq!((m.method, m.class), (msg::ALLOCATE, Class::Request));
        assert!(
            !m.has(msg::ATTR_MESSAGE_INTEGRITY),
            "first Allocate carries no credentials"
        );
        assert_eq!(
            self.recv(&unauthorized(m.txn, msg::ALLOCATE, 401)),
            Some(None)
        );
        let second = self.sent();
        assert_eq!(second.len(), 1);
        let m = Message::parse(&second[0]).unwrap();
        assert_eq!(m.str_attr(msg::ATTR_USERNAME), Some("alice"));
        assert_eq!(m.str_attr(msg::ATTR_REALM), Some(REALM));
        assert!(m.verify_integrity(&key("alice")));
        assert!(self.c.gathering());
        assert_eq!(
            self.recv(&allocate_ok(m.txn, &key("alice"), 600)),
            Some(None)
        );
        assert!(!self.c.gathering());
        assert_eq!(
            self.c.poll_event(),
            Some(TurnEvent::Allocated {
                local: local(),
                server: server(),
                relay: relay(),
                mapped: Some("203.0.113.1:6000".parse().unwrap()),
            })
        );
    }
}

#[test]
fn allocates_with_long_term_credentials() {
    let mut t = T::new();
    t.allocate();
    assert!(t.c.is_relay(relay()));
}

#[test]
fn answers_failing_integrity_or_from_strangers_are_dropped() {
    let mut t = T::new();
    let first = t.sent();
    let m = Message::parse(&first[0]).unwrap();
    t.recv(&unauthorized(m.txn, msg::ALLOCATE, 401));
    let req = t.sent();
    let txn = Message::parse(&req[0]).unwrap().txn;
    // Forged: signed with another key.
    assert_eq!(t.recv(&allocate_ok(txn, &key("mallory"), 600)), Some(None));
    // Unsigned success.
    let unsigned = Builder::new(msg::ALLOCATE, Class::Success, txn)
        .xor_addr(msg::ATTR_XOR_RELAYED_ADDRESS, relay())
        .build();
    assert_eq!(t.recv(&unsigned), Some(None));
    // From another address: not ours at all.
    assert_eq!(
        t.c.handle_receive(
            peer(),
            local(),
            &allocate_ok(txn, &key("alice"), 600),
            t.now,
            &mut t.rng
        ),
        None
    );
    // Another transaction id.
    assert_eq!(
        t.recv(&allocate_ok([0; 12], &key("alice"), 600)),
        Some(None)
    );
    assert_eq!(t.recv(b"\x00\x01garbage"), Some(None));
    assert_eq!(t.c.poll_event(), None, "nothing was accepted");
    // The genuine answer still works: the forgeries lost no state.
    t.recv(&allocate_ok(txn, &key("alice"), 600));
    assert!(matches!(
        t.c.poll_event(),
        Some(TurnEvent::Allocated { .. })
    ));
}

#[test]
fn stale_nonce_is_retried_and_bad_credentials_fail() {
    let mut t = T::new();
    let m0 = t.sent();
    let txn = Message::parse(&m0[0]).unwrap().txn;
    t.recv(&unauthorized(txn, msg::ALLOCATE, 401));
    let txn = Message::parse(&t.sent()[0]).unwrap().txn;
    t.recv(&unauthorized(txn, msg::ALLOCATE, 438));
    let again = t.sent();
    assert_eq!(again.len(), 1, "a stale nonce is retried");
    let txn = Message::parse(&again[0]).unwrap().txn;
    t.recv(&unauthorized(txn, msg::ALLOCATE, 401));
    let txn = Message::parse(&t.sent()[0]).unwrap().txn;
    t.recv(&unauthorized(txn, msg::ALLOCATE, 401));
    match t.c.poll_event() {
        Some(TurnEvent::Failed {
            code: Some(401), ..
        }) => {}
        other => panic!("expected a 401 failure, got {other:?}"),
    }
    assert!(!t.c.gathering());
    assert!(t.sent().is_empty(), "no retry before the back-off");
}

#[test]
fn refreshes_before_expiry_and_retransmits() {
    let mut t = T::new();
    t.allocate();
    t.now += Duration::from_secs(539);
    assert!(t.sent().is_empty());
    assert_eq!(t.c.poll_timeout(), Some(t.now + Duration::from_secs(1)));
    t.now += Duration::from_secs(1);
    let r = t.sent();
    let m = Message::parse(&r[0]).unwrap();
    assert_eq!(
        (m.method, m.u32_attr(msg::ATTR_LIFETIME)),
        (msg::REFRESH, Some(600))
    );
    assert!(m.verify_integrity(&key("alice")));
    t.now += FIRST_RTO;
    assert_eq!(t.sent().len(), 1, "retransmitted");
    let ok = Builder::new(msg::REFRESH, Class::Success, m.txn)
        .u32(msg::ATTR_LIFETIME, 600)
        .integrity(&key("alice"))
        .build();
    t.recv(&ok);
    t.now += Duration::from_secs(500);
    assert!(t.sent().is_empty());
    assert!(t.c.is_relay(relay()), "still allocated after the refresh");
}

#[test]
fn an_unanswered_allocation_expires_and_is_lost() {
    let mut t = T::new();
    t.allocate();
    // The server goes away: the refresh is never answered.
    for _ in 0..40 {
        t.now += Duration::from_secs(20);
        t.sent();
    }
    let events: Vec<_> = std::iter::from_fn(|| t.c.poll_event()).collect();
    assert!(
        events.contains(&TurnEvent::Lost { relay: relay() }),
        "{events:?}"
    );
    assert!(!t.c.is_relay(relay()));
}

#[test]
fn data_goes_through_a_channel_and_comes_back() {
    let mut t = T::new();
    t.allocate();
    // First datagram to a new peer: a ChannelBind, the datagram waits.
    assert_eq!(
        t.c.send(relay(), peer(), b"ping", t.now, &mut t.rng),
        Some(None)
    );
    assert_eq!(
        t.c.send(peer(), peer(), b"x", t.now, &mut t.rng),
        None,
        "not a relay"
    );
    let bind = t.sent();
    let m = Message::parse(&bind[0]).unwrap();
    assert_eq!(m.method, msg::CHANNEL_BIND);
    assert_eq!(m.xor_addr(msg::ATTR_XOR_PEER_ADDRESS), Some(peer()));
    let number = m.channel_number().unwrap();
    assert!((0x4000..=0x4fff).contains(&number));
    assert_eq!(t.c.poll_queued(&mut t.rng), None, "not bound yet");
    let ok = Builder::new(msg::CHANNEL_BIND, Class::Success, m.txn)
        .integrity(&key("alice"))
        .build();
    t.recv(&ok);
    let q = t.c.poll_queued(&mut t.rng).unwrap();
    assert_eq!(
        msg::parse_channel_data(&q.contents),
        Some((number, &b"ping"[..]))
    );
    let direct =
        t.c.send(relay(), peer(), b"pong", t.now, &mut t.rng)
            .unwrap()
            .unwrap();
    assert_eq!(
        msg::parse_channel_data(&direct.contents),
        Some((number, &b"pong"[..]))
    );
    // Inbound ChannelData and Data indications become datagrams from the peer to the relay.
    let got = t
        .recv(&msg::channel_data(number, b"hello"))
        .unwrap()
        .unwrap();
    assert_eq!(
        got,
        Relayed {
            peer: peer(),
            relay: relay(),
            data: b"hello".to_vec()
        }
    );
    assert_eq!(
        t.recv(&msg::channel_data(0x4abc, b"x")),
        Some(None),
        "unbound channel"
    );
    let ind = Builder::new(msg::DATA, Class::Indication, [3; 12])
        .xor_addr(msg::ATTR_XOR_PEER_ADDRESS, peer())
        .attr(msg::ATTR_DATA, b"via-indication")
        .build();
    assert_eq!(t.recv(&ind).unwrap().unwrap().data, b"via-indication");
    let stranger = Builder::new(msg::DATA, Class::Indication, [3; 12])
        .xor_addr(msg::ATTR_XOR_PEER_ADDRESS, "192.0.2.99:1".parse().unwrap())
        .attr(msg::ATTR_DATA, b"x")
        .build();
    assert_eq!(t.recv(&stranger), Some(None), "no permission for that peer");
    // The binding is refreshed before the permission's 5 minutes run out.
    t.now += PERMISSION_REFRESH;
    let again = t.sent();
    assert!(again
        .iter()
        .any(|b| Message::parse(b).unwrap().method == msg::CHANNEL_BIND));
}

#[test]
fn new_credentials_are_used_after_the_old_are_refused() {
    let mut t = T::new();
    t.allocate();
    t.c.set_credentials(creds("alice2"), &[local()], t.now);
    t.now += Duration::from_secs(540);
    let r = t.sent();
    let m = Message::parse(&r[0]).unwrap();
    assert_eq!(
        m.str_attr(msg::ATTR_USERNAME),
        Some("alice"),
        "an allocation keeps its username"
    );
    // The old credentials expired: refused twice (the second time with a fresh nonce).
    t.recv(&unauthorized(m.txn, msg::REFRESH, 401));
    let sent = t.sent();
    let m = Message::parse(&sent[0]).unwrap();
    t.recv(&unauthorized(m.txn, msg::REFRESH, 401));
    let events: Vec<_> = std::iter::from_fn(|| t.c.poll_event()).collect();
    assert!(
        events.contains(&TurnEvent::Lost { relay: relay() }),
        "{events:?}"
    );
    // A new allocation with the new credentials follows at once.
    let first = t.sent();
    let m = Message::parse(&first[0]).unwrap();
    assert_eq!(m.method, msg::ALLOCATE);
    t.recv(&unauthorized(m.txn, msg::ALLOCATE, 401));
    let sent = t.sent();
    let m = Message::parse(&sent[0]).unwrap();
    assert_eq!(m.str_attr(msg::ATTR_USERNAME), Some("alice2"));
    assert!(m.verify_integrity(&key("alice2")));
}

#[test]
fn a_refused_channel_bind_falls_back_to_a_permission_and_send_indications() {
    let mut t = T::new();
    t.allocate();
    assert_eq!(
        t.c.send(relay(), peer(), b"ping", t.now, &mut t.rng),
        Some(None)
    );
    let bind = Message::parse(&t.sent()[0]).unwrap().txn;
    let refused = Builder::new(msg::CHANNEL_BIND, Class::Error, bind)
        .error(403, "Forbidden")
        .integrity(&key("alice"))
        .build();
    t.recv(&refused);
    let sent = t.sent();
    let perm = Message::parse(&sent[0]).unwrap();
    assert_eq!(perm.method, msg::CREATE_PERMISSION);
    assert_eq!(perm.xor_addr(msg::ATTR_XOR_PEER_ADDRESS), Some(peer()));
    assert!(perm.verify_integrity(&key("alice")));
    assert_eq!(t.c.poll_queued(&mut t.rng), None, "no permission yet");
    let ok = Builder::new(msg::CREATE_PERMISSION, Class::Success, perm.txn)
        .integrity(&key("alice"))
        .build();
    t.recv(&ok);
    for out in [
        t.c.poll_queued(&mut t.rng).unwrap(),
        t.c.send(relay(), peer(), b"pong", t.now, &mut t.rng)
            .unwrap()
            .unwrap(),
    ] {
        let m = Message::parse(&out.contents).unwrap();
        assert_eq!((m.method, m.class), (msg::SEND, Class::Indication));
        assert_eq!(m.xor_addr(msg::ATTR_XOR_PEER_ADDRESS), Some(peer()));
    }
    // The permission is refreshed with CreatePermission, not ChannelBind.
    t.now += PERMISSION_REFRESH;
    let again = t.sent();
    assert!(again
        .iter()
        .any(|b| Message::parse(b).unwrap().method == msg::CREATE_PERMISSION));
}
