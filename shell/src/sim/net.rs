//! A simulated UDP network: per-link latency, jitter, loss (uniform or bursty), reordering and
//! duplication, all drawn from seeded generators.
//!
//! Each direction of each link has its own generator (seeded from the world seed and the two
//! addresses), so what happens on one link never shifts the random draws of another.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// How one direction of a link behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkProfile {
    /// One-way base latency.
    pub latency: Duration,
    /// Extra delay, uniform in `0..=jitter` (packets may then arrive out of order).
    pub jitter: Duration,
    /// Probability a datagram is lost (in the good state when `burst` is set).
    pub loss: f64,
    /// Gilbert-Elliott bursty loss: (p good->bad, p bad->good); in the bad state everything is lost.
    pub burst: Option<(f64, f64)>,
    /// Probability a datagram is held back by an extra `latency` (reordered).
    pub reorder: f64,
    /// Probability a datagram is delivered twice.
    pub duplicate: f64,
}

impl LinkProfile {
    pub fn ideal(latency: Duration) -> Self {
        LinkProfile {
            latency,
            jitter: Duration::ZERO,
            loss: 0.0,
            burst: None,
            reorder: 0.0,
            duplicate: 0.0,
        }
    }

    /// Home wifi: 20 ms, some jitter, 1 % loss.
    pub fn wifi() -> Self {
        LinkProfile {
            latency: Duration::from_millis(20),
            jitter: Duration::from_millis(10),
            loss: 0.01,
            burst: None,
            reorder: 0.01,
            duplicate: 0.0,
        }
    }

    /// Mobile: 60 ms, jitter, 3 % loss in bursts.
    pub fn cellular() -> Self {
        LinkProfile {
            latency: Duration::from_millis(60),
            jitter: Duration::from_millis(30),
            loss: 0.01,
            burst: Some((0.01, 0.3)),
            reorder: 0.02,
            duplicate: 0.005,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Datagram {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub contents: Vec<u8>,
}

#[derive(Debug)]
struct LinkState {
    rng: fastrand::Rng,
    bad: bool,
}

/// Counters of what the network did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    pub sent: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
}

#[derive(Debug)]
pub struct SimNet {
    seed: u64,
    default: LinkProfile,
    profiles: BTreeMap<(IpAddr, IpAddr), LinkProfile>,
    links: BTreeMap<(IpAddr, IpAddr), LinkState>,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    in_flight: BTreeMap<u64, Datagram>,
    next_seq: u64,
    /// Addresses cut off from everything (a host that went away).
    down: Vec<IpAddr>,
    pub stats: NetStats,
}

fn mix(mut x: u64) -> u64 {
    // splitmix64 finaliser: spreads the link key over the seed space.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn ip_key(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => u64::from(u32::from(v4)),
        IpAddr::V6(v6) => {
            let b = u128::from(v6);
            (b as u64) ^ ((b >> 64) as u64)
        }
    }
}

impl SimNet {
    pub fn new(seed: u64, default: LinkProfile) -> Self {
        SimNet {
            seed,
            default,
            profiles: BTreeMap::new(),
            links: BTreeMap::new(),
            queue: BinaryHeap::new(),
            in_flight: BTreeMap::new(),
            next_seq: 0,
            down: Vec::new(),
            stats: NetStats::default(),
        }
    }

    /// Sets the profile of the direction `from -> to`.
    pub fn set_link(&mut self, from: IpAddr, to: IpAddr, profile: LinkProfile) {
        self.profiles.insert((from, to), profile);
    }

    pub fn set_default(&mut self, profile: LinkProfile) {
        self.default = profile;
    }

    /// Cuts a host off (`true`) or brings it back.
    pub fn set_host_down(&mut self, ip: IpAddr, down: bool) {
        self.down.retain(|d| *d != ip);
        if down {
            self.down.push(ip);
        }
    }

