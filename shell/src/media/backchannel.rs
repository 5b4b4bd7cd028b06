//! The camera's speaker: the ONVIF audio backchannel (ONVIF Streaming Spec, "Audio
//! Backchannel"). A second RTSP session to the camera's URL whose DESCRIBE carries
//! `Require: www.onvif.org/ver20/backchannel`; the camera then lists an audio stream marked
//! `sendonly` (the client sends). We SETUP that stream over TCP (interleaved, so it crosses
//! anything the camera's video session does) or, when the station's `rtsp_transport` is udp,
//! over UDP (RTP to the camera's `server_port`), PLAY, and write RTP packets of the call's audio
//! into the connection, keeping the session alive with GET_PARAMETER.
//!
//! retina (the camera's video and audio, `rtsp.rs`) only plays, so this session is our own
//! small client on `rtsp-types` (message framing, typed Transport and Session headers),
//! `sdp-types` and `http-auth` (Basic and Digest), the crates retina itself is built on.
//! Credentials come from the same [`RtspSource`] as the camera's and never reach a log line.
//!
//! Only G.711 is played (PCMU or PCMA, what cameras' speakers take): the call's audio is
//! re-packetized (our SSRC, sequence numbers and timestamps), never decoded, unless the peer's
//! G.711 law differs from the camera's (then converted sample by sample).
//!
//! One task per camera: it reconnects with the camera's backoff when the session fails or
//! drops, and reports [`TalkbackEvent`]s to the loop. A camera without a backchannel, or with
//! one in a codec we cannot send, is reported once and not retried.

use std::fmt;
use std::time::{Duration, Instant};

use call_assist_core::Codec;
use futures_lite::{AsyncReadExt, AsyncWriteExt, FutureExt};
use rtsp_types::headers::{self, HeaderName};
use rtsp_types::{Message, Method, Request, Response, StatusCode, Version};
use smol::channel::{Receiver, Sender, TrySendError};
use smol::net::TcpStream;
use tracing::{debug, info, warn};

use super::rtsp::{RtspError, RtspSource, RtspTransport, RECONNECT_MAX, RECONNECT_MIN};

/// The feature tag an ONVIF camera wants before it lists its speaker.
pub const BACKCHANNEL_TAG: &str = "www.onvif.org/ver20/backchannel";
/// Packets waiting for the camera (20 ms each: 1 s). When full, new packets are dropped
/// and counted: a camera that does not read must not hold the call's loop.
pub const TALKBACK_QUEUE: usize = 50;
/// Connecting and each request/response exchange.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A write the camera does not take within this ends the session.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// An RTSP message larger than this (a DESCRIBE answer is ~1 kB; interleaved data at most
/// 64 kB) ends the session.
const MAX_MESSAGE: usize = 70 * 1024;
/// Session timeout when the camera names none (RFC 2326: 60 s).
const DEFAULT_SESSION_TIMEOUT_S: u64 = 60;

/// One packet of the call's audio for the camera, in the camera's codec.
#[derive(Debug, Clone)]
pub struct TalkbackPacket {
    /// G.711 samples, one byte each.
    pub data: Vec<u8>,
    /// The sender's RTP time (8 kHz).
    pub rtp_time: u64,
    /// A new talk spurt or a new speaker: timestamps are rebased, the marker bit set.
    pub restart: bool,
}

/// What the backchannel task reports.
#[derive(Debug, Clone)]
pub enum TalkbackEvent {
    /// The camera's speaker takes RTP now, in this codec.
    Ready { codec: Codec },
    /// The session failed or dropped; the task reconnects after `retry_in`.
    Lost {
        error: RtspError,
        retry_in: Duration,
    },
    /// The camera has no speaker we can use (no backchannel, or not G.711): not retried.
    Unavailable { message: String },
}

/// Why a session ended.
#[derive(Debug)]
enum Ended {
    /// The loop went away: stop.
    Closed,
    /// Retry after backoff; `true` when packets were sent (backoff starts over).
    Retry(RtspError, bool),
    /// Do not retry.
    Permanent(String),
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ended::Closed => f.write_str("closed"),
            Ended::Retry(e, _) => write!(f, "{e}"),
            Ended::Permanent(m) => f.write_str(m),
        }
    }
}

fn session_err(m: impl Into<String>) -> Ended {
    Ended::Retry(RtspError::Session(m.into()), false)
}

