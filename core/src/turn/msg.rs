//! STUN/TURN message codec (RFC 8489, RFC 8656): just what a TURN client and a simulated TURN
//! server need. Parsing never panics and never allocates more than the datagram.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub const MAGIC_COOKIE: u32 = 0x2112_A442;

// Methods.
pub const BINDING: u16 = 0x001;
pub const ALLOCATE: u16 = 0x003;
pub const REFRESH: u16 = 0x004;
pub const SEND: u16 = 0x006;
pub const DATA: u16 = 0x007;
pub const CREATE_PERMISSION: u16 = 0x008;
pub const CHANNEL_BIND: u16 = 0x009;

/// Message classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Request,
    Indication,
    Success,
    Error,
}

// Attributes.
pub const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
pub const ATTR_USERNAME: u16 = 0x0006;
pub const ATTR_MESSAGE_INTEGRITY: u16 = 0x0008;
pub const ATTR_ERROR_CODE: u16 = 0x0009;
pub const ATTR_CHANNEL_NUMBER: u16 = 0x000C;
pub const ATTR_LIFETIME: u16 = 0x000D;
pub const ATTR_XOR_PEER_ADDRESS: u16 = 0x0012;
pub const ATTR_DATA: u16 = 0x0013;
pub const ATTR_REALM: u16 = 0x0014;
pub const ATTR_NONCE: u16 = 0x0015;
pub const ATTR_XOR_RELAYED_ADDRESS: u16 = 0x0016;
pub const ATTR_REQUESTED_TRANSPORT: u16 = 0x0019;
pub const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
pub const ATTR_SOFTWARE: u16 = 0x8022;
pub const ATTR_FINGERPRINT: u16 = 0x8028;

/// Transport protocol number of UDP in REQUESTED-TRANSPORT.
pub const TRANSPORT_UDP: u8 = 17;

/// Why bytes are not a STUN message we can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgError {
    TooShort,
    NotStun,
    BadLength,
    BadAttribute,
}

impl std::fmt::Display for MsgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MsgError::TooShort => "shorter than a STUN header",
            MsgError::NotStun => "not a STUN message",
            MsgError::BadLength => "length field does not match the datagram",
            MsgError::BadAttribute => "malformed attribute",
        })
    }
}

pub fn message_type(method: u16, class: Class) -> u16 {
    let c = match class {
        Class::Request => 0b00,
        Class::Indication => 0b01,
        Class::Success => 0b10,
        Class::Error => 0b11,
    };
    let m = method & 0x0fff;
    (m & 0x000f) | ((m & 0x0070) << 1) | ((m & 0x0f80) << 2) | ((c & 1) << 4) | ((c & 2) << 7)
}

fn split_type(t: u16) -> (u16, Class) {
    let method = (t & 0x000f) | ((t >> 1) & 0x0070) | ((t >> 2) & 0x0f80);
    let class = match ((t >> 4) & 1) | ((t >> 7) & 2) {
        0 => Class::Request,
        1 => Class::Indication,
        2 => Class::Success,
        _ => Class::Error,
    };
    (method, class)
}

/// True when `data` looks like a STUN message (first two bits zero, magic cookie).
pub fn is_stun(data: &[u8]) -> bool {
    data.len() >= 20
        && data.first().is_some_and(|b| b & 0xc0 == 0)
        && data.get(4..8) == Some(&MAGIC_COOKIE.to_be_bytes()[..])
}

/// True when `data` looks like TURN ChannelData (channel numbers 0x4000..=0x4FFF).
pub fn is_channel_data(data: &[u8]) -> bool {
    data.len() >= 4 && data.first().is_some_and(|b| (0x40..=0x4f).contains(b))
}

/// A parsed message, borrowing the datagram.
#[derive(Debug)]
pub struct Message<'a> {
    pub method: u16,
    pub class: Class,
    pub txn: [u8; 12],
    raw: &'a [u8],
    /// (type, value offset, value length) of each attribute, in order.
    attrs: heapless::Vec<(u16, usize, usize), 32>,
}

