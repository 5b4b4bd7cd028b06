//! What the driver needs from the host: addresses and UDP sockets, DNS for STUN/TURN names,
//! the homeserver HTTP client, the wall clock and the seed.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use call_assist_core::turn::TurnUri;
use call_assist_core::{HttpFailure, Secret, StaticTurn};
use smol::Async;
use tracing::{info, warn};

use super::config::TurnOptions;

/// Largest response body read from the homeserver.
const MAX_BODY: usize = 16 * 1024 * 1024;
/// Largest datagram read from a socket (media and STUN/TURN stay well below the MTU).
pub(crate) const MAX_DATAGRAM: usize = 2048;

pub(crate) type Sockets = BTreeMap<SocketAddr, Arc<Async<UdpSocket>>>;

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The live agent's randomness must be unpredictable; the core only needs a seed.
pub(crate) fn seed() -> u64 {
    let mut buf = [0u8; 8];
    match std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
    {
        Ok(()) => u64::from_le_bytes(buf),
        Err(_) => unix_ms() ^ u64::from(std::process::id()).rotate_left(32),
    }
}

/// Addresses of the host's interfaces: only `interfaces` when given, never `exclude`,
/// loopback only when allowed, never link-local.
pub(crate) fn local_ips(
    interfaces: &[String],
    exclude: &[String],
    allow_loopback: bool,
) -> Vec<IpAddr> {
    let ifaces = match if_addrs::get_if_addrs() {
        Ok(i) => i,
        Err(e) => {
            warn!("cannot list network interfaces: {e}");
            Vec::new()
        }
    };
    let mut ips: Vec<IpAddr> = ifaces
        .iter()
        .filter(|i| interfaces.is_empty() || interfaces.contains(&i.name))
        .filter(|i| !exclude.contains(&i.name))
        .filter(|i| allow_loopback || !i.is_loopback())
        .filter(|i| !i.is_link_local())
        .map(|i| i.ip())
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// Binds a UDP socket on each address (the driver's loop reads them itself). Addresses that
/// cannot be bound are logged and skipped.
pub(crate) fn bind_udp(ips: &[IpAddr], port: u16) -> Sockets {
    let mut sockets = BTreeMap::new();
    for ip in ips {
        let s = match Async::<UdpSocket>::bind(SocketAddr::new(*ip, port)) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                warn!(%ip, "cannot bind UDP: {e}");
                continue;
            }
        };
        let local = match s.get_ref().local_addr() {
            Ok(a) => a,
            Err(e) => {
                warn!("socket without address: {e}");
                continue;
            }
        };
        info!(%local, "receiving media on");
        sockets.insert(local, s);
    }
    sockets
}

/// The homeserver HTTP client (reqwest on rustls; runs under async-compat).
pub(crate) fn http_client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(90))
        .connect_timeout(Duration::from_secs(10))
        .build()
}

/// Turns the core's HTTP request into a reqwest call and the answer back into bytes.
pub(crate) async fn run_http(
    client: reqwest::Client,
    request: http::Request<Vec<u8>>,
) -> Result<http::Response<Vec<u8>>, HttpFailure> {
    let other = |e: &dyn std::fmt::Display| HttpFailure::Other(e.to_string());
    let request = reqwest::Request::try_from(request).map_err(|e| other(&e))?;
    let mut response = client.execute(request).await.map_err(|e| {
        if e.is_timeout() {
            HttpFailure::Timeout
        } else if e.is_connect() {
            HttpFailure::Connect(e.to_string())
        } else {
            other(&e)
        }
    })?;
    let mut out = http::Response::builder().status(response.status());
    for (k, v) in response.headers() {
        out = out.header(k, v);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| other(&e))? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(HttpFailure::Other("response body too large".into()));
        }
        body.extend_from_slice(&chunk);
    }
    out.body(body).map_err(|e| other(&e))
}

/// Host names (not IP literals) of the homeserver's UDP STUN/TURN URIs: (`host:port`, is a
/// TURN server). The core takes IP literals itself; names need DNS, which is the shell's job.
pub(crate) fn named_hosts(uris: &[String]) -> Vec<(String, bool)> {
    uris.iter()
        .filter_map(|u| TurnUri::parse(u).ok())
        .filter(|u| u.is_udp_stun() && u.addr().is_none())
        .map(|u| (u.host_port(), u.is_udp_turn()))
        .collect()
}

/// Resolves named STUN/TURN hosts (blocking DNS): (STUN addresses, TURN addresses).
pub(crate) fn resolve_hosts(hosts: &[(String, bool)]) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
    use std::net::ToSocketAddrs;
    let (mut stun, mut turn) = (Vec::new(), Vec::new());
    for (h, is_turn) in hosts {
        match h.to_socket_addrs() {
            Ok(addrs) => {
                for a in addrs {
                    stun.push(a);
                    if *is_turn {
                        turn.push(a);
                    }
                }
            }
            Err(e) => warn!("STUN/TURN server {h}: {e}"),
        }
    }
    (stun, turn)
}

/// Resolves `host:port` STUN servers from the config.
pub(crate) fn resolve_stun(servers: &[String]) -> Vec<SocketAddr> {
    use std::net::ToSocketAddrs;
    let mut out = Vec::new();
    for s in servers {
        let s = s.strip_prefix("stun:").unwrap_or(s);
        match s.to_socket_addrs() {
            Ok(addrs) => out.extend(addrs),
            Err(e) => warn!("STUN server {s}: {e}"),
        }
    }
    out
}

/// TURN from the config for the core; host names are resolved here, once (the config is
/// read at start).
pub(crate) fn static_turn(t: &TurnOptions) -> StaticTurn {
    let mut uris = Vec::new();
    for u in &t.uris {
        match TurnUri::parse(u) {
            Ok(parsed) if parsed.addr().is_some() => uris.push(u.clone()),
            Ok(parsed) => {
                let (_, addrs) = resolve_hosts(&[(parsed.host_port(), true)]);
                uris.extend(addrs.iter().map(|a| format!("turn:{a}?transport=udp")));
            }
            Err(e) => warn!("TURN URI {u:?}: {e}"),
        }
    }
    StaticTurn {
        uris,
        username: Secret::new(t.username.clone()),
        password: t.password.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::named_hosts;

    #[test]
    fn only_named_udp_hosts_need_dns() {
        let uris = [
            "turn:turn.example.org:3478?transport=udp",
            "turn:turn.example.org:3478?transport=tcp",
            "turn:192.0.2.1:3478?transport=udp",
            "stun:stun.example.org",
            "turns:turn.example.org:5349",
        ]
        .map(String::from);
        assert_eq!(
            named_hosts(&uris),
            vec![
                ("turn.example.org:3478".to_owned(), true),
                ("stun.example.org:3478".to_owned(), false)
            ]
        );
    }
}