/// Starts the backchannel task for `source`: packets go in through the returned sender
/// (bounded, [`TALKBACK_QUEUE`]; use `try_send`), events come out on `events`. The task ends
/// when the packet sender is dropped or `events` is closed.
pub fn spawn(source: RtspSource, events: Sender<TalkbackEvent>) -> Sender<TalkbackPacket> {
    let (tx, rx) = smol::channel::bounded(TALKBACK_QUEUE);
    smol::spawn(run(source, rx, events)).detach();
    tx
}

/// Runs sessions until the packet sender or the event receiver is gone.
pub async fn run(source: RtspSource, rx: Receiver<TalkbackPacket>, events: Sender<TalkbackEvent>) {
    let mut rtp = RtpState::new();
    let mut backoff = RECONNECT_MIN;
    loop {
        let (error, sent) = match session(&source, &rx, &events, &mut rtp).await {
            Ended::Closed => return,
            Ended::Permanent(message) => {
                warn!(camera = %source, "talkback unavailable: {message}");
                let _ = events.send(TalkbackEvent::Unavailable { message }).await;
                return;
            }
            Ended::Retry(e, sent) => (e, sent),
        };
        if sent {
            backoff = RECONNECT_MIN;
        }
        warn!(camera = %source, retry_in_ms = backoff.as_millis() as u64, "talkback: {error}");
        let lost = TalkbackEvent::Lost {
            error,
            retry_in: backoff,
        };
        if events.send(lost).await.is_err() {
            return;
        }
        // Packets meanwhile are stale: dropped as they come, so the loop never waits.
        let deadline = Instant::now() + backoff;
        loop {
            let next = async { Some(rx.recv().await) }
                .or(async {
                    smol::Timer::at(deadline).await;
                    None
                })
                .await;
            match next {
                None => break,
                Some(Ok(_)) => {}
                Some(Err(_)) => return,
            }
        }
        backoff = (backoff * 2).min(RECONNECT_MAX);
    }
}

/// Our RTP stream toward the camera: SSRC, sequence numbers and timestamps of our own,
/// continuous across talk spurts, speakers and sessions.
#[derive(Debug)]
struct RtpState {
    ssrc: u32,
    seq: u16,
    /// Timestamp of the next packet if it follows on.
    next_ts: u32,
    /// (sender's RTP time, our timestamp) of the current spurt's first packet.
    anchor: Option<(u64, u32)>,
    marker: bool,
}

impl RtpState {
    fn new() -> Self {
        RtpState {
            ssrc: fastrand::u32(..),
            seq: fastrand::u16(..),
            next_ts: fastrand::u32(..),
            anchor: None,
            marker: true,
        }
    }

    /// A new session: the camera's depayloader starts over.
    fn new_session(&mut self) {
        self.anchor = None;
        self.marker = true;
    }

    /// The RTP packet for `p` with payload type `pt`.
    fn packet(&mut self, p: &TalkbackPacket, pt: u8) -> Vec<u8> {
        let anchor = match self.anchor {
            Some((first, ts)) if !p.restart && p.rtp_time >= first => (first, ts),
            _ => {
                self.marker = true;
                (p.rtp_time, self.next_ts)
            }
        };
        self.anchor = Some(anchor);
        // RTP timestamps wrap at 32 bits by design.
        let ts = anchor.1.wrapping_add((p.rtp_time - anchor.0) as u32);
        let mut out = Vec::with_capacity(12 + p.data.len());
        out.push(0x80);
        out.push(pt | if self.marker { 0x80 } else { 0 });
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&ts.to_be_bytes());
        out.extend_from_slice(&self.ssrc.to_be_bytes());
        out.extend_from_slice(&p.data);
        self.marker = false;
        self.seq = self.seq.wrapping_add(1);
        self.next_ts = ts.wrapping_add(p.data.len() as u32);
        out
    }
}

/// The camera's backchannel stream from its DESCRIBE answer.
#[derive(Debug, PartialEq, Eq)]
struct Backchannel {
    codec: Codec,
    pt: u8,
    control: url::Url,
}