    pub fn send(&mut self, now: Instant, d: Datagram) {
        self.stats.sent += 1;
        let key = (d.source.ip(), d.destination.ip());
        if self.down.contains(&key.0) || self.down.contains(&key.1) {
            self.stats.lost += 1;
            return;
        }
        let profile = self.profiles.get(&key).copied().unwrap_or(self.default);
        let seed = self.seed;
        let link = self.links.entry(key).or_insert_with(|| LinkState {
            rng: fastrand::Rng::with_seed(mix(seed ^ mix(ip_key(key.0)) ^ mix(ip_key(key.1) << 1))),
            bad: false,
        });
        if let Some((to_bad, to_good)) = profile.burst {
            let flip = link.rng.f64();
            if link.bad && flip < to_good {
                link.bad = false;
            } else if !link.bad && flip < to_bad {
                link.bad = true;
            }
        }
        let lost = link.bad || link.rng.f64() < profile.loss;
        let jitter_ns = profile.jitter.as_nanos() as u64;
        let mut delay = profile.latency;
        if jitter_ns > 0 {
            delay += Duration::from_nanos(link.rng.u64(0..=jitter_ns));
        }
        let reorder = link.rng.f64() < profile.reorder;
        let duplicate = link.rng.f64() < profile.duplicate;
        if lost {
            self.stats.lost += 1;
            return;
        }
        if reorder {
            self.stats.reordered += 1;
            delay += profile.latency.max(Duration::from_millis(5));
        }
        if duplicate {
            self.stats.duplicated += 1;
            self.enqueue(now + delay + Duration::from_millis(1), d.clone());
        }
        self.enqueue(now + delay, d);
    }

    fn enqueue(&mut self, at: Instant, d: Datagram) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.push(Reverse((at, seq)));
        self.in_flight.insert(seq, d);
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.queue.peek().map(|Reverse((at, _))| *at)
    }

    /// The next datagram due at `now`.
    pub fn poll_deliver(&mut self, now: Instant) -> Option<Datagram> {
        let Reverse((at, seq)) = *self.queue.peek()?;
        if at > now {
            return None;
        }
        self.queue.pop();
        let d = self.in_flight.remove(&seq)?;
        self.stats.delivered += 1;
        Some(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dgram(n: u8) -> Datagram {
        Datagram {
            source: "192.0.2.1:1000".parse().unwrap(),
            destination: "192.0.2.2:2000".parse().unwrap(),
            contents: vec![n],
        }
    }

    #[test]
    fn latency_is_applied_in_order() {
        let t0 = Instant::now();
        let mut net = SimNet::new(1, LinkProfile::ideal(Duration::from_millis(20)));
        net.send(t0, dgram(1));
        net.send(t0 + Duration::from_millis(1), dgram(2));
        assert_eq!(net.poll_timeout(), Some(t0 + Duration::from_millis(20)));
        assert!(net.poll_deliver(t0 + Duration::from_millis(19)).is_none());
        assert_eq!(
            net.poll_deliver(t0 + Duration::from_millis(25))
                .unwrap()
                .contents,
            vec![1]
        );
        assert_eq!(
            net.poll_deliver(t0 + Duration::from_millis(25))
                .unwrap()
                .contents,
            vec![2]
        );
    }

    #[test]
    fn loss_is_seeded_and_close_to_the_rate() {
        let run = |seed| {
            let t0 = Instant::now();
            let mut p = LinkProfile::ideal(Duration::from_millis(5));
            p.loss = 0.1;
            let mut net = SimNet::new(seed, p);
            for i in 0..2000u32 {
                net.send(t0, dgram((i % 255) as u8));
            }
            net.stats
        };
        let a = run(3);
        assert_eq!(a, run(3));
        assert!(a.lost > 120 && a.lost < 280, "lost {}", a.lost);
    }

    #[test]
    fn bursty_loss_and_duplicates_happen() {
        let t0 = Instant::now();
        let mut p = LinkProfile::ideal(Duration::from_millis(5));
        p.burst = Some((0.05, 0.2));
        p.duplicate = 0.05;
        let mut net = SimNet::new(9, p);
        for _ in 0..1000 {
            net.send(t0, dgram(0));
        }
        assert!(net.stats.lost > 50);
        assert!(net.stats.duplicated > 10);
    }
}
