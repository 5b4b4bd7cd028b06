//! `stun:`, `turn:` and `turns:` URIs (RFC 7064, RFC 7065), as `/voip/turnServer` lists them.

use std::net::{IpAddr, SocketAddr};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UriScheme {
    Stun,
    Turn,
    Turns,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UriTransport {
    Udp,
    Tcp,
}

/// A parsed STUN/TURN URI. `host` is an IP literal or a name the driver resolves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnUri {
    pub scheme: UriScheme,
    pub host: String,
    pub port: u16,
    pub transport: UriTransport,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UriError {
    Scheme,
    Host,
    Port,
    Transport,
}

impl std::fmt::Display for UriError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UriError::Scheme => "not a stun:, turn: or turns: URI",
            UriError::Host => "no host",
            UriError::Port => "bad port",
            UriError::Transport => "unknown transport (udp or tcp)",
        })
    }
}

impl std::error::Error for UriError {}

impl TurnUri {
    pub fn parse(uri: &str) -> Result<TurnUri, UriError> {
        let uri = uri.trim();
        let (scheme, rest) = if let Some(r) = uri.strip_prefix("stun:") {
            (UriScheme::Stun, r)
        } else if let Some(r) = uri.strip_prefix("turns:") {
            (UriScheme::Turns, r)
        } else if let Some(r) = uri.strip_prefix("turn:") {
            (UriScheme::Turn, r)
        } else {
            return Err(UriError::Scheme);
        };
        let (hostport, query) = match rest.split_once('?') {
            Some((h, q)) => (h, Some(q)),
            None => (rest, None),
        };
        let mut transport = match scheme {
            UriScheme::Turns => UriTransport::Tcp,
            _ => UriTransport::Udp,
        };
        if let Some(q) = query {
            for kv in q.split('&') {
                match kv.split_once('=') {
                    Some(("transport", "udp")) => transport = UriTransport::Udp,
                    Some(("transport", "tcp")) => transport = UriTransport::Tcp,
                    Some(("transport", _)) => return Err(UriError::Transport),
                    _ => {}
                }
            }
        }
        let default_port = if scheme == UriScheme::Turns {
            5349
        } else {
            3478
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or(UriError::Host)?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| UriError::Port)?,
                None if after.is_empty() => default_port,
                None => return Err(UriError::Port),
            };
            (h, port)
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, p.parse().map_err(|_| UriError::Port)?),
                None => (hostport, default_port),
            }
        };
        if host.is_empty() || host.contains(['/', '@', ' ']) {
            return Err(UriError::Host);
        }
        Ok(TurnUri {
            scheme,
            host: host.to_owned(),
            port,
            transport,
        })
    }

    /// The server's address when the host is an IP literal.
    pub fn addr(&self) -> Option<SocketAddr> {
        let ip: IpAddr = self.host.parse().ok()?;
        Some(SocketAddr::new(ip, self.port))
    }

    /// `host:port` for a resolver (IPv6 hosts bracketed).
    pub fn host_port(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// A TURN server we can allocate on over UDP (TCP/TLS TURN is not implemented).
    pub fn is_udp_turn(&self) -> bool {
        self.scheme == UriScheme::Turn && self.transport == UriTransport::Udp
    }

    /// Usable for a STUN binding over UDP (every UDP TURN server answers Binding too).
    pub fn is_udp_stun(&self) -> bool {
        self.transport == UriTransport::Udp && self.scheme != UriScheme::Turns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let u = TurnUri::parse("turn:192.0.2.1:3479?transport=udp").unwrap();
        assert_eq!(u.addr(), Some("192.0.2.1:3479".parse().unwrap()));
        assert!(u.is_udp_turn());
        let u = TurnUri::parse("turn:[::1]:3478").unwrap();
        assert_eq!(u.addr(), Some("[::1]:3478".parse().unwrap()));
        assert_eq!(u.host_port(), "[::1]:3478");
        let u = TurnUri::parse("turn:192.0.2.1").unwrap();
        assert_eq!(u.port, 3478);
        let u = TurnUri::parse("turn:turn.example.org?transport=tcp").unwrap();
        assert_eq!((u.addr(), u.transport), (None, UriTransport::Tcp));
        assert!(!u.is_udp_turn() && !u.is_udp_stun());
        assert_eq!(u.host_port(), "turn.example.org:3478");
        let u = TurnUri::parse("turns:turn.example.org").unwrap();
        assert_eq!((u.port, u.transport), (5349, UriTransport::Tcp));
        assert!(TurnUri::parse("stun:198.51.100.1:19302")
            .unwrap()
            .is_udp_stun());
        assert_eq!(TurnUri::parse("http://x"), Err(UriError::Scheme));
        assert_eq!(TurnUri::parse("turn:"), Err(UriError::Host));
        assert_eq!(TurnUri::parse("turn:h:99999"), Err(UriError::Port));
        assert_eq!(
            TurnUri::parse("turn:h?transport=sctp"),
            Err(UriError::Transport)
        );
        assert_eq!(TurnUri::parse("turn:[::1"), Err(UriError::Host));
    }
}