/// Finds the `sendonly` audio stream of an ONVIF DESCRIBE answer. `Err(permanent reason)`
/// when there is none or it is not G.711.
fn find_backchannel(sdp: &[u8], base: &url::Url) -> Result<Backchannel, String> {
    let session = sdp_types::Session::parse(sdp)
        .map_err(|e| format!("the camera's SDP does not parse: {e:?}"))?;
    let media = session
        .medias
        .iter()
        .find(|m| m.media == "audio" && m.has_attribute("sendonly"))
        .ok_or_else(|| "the camera lists no backchannel (no sendonly audio stream)".to_owned())?;
    let mut found = None;
    let mut offered = Vec::new();
    for fmt in media.fmt.split_whitespace() {
        let Ok(pt) = fmt.parse::<u8>() else { continue };
        let rtpmap = media
            .get_attribute_values("rtpmap")
            .ok()
            .into_iter()
            .flatten()
            .flatten()
            .find_map(|v| v.strip_prefix(&format!("{pt} ")).map(str::to_owned));
        let name = rtpmap
            .as_deref()
            .and_then(|r| r.split('/').next())
            .map(str::to_ascii_uppercase);
        let codec = match (name.as_deref(), pt) {
            (Some("PCMU"), _) | (None, 0) => Some(Codec::Pcmu),
            (Some("PCMA"), _) | (None, 8) => Some(Codec::Pcma),
            _ => None,
        };
        offered.push(name.unwrap_or_else(|| pt.to_string()));
        if let Some(codec) = codec {
            found = Some((codec, pt));
            break;
        }
    }
    let (codec, pt) = found.ok_or_else(|| {
        format!("the camera's speaker takes {offered:?}; only PCMU and PCMA are sent")
    })?;
    let control = media
        .get_first_attribute_value("control")
        .ok()
        .flatten()
        .unwrap_or("");
    let control = if control.is_empty() || control == "*" {
        base.clone()
    } else {
        base.join(control)
            .map_err(|e| format!("the backchannel's control URL {control:?}: {e}"))?
    };
    Ok(Backchannel { codec, pt, control })
}

/// The RTSP connection: requests with CSeq and auth, and everything the camera sends.
struct Conn<'a> {
    stream: TcpStream,
    buf: Vec<u8>,
    cseq: u32,
    source: &'a RtspSource,
    auth: Option<http_auth::PasswordClient>,
    session: Option<String>,
}