impl<'a> Message<'a> {
    pub fn parse(raw: &'a [u8]) -> Result<Message<'a>, MsgError> {
        if raw.len() < 20 {
            return Err(MsgError::TooShort);
        }
        if !is_stun(raw) {
            return Err(MsgError::NotStun);
        }
        let b = |i: usize| raw.get(i).copied().unwrap_or(0);
        let t = u16::from_be_bytes([b(0), b(1)]);
        let len = usize::from(u16::from_be_bytes([b(2), b(3)]));
        if len % 4 != 0 || 20 + len != raw.len() {
            return Err(MsgError::BadLength);
        }
        let mut txn = [0u8; 12];
        txn.copy_from_slice(raw.get(8..20).ok_or(MsgError::TooShort)?);
        let (method, class) = split_type(t);
        let mut attrs = heapless::Vec::new();
        let mut at = 20;
        while at < raw.len() {
            let h: [u8; 4] = raw
                .get(at..at + 4)
                .and_then(|h| h.try_into().ok())
                .ok_or(MsgError::BadAttribute)?;
            let [t0, t1, l0, l1] = h;
            let at_type = u16::from_be_bytes([t0, t1]);
            let at_len = usize::from(u16::from_be_bytes([l0, l1]));
            let start = at + 4;
            if start + at_len > raw.len() {
                return Err(MsgError::BadAttribute);
            }
            // Too many attributes: the rest are ignored (none we need come that late).
            let _ = attrs.push((at_type, start, at_len));
            at = start + at_len.div_ceil(4) * 4;
        }
        Ok(Message {
            method,
            class,
            txn,
            raw,
            attrs,
        })
    }

    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    pub fn attr(&self, t: u16) -> Option<&'a [u8]> {
        let raw = self.raw;
        self.attrs
            .iter()
            .find(|(at, _, _)| *at == t)
            .and_then(|(_, s, l)| raw.get(*s..*s + *l))
    }

    pub fn has(&self, t: u16) -> bool {
        self.attrs.iter().any(|(at, _, _)| *at == t)
    }

    pub fn u32_attr(&self, t: u16) -> Option<u32> {
        let v = self.attr(t)?;
        Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?))
    }

    pub fn str_attr(&self, t: u16) -> Option<&'a str> {
        std::str::from_utf8(self.attr(t)?).ok()
    }

    /// An XOR-*-ADDRESS attribute.
    pub fn xor_addr(&self, t: u16) -> Option<SocketAddr> {
        decode_addr(self.attr(t)?, Some(&self.txn))
    }

    pub fn mapped_addr(&self) -> Option<SocketAddr> {
        self.xor_addr(ATTR_XOR_MAPPED_ADDRESS)
            .or_else(|| decode_addr(self.attr(ATTR_MAPPED_ADDRESS)?, None))
    }

    /// (code, reason) of ERROR-CODE.
    pub fn error_code(&self) -> Option<(u16, &'a str)> {
        let v = self.attr(ATTR_ERROR_CODE)?;
        let class = u16::from(*v.get(2)? & 0x07);
        let number = u16::from(*v.get(3)?);
        let reason = std::str::from_utf8(v.get(4..)?).unwrap_or("");
        Some((class * 100 + number, reason))
    }

    pub fn channel_number(&self) -> Option<u16> {
        let v = self.attr(ATTR_CHANNEL_NUMBER)?;
        Some(u16::from_be_bytes([*v.first()?, *v.get(1)?]))
    }

    /// Checks MESSAGE-INTEGRITY (HMAC-SHA1 over the message up to the attribute, with the
    /// length field covering it). `false` when it is missing or wrong.
    pub fn verify_integrity(&self, key: &[u8]) -> bool {
        let Some((_, start, len)) = self
            .attrs
            .iter()
            .find(|(t, _, _)| *t == ATTR_MESSAGE_INTEGRITY)
            .copied()
        else {
            return false;
        };
        if len != 20 {
            return false;
        }
        let (Some(head), Some(body), Some(mac)) = (
            self.raw.get(..2),
            self.raw.get(4..start - 4),
            self.raw.get(start..start + 20),
        ) else {
            return false;
        };
        let covered = (start + 20 - 20) as u16;
        let mut ctx = aws_lc_rs::hmac::Context::with_key(&hmac_key(key));
        ctx.update(head);
        ctx.update(&covered.to_be_bytes());
        ctx.update(body);
        let tag = ctx.sign();
        // Constant-time enough for a 20-byte tag compared once per datagram.
        tag.as_ref()
            .iter()
            .zip(mac)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

fn hmac_key(key: &[u8]) -> aws_lc_rs::hmac::Key {
    aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, key)
}

/// The long-term credential key: MD5(username ":" realm ":" password).
pub fn long_term_key(username: &str, realm: &str, password: &str) -> [u8; 16] {
    use md5::Digest;
    let mut h = md5::Md5::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.update(b":");
    h.update(password.as_bytes());
    h.finalize().into()
}