impl Conn<'_> {
    /// Sends `method` for `url` (with auth, CSeq, Session) and waits for its response; one
    /// retry after a 401 when we have credentials.
    async fn request(
        &mut self,
        method: Method,
        url: &url::Url,
        extra: &[(HeaderName, String)],
    ) -> Result<Response<Vec<u8>>, Ended> {
        for attempt in 0..2 {
            self.send(method.clone(), url, extra).await?;
            let resp = self.response().await?;
            if resp.status() != StatusCode::Unauthorized {
                return Ok(resp);
            }
            if self.source.credentials().is_none() {
                return Err(Ended::Retry(
                    RtspError::Unauthorized(
                        "the camera wants credentials and none were given".into(),
                    ),
                    false,
                ));
            }
            let challenge = resp
                .header(&headers::WWW_AUTHENTICATE)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default();
            if attempt == 1 {
                break;
            }
            self.auth = Some(
                http_auth::PasswordClient::try_from(challenge.as_str()).map_err(|e| {
                    session_err(format!("cannot answer the camera's WWW-Authenticate: {e}"))
                })?,
            );
        }
        Err(Ended::Retry(
            RtspError::Unauthorized(format!("{method:?} answered 401")),
            false,
        ))
    }

    async fn send(
        &mut self,
        method: Method,
        url: &url::Url,
        extra: &[(HeaderName, String)],
    ) -> Result<(), Ended> {
        self.cseq += 1;
        let mut req = Request::builder(method.clone(), Version::V1_0)
            .request_uri(url.clone())
            .header(headers::CSEQ, self.cseq.to_string())
            .header(headers::USER_AGENT, "call-assist".to_owned());
        for (name, value) in extra {
            req = req.header(name.clone(), value.clone());
        }
        if let Some(s) = &self.session {
            req = req.header(headers::SESSION, s.clone());
        }
        if let (Some(auth), Some((user, password))) = (&mut self.auth, self.source.credentials()) {
            let method_str: &str = (&method).into();
            let value = auth
                .respond(&http_auth::PasswordParams {
                    username: user,
                    password,
                    uri: url.as_str(),
                    method: method_str,
                    body: Some(&[]),
                })
                .map_err(|e| session_err(format!("cannot authenticate: {e}")))?;
            req = req.header(headers::AUTHORIZATION, value);
        }
        let req: Request<Vec<u8>> = req.build(Vec::new());
        let mut bytes = Vec::new();
        req.write(&mut bytes)
            .map_err(|e| session_err(format!("cannot write the request: {e}")))?;
        self.write(&bytes).await
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), Ended> {
        let stream = &mut self.stream;
        async { Some(stream.write_all(bytes).await) }
            .or(async {
                smol::Timer::after(WRITE_TIMEOUT).await;
                None
            })
            .await
            .ok_or_else(|| session_err("the camera takes no data"))?
            .map_err(|e| session_err(format!("writing to the camera: {e}")))
    }

    /// The next complete message in `buf`, if any.
    fn parse_one(&mut self) -> Result<Option<Message<Vec<u8>>>, Ended> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        match Message::<Vec<u8>>::parse(&self.buf) {
            Ok((msg, used)) => {
                self.buf.drain(..used);
                Ok(Some(msg))
            }
            Err(rtsp_types::ParseError::Incomplete(_)) if self.buf.len() < MAX_MESSAGE => Ok(None),
            Err(rtsp_types::ParseError::Incomplete(_)) => {
                Err(session_err("the camera sent an oversized RTSP message"))
            }
            Err(rtsp_types::ParseError::Error) => {
                Err(session_err("the camera sent something that is not RTSP"))
            }
        }
    }

    /// Reads more from the camera; `Err` on end of stream.
    async fn fill(&mut self) -> Result<(), Ended> {
        let mut chunk = [0u8; 4096];
        let n = self
            .stream
            .read(&mut chunk)
            .await
            .map_err(|e| session_err(format!("reading from the camera: {e}")))?;
        if n == 0 {
            return Err(session_err("the camera closed the connection"));
        }
        self.buf
            .extend_from_slice(chunk.get(..n).unwrap_or_default());
        Ok(())
    }

    /// The next response (interleaved data and requests from the camera are skipped).
    async fn response(&mut self) -> Result<Response<Vec<u8>>, Ended> {
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        loop {
            while let Some(msg) = self.parse_one()? {
                if let Message::Response(r) = msg {
                    return Ok(r);
                }
            }
            async { Some(self.fill().await) }
                .or(async {
                    smol::Timer::at(deadline).await;
                    None
                })
                .await
                .ok_or_else(|| session_err("the camera did not answer within 5 s"))??;
        }
    }
}

/// An RTP socket on an even port and the RTCP socket on the next one (RFC 3550's pair:
/// GStreamer's server, for one, drops a backchannel sent from any other pair).
async fn bind_udp_pair(
    ip: std::net::IpAddr,
) -> Result<(smol::net::UdpSocket, smol::net::UdpSocket), Ended> {
    for _ in 0..32 {
        let rtp = smol::net::UdpSocket::bind((ip, 0))
            .await
            .map_err(|e| session_err(format!("binding a UDP socket: {e}")))?;
        let port = rtp.local_addr().map(|a| a.port()).unwrap_or(1);
        if port % 2 != 0 || port == u16::MAX {
            continue;
        }
        if let Ok(rtcp) = smol::net::UdpSocket::bind((ip, port + 1)).await {
            return Ok((rtp, rtcp));
        }
    }
    Err(session_err("no free even/odd UDP port pair"))
}

fn require() -> (HeaderName, String) {
    (headers::REQUIRE, BACKCHANNEL_TAG.to_owned())
}

fn check(resp: &Response<Vec<u8>>, what: &str) -> Result<(), Ended> {
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let code = u16::from(status);
    let msg = format!("{what}: {code} {}", resp.reason_phrase());
    // 551 Option not supported: the camera has no backchannel at all.
    if code == 551 || code == 405 || code == 501 {
        Err(Ended::Permanent(msg))
    } else {
        Err(session_err(msg))
    }
}

/// One session: connect, DESCRIBE, SETUP, PLAY, then packets until it fails.
async fn session(
    source: &RtspSource,
    rx: &Receiver<TalkbackPacket>,
    events: &Sender<TalkbackEvent>,
    rtp: &mut RtpState,
) -> Ended {
    match session_inner(source, rx, events, rtp).await {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

async fn session_inner(
    source: &RtspSource,
    rx: &Receiver<TalkbackPacket>,
    events: &Sender<TalkbackEvent>,
    rtp: &mut RtpState,
) -> Result<std::convert::Infallible, Ended> {
    let url = source.url();
    let host = url.host_str().unwrap_or_default().to_owned();
    let port = url.port().unwrap_or(554);
    let stream = async { Some(TcpStream::connect((host.as_str(), port)).await) }
        .or(async {
            smol::Timer::after(REQUEST_TIMEOUT).await;
            None
        })
        .await
        .ok_or_else(|| session_err("connecting timed out"))?
        .map_err(|e| session_err(format!("connecting: {e}")))?;
    let _ = stream.set_nodelay(true);
    let mut c = Conn {
        stream,
        buf: Vec::new(),
        cseq: 0,
        source,
        auth: None,
        session: None,
    };
    let described = c
        .request(
            Method::Describe,
            url,
            &[(headers::ACCEPT, "application/sdp".to_owned()), require()],
        )
        .await?;
    check(&described, "DESCRIBE")?;
    let base = described
        .header(&headers::CONTENT_BASE)
        .or_else(|| described.header(&headers::CONTENT_LOCATION))
        .and_then(|v| url::Url::parse(v.as_str()).ok())
        .unwrap_or_else(|| url.clone());
    // Relative controls resolve below the base, as RTSP servers mean them.
    let mut dir = base.clone();
    if !dir.path().ends_with('/') {
        dir.set_path(&format!("{}/", dir.path()));
    }
    let bc = find_backchannel(described.body(), &dir).map_err(Ended::Permanent)?;
    debug!(camera = %source, codec = ?bc.codec, pt = bc.pt, "talkback: backchannel found");
    // UDP: one socket for RTP and one for RTCP (RTSP asks for the pair), bound like the
    // RTSP connection's local address.
    let udp = match source.transport {
        RtspTransport::Tcp => None,
        RtspTransport::Udp => {
            let local = c
                .stream
                .local_addr()
                .map_err(|e| session_err(format!("local address: {e}")))?;
            Some(bind_udp_pair(local.ip()).await?)
        }
    };
    let transport = match &udp {
        None => "RTP/AVP/TCP;unicast;interleaved=0-1".to_owned(),
        Some((rtp_sock, rtcp_sock)) => {
            let port = |s: &smol::net::UdpSocket| s.local_addr().map(|a| a.port()).unwrap_or(0);
            format!(
                "RTP/AVP;unicast;client_port={}-{}",
                port(rtp_sock),
                port(rtcp_sock)
            )
        }
    };
    let setup = c
        .request(
            Method::Setup,
            &bc.control,
            &[(headers::TRANSPORT, transport), require()],
        )
        .await?;
    check(&setup, "SETUP")?;
    let sess = setup
        .typed_header::<headers::Session>()
        .ok()
        .flatten()
        .ok_or_else(|| session_err("SETUP answered without a Session"))?;
    let answered = setup
        .typed_header::<headers::Transports>()
        .ok()
        .flatten()
        .and_then(|ts| {
            ts.iter().find_map(|t| match t {
                headers::transport::Transport::Rtp(r) => Some(r.params.clone()),
                _ => None,
            })
        });
    let channel = answered
        .as_ref()
        .and_then(|p| p.interleaved)
        .map_or(0, |i| i.0);
    // Where our UDP packets go: the camera's address and its server_port.
    let udp_dest = match &udp {
        None => None,
        Some((sock, _)) => {
            let port = answered
                .as_ref()
                .and_then(|p| p.server_port)
                .map(|p| p.0)
                .ok_or_else(|| session_err("SETUP over UDP answered without server_port"))?;
            let peer = c
                .stream
                .peer_addr()
                .map_err(|e| session_err(format!("the camera's address: {e}")))?;
            Some((sock, std::net::SocketAddr::new(peer.ip(), port)))
        }
    };
    let timeout_s = sess.1.unwrap_or(DEFAULT_SESSION_TIMEOUT_S).max(2);
    c.session = Some(sess.0.clone());
    let played = c.request(Method::Play, &base, &[require()]).await?;
    check(&played, "PLAY")?;
    info!(camera = %source, codec = ?bc.codec, "talkback: the camera's speaker is ready");
    rtp.new_session();
    while rx.try_recv().is_ok() {}
    if events
        .send(TalkbackEvent::Ready { codec: bc.codec })
        .await
        .is_err()
    {
        return Err(Ended::Closed);
    }
    let keepalive = Duration::from_secs(timeout_s / 2);
    let mut keepalive_at = Instant::now() + keepalive;
    let mut sent = false;
    let retry = |e: Ended, sent: bool| match e {
        Ended::Retry(err, _) => Ended::Retry(err, sent),
        other => other,
    };
    enum Next {
        Packet(Option<TalkbackPacket>),
        Read(Result<(), Ended>),
        Keepalive,
    }
    loop {
        let next = async { Next::Packet(rx.recv().await.ok()) }
            .or(async { Next::Read(c.fill().await) })
            .or(async {
                smol::Timer::at(keepalive_at).await;
                Next::Keepalive
            })
            .await;
        match next {
            Next::Packet(None) => return Err(Ended::Closed),
            Next::Packet(Some(p)) => {
                let pkt = rtp.packet(&p, bc.pt);
                if let Some((sock, dest)) = udp_dest {
                    // A datagram the kernel refuses (no route for a moment) is a lost packet.
                    if let Err(e) = sock.send_to(&pkt, dest).await {
                        debug!(camera = %source, "talkback: UDP send: {e}");
                    }
                    sent = true;
                    continue;
                }
                let len = u16::try_from(pkt.len()).unwrap_or(u16::MAX);
                let mut frame = Vec::with_capacity(4 + pkt.len());
                frame.push(b'$');
                frame.push(channel);
                frame.extend_from_slice(&len.to_be_bytes());
                frame.extend_from_slice(&pkt);
                c.write(&frame).await.map_err(|e| retry(e, sent))?;
                sent = true;
            }
            Next::Read(r) => {
                r.map_err(|e| retry(e, sent))?;
                // RTCP and keepalive answers: read so the camera never blocks on us.
                while c.parse_one().map_err(|e| retry(e, sent))?.is_some() {}
            }
            Next::Keepalive => {
                keepalive_at = Instant::now() + keepalive;
                c.send(Method::GetParameter, &base, &[])
                    .await
                    .map_err(|e| retry(e, sent))?;
            }
        }
    }
}

/// Keeps a station's talkback queue: counts what a full queue drops.
#[derive(Debug)]
pub struct TalkbackSender {
    tx: Sender<TalkbackPacket>,
    pub sent: u64,
    pub dropped: u64,
}

impl TalkbackSender {
    pub fn new(tx: Sender<TalkbackPacket>) -> Self {
        TalkbackSender {
            tx,
            sent: 0,
            dropped: 0,
        }
    }

    /// Queues `p` for the camera without waiting.
    pub fn send(&mut self, p: TalkbackPacket) {
        match self.tx.try_send(p) {
            Ok(()) => self.sent += 1,
            Err(TrySendError::Full(_)) => {
                self.dropped += 1;
                if self.dropped % 100 == 1 {
                    warn!(
                        dropped = self.dropped,
                        "talkback: the camera is behind; packets dropped"
                    );
                }
            }
            Err(TrySendError::Closed(_)) => self.dropped += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONVIF_SDP: &str = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=x\r\nt=0 0\r\na=control:*\r\n\
        m=video 0 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\na=control:stream=0\r\na=recvonly\r\n\
        m=audio 0 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=control:stream=1\r\na=recvonly\r\n\
        m=audio 0 RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\na=control:stream=2\r\na=sendonly\r\n";

    #[test]
    fn the_sendonly_audio_stream_is_the_backchannel() {
        let base = url::Url::parse("rtsp://127.0.0.1:8554/cam/").unwrap();
        let bc = find_backchannel(ONVIF_SDP.as_bytes(), &base).unwrap();
        assert_eq!(bc.codec, Codec::Pcma);
        assert_eq!(bc.pt, 8);
        assert_eq!(bc.control.as_str(), "rtsp://127.0.0.1:8554/cam/stream=2");
    }

    #[test]
    fn a_camera_without_a_g711_speaker_is_reported_not_retried() {
        let base = url::Url::parse("rtsp://h/cam/").unwrap();
        let none = ONVIF_SDP.replace("a=sendonly", "a=recvonly");
        let e = find_backchannel(none.as_bytes(), &base).unwrap_err();
        assert!(e.contains("no backchannel"), "{e}");
        let aac = ONVIF_SDP.replace(
            "RTP/AVP 8\r\na=rtpmap:8 PCMA/8000",
            "RTP/AVP 97\r\na=rtpmap:97 MPEG4-GENERIC/16000",
        );
        let e = find_backchannel(aac.as_bytes(), &base).unwrap_err();
        assert!(e.contains("MPEG4-GENERIC"), "{e}");
        assert!(find_backchannel(b"garbage", &base).is_err());
    }

    #[test]
    fn rtp_is_our_own_timeline_continuous_across_speakers() {
        let mut r = RtpState::new();
        let p = |rtp_time, restart| TalkbackPacket {
            data: vec![0xff; 160],
            rtp_time,
            restart,
        };
        let a = r.packet(&p(1000, true), 0);
        let b = r.packet(&p(1160, false), 0);
        let ts = |pkt: &[u8]| u32::from_be_bytes(pkt[4..8].try_into().unwrap());
        let seq = |pkt: &[u8]| u16::from_be_bytes(pkt[2..4].try_into().unwrap());
        assert_eq!(a.len(), 12 + 160);
        assert_eq!(
            (a[0], a[1], b[1]),
            (0x80, 0x80, 0x00),
            "marker on the first only"
        );
        assert_eq!(ts(&b).wrapping_sub(ts(&a)), 160);
        assert_eq!(seq(&b), seq(&a).wrapping_add(1));
        // Another call's timeline (far away, or backwards) continues ours, with a marker.
        let c = r.packet(&p(5, false), 0);
        assert_eq!(ts(&c).wrapping_sub(ts(&b)), 160);
        assert_eq!(c[1], 0x80);
        let d = r.packet(&p(900_000, true), 8);
        assert_eq!(ts(&d).wrapping_sub(ts(&c)), 160);
        assert_eq!(d[1], 0x88);
    }

    /// RTP packets per session, and the request lines.
    type Heard = (Vec<Vec<Vec<u8>>>, Vec<String>);

    /// A scripted ONVIF camera: answers Basic auth, DESCRIBE, SETUP and PLAY, reads
    /// `packets` interleaved RTP packets per session, then hangs up; `sessions` times. Returns
    /// the RTP packets received, per session, and every request line.
    fn scripted_camera(sessions: usize, packets: usize) -> (u16, std::thread::JoinHandle<Heard>) {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let handle = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut requests = Vec::new();
            for _ in 0..sessions {
                let (stream, _) = listener.accept().unwrap();
                let mut r = BufReader::new(stream.try_clone().unwrap());
                let mut w = stream;
                let mut rtp = Vec::new();
                while rtp.len() < packets {
                    let mut first = [0u8; 1];
                    if r.read_exact(&mut first).is_err() {
                        panic!("the client hung up after {requests:?}");
                    }
                    if first[0] == b'$' {
                        let mut head = [0u8; 3];
                        r.read_exact(&mut head).unwrap();
                        assert_eq!(head[0], 0, "RTP on the channel SETUP gave");
                        let mut pkt =
                            vec![0u8; usize::from(u16::from_be_bytes([head[1], head[2]]))];
                        r.read_exact(&mut pkt).unwrap();
                        rtp.push(pkt);
                        continue;
                    }
                    let mut head = vec![first[0]];
                    loop {
                        let mut line = String::new();
                        r.read_line(&mut line).unwrap();
                        head.extend_from_slice(line.as_bytes());
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let head = String::from_utf8(head).unwrap();
                    let line0 = head.lines().next().unwrap().to_owned();
                    let cseq = head
                        .lines()
                        .find_map(|l| l.strip_prefix("CSeq: "))
                        .unwrap()
                        .to_owned();
                    requests.push(line0.clone());
                    // "cam:pw" in Basic.
                    let authed = head.contains("Authorization: Basic Y2FtOnB3");
                    let answer = if !authed {
                        "RTSP/1.0 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"cam\"\r\n"
                            .to_owned()
                    } else if line0.starts_with("DESCRIBE") {
                        assert!(
                            head.contains("Require: www.onvif.org/ver20/backchannel"),
                            "{head}"
                        );
                        let sdp = ONVIF_SDP.replace(
                            "RTP/AVP 8\r\na=rtpmap:8 PCMA/8000",
                            "RTP/AVP 0\r\na=rtpmap:0 PCMU/8000",
                        );
                        format!("RTSP/1.0 200 OK\r\nContent-Type: application/sdp\r\nContent-Base: rtsp://127.0.0.1:{port}/cam/\r\nContent-Length: {}\r\n\r\n{sdp}", sdp.len())
                    } else if line0.starts_with("SETUP") {
                        assert!(line0.contains("/cam/stream=2"), "{line0}");
                        assert!(head.contains("interleaved=0-1"), "{head}");
                        "RTSP/1.0 200 OK\r\nSession: abc;timeout=60\r\nTransport: RTP/AVP/TCP;unicast;interleaved=0-1\r\n".to_owned()
                    } else {
                        assert!(head.contains("Session: abc"), "{head}");
                        "RTSP/1.0 200 OK\r\nSession: abc\r\n".to_owned()
                    };
                    let answer = if answer.contains("\r\n\r\n") {
                        answer.replacen(
                            "RTSP/1.0 200 OK\r\n",
                            &format!("RTSP/1.0 200 OK\r\nCSeq: {cseq}\r\n"),
                            1,
                        )
                    } else {
                        let (status, rest) = answer.split_once("\r\n").unwrap();
                        format!("{status}\r\nCSeq: {cseq}\r\n{rest}\r\n")
                    };
                    w.write_all(answer.as_bytes()).unwrap();
                }
                got.push(rtp);
                // Hang up: the client must notice and come back.
            }
            (got, requests)
        });
        (port, handle)
    }

    #[test]
    fn a_backchannel_that_drops_comes_back_and_keeps_one_rtp_stream() {
        let (port, camera) = scripted_camera(2, 10);
        let source = RtspSource::parse(
            &format!("rtsp://cam:pw@127.0.0.1:{port}/cam"),
            crate::media::rtsp::RtspTransport::Tcp,
        )
        .unwrap();
        let (ev_tx, ev_rx) = smol::channel::bounded(16);
        let events = smol::block_on(async {
            let tx = spawn(source, ev_tx);
            let mut events = Vec::new();
            let mut rtp_time = 0u64;
            let feed = async {
                loop {
                    smol::Timer::after(Duration::from_millis(20)).await;
                    let _ = tx.try_send(TalkbackPacket {
                        data: vec![0xff; 160],
                        rtp_time,
                        restart: false,
                    });
                    rtp_time += 160;
                }
            };
            let collect = async {
                while events
                    .iter()
                    .filter(|e| matches!(e, TalkbackEvent::Ready { .. }))
                    .count()
                    < 2
                {
                    events.push(ev_rx.recv().await.unwrap());
                }
                // Packets flow until the camera has its second session's share.
                while !camera.is_finished() {
                    smol::Timer::after(Duration::from_millis(20)).await;
                }
            };
            collect
                .or(feed)
                .or(async {
                    smol::Timer::after(Duration::from_secs(10)).await;
                })
                .await;
            events
        });
        let kinds: Vec<String> = events
            .iter()
            .map(|e| match e {
                TalkbackEvent::Ready { codec } => format!("ready {codec:?}"),
                TalkbackEvent::Lost { .. } => "lost".into(),
                TalkbackEvent::Unavailable { .. } => "unavailable".into(),
            })
            .collect();
        assert_eq!(kinds, ["ready Pcmu", "lost", "ready Pcmu"], "{events:?}");
        let (sessions, requests) = camera.join().unwrap();
        assert_eq!(
            requests
                .iter()
                .filter(|r| r.starts_with("DESCRIBE"))
                .count(),
            4,
            "401 then DESCRIBE, twice: {requests:?}"
        );
        let all: Vec<&Vec<u8>> = sessions.iter().flatten().collect();
        assert_eq!(all.len(), 20);
        let ssrc = |p: &[u8]| p[8..12].to_vec();
        let seq = |p: &[u8]| u16::from_be_bytes([p[2], p[3]]);
        assert!(all
            .iter()
            .all(|p| ssrc(p) == ssrc(all[0]) && p[1] & 0x7f == 0));
        // One stream across the reconnect: sequence numbers follow on; the first packet of
        // each session carries the marker.
        for w in all.windows(2) {
            assert_eq!(seq(w[1]), seq(w[0]).wrapping_add(1));
        }
        assert_eq!(
            (sessions[0][0][1] & 0x80, sessions[1][0][1] & 0x80),
            (0x80, 0x80)
        );
    }
}