fn decode_addr(v: &[u8], xor_txn: Option<&[u8; 12]>) -> Option<SocketAddr> {
    let family = *v.get(1)?;
    let mut port = u16::from_be_bytes([*v.get(2)?, *v.get(3)?]);
    let cookie = MAGIC_COOKIE.to_be_bytes();
    if xor_txn.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    let ip = match family {
        0x01 => {
            let mut b: [u8; 4] = v.get(4..8)?.try_into().ok()?;
            if xor_txn.is_some() {
                for (x, c) in b.iter_mut().zip(cookie) {
                    *x ^= c;
                }
            }
            IpAddr::V4(Ipv4Addr::from(b))
        }
        0x02 => {
            let mut b: [u8; 16] = v.get(4..20)?.try_into().ok()?;
            if let Some(txn) = xor_txn {
                for (x, k) in b.iter_mut().zip(cookie.iter().chain(txn.iter())) {
                    *x ^= k;
                }
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn encode_xor_addr(addr: SocketAddr, txn: &[u8; 12]) -> Vec<u8> {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let port = addr.port() ^ (MAGIC_COOKIE >> 16) as u16;
    let mut v = Vec::with_capacity(20);
    match addr.ip() {
        IpAddr::V4(ip) => {
            v.extend_from_slice(&[0, 1]);
            v.extend_from_slice(&port.to_be_bytes());
            v.extend(ip.octets().iter().zip(cookie).map(|(a, c)| a ^ c));
        }
        IpAddr::V6(ip) => {
            v.extend_from_slice(&[0, 2]);
            v.extend_from_slice(&port.to_be_bytes());
            v.extend(
                ip.octets()
                    .iter()
                    .zip(cookie.iter().chain(txn.iter()))
                    .map(|(a, k)| a ^ k),
            );
        }
    }
    v
}

/// Builds one message. Attributes in call order; `integrity` and `fingerprint` last.
#[derive(Debug)]
pub struct Builder {
    buf: Vec<u8>,
    txn: [u8; 12],
}

impl Builder {
    pub fn new(method: u16, class: Class, txn: [u8; 12]) -> Builder {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&message_type(method, class).to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf.extend_from_slice(&txn);
        Builder { buf, txn }
    }

    fn set_len(&mut self, extra: usize) {
        let len = (self.buf.len() - 20 + extra) as u16;
        if let Some(field) = self.buf.get_mut(2..4) {
            field.copy_from_slice(&len.to_be_bytes());
        }
    }

    pub fn attr(mut self, t: u16, v: &[u8]) -> Builder {
        self.buf.extend_from_slice(&t.to_be_bytes());
        self.buf.extend_from_slice(&(v.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(v);
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
        self.set_len(0);
        self
    }

    pub fn u32(self, t: u16, v: u32) -> Builder {
        self.attr(t, &v.to_be_bytes())
    }

    pub fn xor_addr(self, t: u16, addr: SocketAddr) -> Builder {
        let v = encode_xor_addr(addr, &self.txn);
        self.attr(t, &v)
    }

    pub fn error(self, code: u16, reason: &str) -> Builder {
        let mut v = vec![0, 0, (code / 100) as u8, (code % 100) as u8];
        v.extend_from_slice(reason.as_bytes());
        self.attr(ATTR_ERROR_CODE, &v)
    }

    pub fn channel(self, number: u16) -> Builder {
        let mut v = number.to_be_bytes().to_vec();
        v.extend_from_slice(&[0, 0]);
        self.attr(ATTR_CHANNEL_NUMBER, &v)
    }

    pub fn integrity(mut self, key: &[u8]) -> Builder {
        self.set_len(24);
        let tag = aws_lc_rs::hmac::sign(&hmac_key(key), &self.buf);
        let mut mac = [0u8; 20];
        mac.copy_from_slice(tag.as_ref().get(..20).unwrap_or(&[0; 20]));
        self.attr(ATTR_MESSAGE_INTEGRITY, &mac)
    }

    pub fn fingerprint(mut self) -> Builder {
        self.set_len(8);
        let crc = crc32(&self.buf) ^ 0x5354_554e;
        self.u32(ATTR_FINGERPRINT, crc)
    }

    pub fn build(self) -> Vec<u8> {
        self.buf
    }
}

/// A ChannelData message.
pub fn channel_data(channel: u16, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + data.len() + 3);
    v.extend_from_slice(&channel.to_be_bytes());
    v.extend_from_slice(&(data.len() as u16).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// (channel, payload) of a ChannelData message (padding allowed after the payload).
pub fn parse_channel_data(data: &[u8]) -> Option<(u16, &[u8])> {
    if !is_channel_data(data) {
        return None;
    }
    let channel = u16::from_be_bytes([*data.first()?, *data.get(1)?]);
    let len = usize::from(u16::from_be_bytes([*data.get(2)?, *data.get(3)?]));
    Some((channel, data.get(4..4 + len)?))
}

/// CRC-32 (ISO-HDLC), as FINGERPRINT uses (RFC 5389 §15.5).
const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

fn crc32(data: &[u8]) -> u32 {
    CRC32.checksum(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_round_trip() {
        assert_eq!(message_type(BINDING, Class::Request), 0x0001);
        assert_eq!(message_type(BINDING, Class::Success), 0x0101);
        assert_eq!(message_type(ALLOCATE, Class::Request), 0x0003);
        assert_eq!(message_type(ALLOCATE, Class::Error), 0x0113);
        assert_eq!(message_type(SEND, Class::Indication), 0x0016);
        assert_eq!(message_type(DATA, Class::Indication), 0x0017);
        assert_eq!(message_type(CHANNEL_BIND, Class::Success), 0x0109);
        for m in [
            BINDING,
            ALLOCATE,
            REFRESH,
            SEND,
            DATA,
            CREATE_PERMISSION,
            CHANNEL_BIND,
        ] {
            for c in [
                Class::Request,
                Class::Indication,
                Class::Success,
                Class::Error,
            ] {
                assert_eq!(split_type(message_type(m, c)), (m, c));
            }
        }
    }

    /// RFC 5769 2.1: the sample request (short-term password "VOkJxbRl1RmTxUk/WvJxBt").
    #[test]
    fn rfc5769_sample_request() {
        let hex = concat!(
            "000100582112a442b7e7a701bc34d686fa87dfae",
            "802200105354554e207465737420636c69656e74",
            "002400046e0001ff",
            "80290008932ff9b151263b36",
            "000600096576746a3a68367659202020",
            "000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2",
            "80280004e57a3bcf",
        );
        let raw: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let m = Message::parse(&raw).unwrap();
        assert_eq!((m.method, m.class), (BINDING, Class::Request));
        assert_eq!(m.str_attr(ATTR_USERNAME), Some("evtj:h6vY"));
        assert!(m.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBt"));
        assert!(!m.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBT"));
        let fp = raw.len() - 8;
        assert_eq!(crc32(&raw[..fp]) ^ 0x5354_554e, 0xe57a_3bcf);
        // Our builder, given the same attributes, writes the same FINGERPRINT layout.
        let b = Builder::new(BINDING, Class::Request, m.txn)
            .attr(ATTR_SOFTWARE, m.attr(ATTR_SOFTWARE).unwrap())
            .attr(0x0024, m.attr(0x0024).unwrap())
            .attr(0x8029, m.attr(0x8029).unwrap())
            .attr(ATTR_USERNAME, b"evtj:h6vY")
            .integrity(b"VOkJxbRl1RmTxUk/WvJxBt")
            .fingerprint()
            .build();
        assert_eq!(b.len(), raw.len());
        let ours = Message::parse(&b).unwrap();
        assert!(ours.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBt"));
        // Identical up to the username's padding (spaces there, zeros here).
        assert_eq!(&b[..fp - 24 - 3], &raw[..fp - 24 - 3]);
    }

    #[test]
    fn built_messages_parse_back() {
        let txn = [9u8; 12];
        let peer: SocketAddr = "[2001:db8::7]:4242".parse().unwrap();
        let key = long_term_key("user", "realm", "pass");
        let raw = Builder::new(CHANNEL_BIND, Class::Request, txn)
            .channel(0x4001)
            .xor_addr(ATTR_XOR_PEER_ADDRESS, peer)
            .attr(ATTR_USERNAME, b"user")
            .integrity(&key)
            .fingerprint()
            .build();
        let m = Message::parse(&raw).unwrap();
        assert_eq!((m.method, m.class), (CHANNEL_BIND, Class::Request));
        assert_eq!(m.channel_number(), Some(0x4001));
        assert_eq!(m.xor_addr(ATTR_XOR_PEER_ADDRESS), Some(peer));
        assert!(m.verify_integrity(&key));
        let e = Builder::new(ALLOCATE, Class::Error, txn)
            .error(438, "Stale Nonce")
            .build();
        assert_eq!(
            Message::parse(&e).unwrap().error_code(),
            Some((438, "Stale Nonce"))
        );
        let cd = channel_data(0x4001, b"hello");
        assert_eq!(parse_channel_data(&cd), Some((0x4001, &b"hello"[..])));
    }

    #[test]
    fn garbage_never_panics() {
        let txn = [1u8; 12];
        let good = Builder::new(ALLOCATE, Class::Success, txn)
            .xor_addr(ATTR_XOR_RELAYED_ADDRESS, "192.0.2.1:5000".parse().unwrap())
            .u32(ATTR_LIFETIME, 600)
            .build();
        for n in 0..good.len() {
            let _ = Message::parse(&good[..n]).map(|m| {
                (
                    m.xor_addr(ATTR_XOR_RELAYED_ADDRESS),
                    m.verify_integrity(b"k"),
                )
            });
            let mut bad = good.clone();
            bad[n] ^= 0xff;
            let _ = Message::parse(&bad).map(|m| {
                (
                    m.xor_addr(ATTR_XOR_RELAYED_ADDRESS),
                    m.u32_attr(ATTR_LIFETIME),
                )
            });
        }
        assert!(parse_channel_data(&[0x40, 0, 0, 9, 1]).is_none());
    }
}
