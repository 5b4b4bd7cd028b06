//! The local control API: HTTP/1.1 served by hyper, one request per connection. A request
//! becomes a [`Command`] answered by the hub's loop through a reply channel, so the API never
//! touches the agent itself.
//!
//! hyper runs on smol's own sockets through hyper-util's `TokioIo` over `async_compat::Compat`,
//! its header timer is hyper-util's `TokioTimer` in the tokio context `Compat` already gives
//! reqwest: all of it is in the build for reqwest, while smol-hyper would be a new crate that
//! has had no release since 2023.
//!
//! Routes: `GET /health`, `GET /stations`, `GET /calls`, `POST /calls` (`{"station", "to"}`),
//! `GET /calls/ID`, `DELETE /calls/ID` (or `POST /calls/ID/hangup`),
//! `POST /calls/ID/keyframe` (ask the peer for a video keyframe), `POST /calls/ID/dtmf`
//! (`{"digits": "12#"}`: press DTMF digits in the call), `GET /events`
//! (Server-Sent Events, one `data:` JSON line per event). Errors are `{"error": "..."}`, except
//! hyper's own bodiless 400 and 431 for requests that are not HTTP or whose head is too large.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_compat::Compat;
use bytes::Bytes;
use call_assist_core::Secret;
use futures_lite::{AsyncRead, AsyncWrite, FutureExt, StreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited, StreamBody};
use hyper::body::{Body as _, Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use smol::channel::{Receiver, Sender};
use smol::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

/// Largest request head (request line and headers); a larger one is answered 431.
const MAX_HEAD: usize = 16 * 1024;
/// Request headers; more are answered 431.
const MAX_HEADERS: usize = 32;
/// Largest request body; a larger one is answered 413.
const MAX_BODY: usize = 64 * 1024;
/// Connections served at once (event streams included); more are answered 503 and closed.
const MAX_CONNECTIONS: usize = 64;
/// A client must send its whole request within this: a head that is late closes the
/// connection (hyper), a body that is late is answered 408.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The hub answers within this (a call to a user without a direct room waits for the room).
const REPLY_TIMEOUT: Duration = Duration::from_secs(90);
/// A write that makes no progress for this long ends the connection (a client that stopped
/// reading an event stream, above all).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// An event stream sends a comment line this often, so dead clients are noticed.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Events queued for one event-stream client; a client that falls this far behind is dropped.
pub const EVENT_QUEUE: usize = 256;

/// What a request asks of the hub.
#[derive(Debug)]
pub enum Command {
    Health,
    Stations,
    ListCalls,
    GetCall(String),
    StartCall {
        station: String,
        to: String,
    },
    Hangup(String),
    /// Ask the peer of a call for a video keyframe (PLI/FIR).
    RequestKeyframe(String),
    /// Keep a call's audio from the camera's speaker (`true`), or let it through again.
    Mute {
        id: String,
        muted: bool,
    },
    /// Press DTMF digits in a call.
    SendDtmf {
        id: String,
        digits: String,
    },
    Subscribe,
}

/// The hub's answer.
#[derive(Debug)]
pub enum Reply {
    Json(u16, Value),
    /// An event stream: each item is one JSON event.
    Events(Receiver<String>),
}

impl Reply {
    pub fn error(status: u16, message: impl Into<String>) -> Reply {
        Reply::Json(status, json!({ "error": message.into() }))
    }
}

/// A command and where its reply goes.
#[derive(Debug)]
pub struct Request {
    pub command: Command,
    pub reply: Sender<Reply>,
}

/// Accepts connections until the listener fails; each request reaches `hub` through `wrap`.
pub async fn serve<M: Send + 'static>(
    listener: TcpListener,
    token: Option<Secret>,
    hub: Sender<M>,
    wrap: fn(Request) -> M,
) {
    let token = Arc::new(token);
    let open = Arc::new(AtomicUsize::new(0));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        // The read buffer bounds the head: one not complete within it is answered 431.
        .max_buf_size(MAX_HEAD)
        .max_headers(MAX_HEADERS)
        // One request per connection: the connection limit and the timeouts count requests.
        .keep_alive(false);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("API: accept failed: {e}");
                smol::Timer::after(Duration::from_millis(100)).await;
                continue;
            }
        };
        debug!(%peer, "API connection");
        let deadline = Instant::now() + READ_TIMEOUT;
        let http = http.clone();
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::SeqCst);
            // Refused through hyper too, so the client reads a whole response; the header
            // timeout bounds how long a refused connection lives.
            smol::spawn(connection(http, stream, |_| async {
                error(503, "too many connections")
            }))
            .detach();
            continue;
        }
        let token = token.clone();
        let hub = hub.clone();
        let open = open.clone();
        smol::spawn(async move {
            let respond = move |req| answer(req, token.clone(), hub.clone(), wrap, deadline);
            connection(http, stream, respond).await;
            open.fetch_sub(1, Ordering::SeqCst);
        })
        .detach();
    }
}

/// The response bodies: JSON, or an event stream.
type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Serves one connection's request with `respond`.
async fn connection<F, R>(http: http1::Builder, stream: TcpStream, respond: F)
where
    F: Fn(hyper::Request<Incoming>) -> R + Send + 'static,
    R: Future<Output = Response<Body>> + Send + 'static,
{
    let io = TokioIo::new(Compat::new(WriteDeadline::new(stream, WRITE_TIMEOUT)));
    let service = service_fn(move |req| {
        let response = respond(req);
        async move { Ok::<_, Infallible>(response.await) }
    });
    // `Compat` is the tokio context for hyper's timer; the socket stays on smol's reactor.
    if let Err(e) = Compat::new(http.serve_connection(io, service)).await {
        debug!("API connection ended: {e}");
    }
}

/// Checks the token, reads the body, routes and asks the hub.
async fn answer<M>(
    req: hyper::Request<Incoming>,
    token: Arc<Option<Secret>>,
    hub: Sender<M>,
    wrap: fn(Request) -> M,
    deadline: Instant,
) -> Response<Body> {
    // Before the body, so a client without the token cannot make the hub's host read one.
    if let Some(t) = token.as_ref() {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|a| a.to_str().ok())
            .and_then(|a| a.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| same(g.as_bytes(), t.expose().as_bytes())) {
            let mut r = error(
                401,
                "missing or wrong bearer token (Authorization: Bearer <token>)",
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    let (head, body) = req.into_parts();
    let body = match read_body(body, deadline).await {
        Ok(b) => b,
        Err((status, message)) => return error(status, message),
    };
    let command = match route(head.method.as_str(), head.uri.path(), &body) {
        Ok(c) => c,
        Err((status, message, allow)) => {
            let mut r = error(status, message);
            if !allow.is_empty() {
                if let Ok(allow) = HeaderValue::from_str(&allow.join(", ")) {
                    r.headers_mut().insert(header::ALLOW, allow);
                }
            }
            return r;
        }
    };
    let (reply_tx, reply_rx) = smol::channel::bounded(1);
    let sent = hub
        .send(wrap(Request {
            command,
            reply: reply_tx,
        }))
        .await;
    if sent.is_err() {
        return error(503, "shutting down");
    }
    let reply = async { reply_rx.recv().await.ok() }
        .or(async {
            smol::Timer::after(REPLY_TIMEOUT).await;
            None
        })
        .await;
    match reply {
        Some(Reply::Json(status, body)) => json_response(status, &body),
        Some(Reply::Events(rx)) => event_stream(rx),
        None => error(503, "no answer from the hub"),
    }
}

/// Constant-time comparison (the token must not leak through timing).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a request could not be read: the status and message to answer with.
type HttpError = (u16, String);

/// The whole body, at most [`MAX_BODY`] bytes, by `deadline`.
async fn read_body(body: Incoming, deadline: Instant) -> Result<Bytes, HttpError> {
    let too_large = || (413, format!("body larger than {MAX_BODY} bytes"));
    // A declared length over the limit is refused before any of the body is read.
    if body.size_hint().lower() > MAX_BODY as u64 {
        return Err(too_large());
    }
    async {
        match Limited::new(body, MAX_BODY).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e) if e.is::<LengthLimitError>() => Err(too_large()),
            Err(e) => Err((400, format!("reading the body: {e}"))),
        }
    }
    .or(async {
        smol::Timer::at(deadline).await;
        Err((408, "request not received in time".to_owned()))
    })
    .await
}

/// A route error: status, message, and the methods the path allows (for 405).
type RouteError = (u16, String, Vec<&'static str>);

fn route(method: &str, path: &str, body: &[u8]) -> Result<Command, RouteError> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let wrong =
        |allow: Vec<&'static str>| Err((405, format!("{method} is not allowed on {path}"), allow));
    match segments.as_slice() {
        ["health"] => match method {
            "GET" => Ok(Command::Health),
            _ => wrong(vec!["GET"]),
        },
        ["stations"] => match method {
            "GET" => Ok(Command::Stations),
            _ => wrong(vec!["GET"]),
        },
        ["events"] => match method {
            "GET" => Ok(Command::Subscribe),
            _ => wrong(vec!["GET"]),
        },
        ["calls"] => match method {
            "GET" => Ok(Command::ListCalls),
            "POST" => start_call(body),
            _ => wrong(vec!["GET", "POST"]),
        },
        ["calls", id] => match method {
            "GET" => Ok(Command::GetCall((*id).to_owned())),
            "DELETE" => Ok(Command::Hangup((*id).to_owned())),
            _ => wrong(vec!["GET", "DELETE"]),
        },
        ["calls", id, "hangup"] => match method {
            "POST" => Ok(Command::Hangup((*id).to_owned())),
            _ => wrong(vec!["POST"]),
        },
        ["calls", id, "keyframe"] => match method {
            "POST" => Ok(Command::RequestKeyframe((*id).to_owned())),
            _ => wrong(vec!["POST"]),
        },
        ["calls", id, verb @ ("mute" | "unmute")] => match method {
            "POST" => Ok(Command::Mute {
                id: (*id).to_owned(),
                muted: *verb == "mute",
            }),
            _ => wrong(vec!["POST"]),
        },
        ["calls", id, "dtmf"] => match method {
            "POST" => send_dtmf(id, body),
            _ => wrong(vec!["POST"]),
        },
        _ => Err((404, format!("no such endpoint: {path}"), Vec::new())),
    }
}

/// `{"digits": "12#"}`; the digits themselves are checked by the agent (400 from the hub).
fn send_dtmf(id: &str, body: &[u8]) -> Result<Command, RouteError> {
    let bad = |e: String| {
        (
            400,
            format!("the body must be JSON like {{\"digits\": \"12#\"}}{e}"),
            Vec::new(),
        )
    };
    let v: Value = serde_json::from_slice(body).map_err(|e| bad(format!(": {e}")))?;
    let digits = v
        .get("digits")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(String::new()))?;
    Ok(Command::SendDtmf {
        id: id.to_owned(),
        digits: digits.to_owned(),
    })
}

fn start_call(body: &[u8]) -> Result<Command, RouteError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        (
            400,
            format!("the body must be JSON like {{\"station\": \"door\", \"to\": \"@me:example.org\"}}: {e}"),
            Vec::new(),
        )
    })?;
    let field = |k: &str| -> Result<String, RouteError> {
        v.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| (400, format!("{k:?} (a string) is required"), Vec::new()))
    };
    Ok(Command::StartCall {
        station: field("station")?,
        to: field("to")?,
    })
}

fn json_response(status: u16, body: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{body}\n"))).boxed_unsync());
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = r.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn error(status: u16, message: impl Into<String>) -> Response<Body> {
    json_response(status, &json!({ "error": message.into() }))
}

/// `text/event-stream`: one `data:` line per event, a comment every [`KEEPALIVE`]; ends when
/// the hub drops the stream, or when a write fails (the client went away or stopped reading).
fn event_stream(rx: Receiver<String>) -> Response<Body> {
    let greeting = futures_lite::stream::once(Bytes::from_static(b": call-assist events\n\n"));
    let events = futures_lite::stream::unfold(rx, |rx| async move {
        let next = async { Some(rx.recv().await) }
            .or(async {
                smol::Timer::after(KEEPALIVE).await;
                None
            })
            .await;
        let chunk = match next {
            Some(Ok(event)) => format!("data: {event}\n\n"),
            Some(Err(_)) => return None,
            None => ": keepalive\n\n".to_owned(),
        };
        Some((Bytes::from(chunk), rx))
    });
    let frames = greeting.chain(events).map(|b| Ok(Frame::data(b)));
    let mut r = Response::new(StreamBody::new(frames).boxed_unsync());
    let headers = r.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// smol's TCP stream whose writes fail once stalled for `limit`, so a client that stops
/// reading cannot hold its connection forever (hyper itself has no write timeout).
struct WriteDeadline {
    stream: TcpStream,
    limit: Duration,
    /// Armed while a write waits for the client.
    stall: Option<smol::Timer>,
}

impl WriteDeadline {
    fn new(stream: TcpStream, limit: Duration) -> WriteDeadline {
        WriteDeadline {
            stream,
            limit,
            stall: None,
        }
    }

    fn bounded<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stall = None;
            return poll;
        }
        let limit = self.limit;
        let timer = self.stall.get_or_insert_with(|| smol::Timer::after(limit));
        if Pin::new(timer).poll(cx).is_pending() {
            return Poll::Pending;
        }
        // A fired timer never fires again: the next stall gets a fresh one.
        self.stall = None;
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client stopped reading",
        )))
    }
}

impl AsyncRead for WriteDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteDeadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.bounded(cx, poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.stream).poll_flush(cx);
        self.bounded(cx, poll)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    use std::net::SocketAddr;

    /// A hub that answers `/health`, echoes `POST /calls` and streams one event.
    async fn fake_hub(requests: Receiver<Request>) {
        while let Ok(r) = requests.recv().await {
            let reply = match r.command {
                Command::Health => Reply::Json(200, json!({"status": "ok"})),
                Command::StartCall { station, to } => {
                    Reply::Json(201, json!({"station": station, "to": to}))
                }
                Command::Subscribe => {
                    let (tx, rx) = smol::channel::bounded(EVENT_QUEUE);
                    let _ = tx.try_send(json!({"event": "hello"}).to_string());
                    Reply::Events(rx)
                }
                _ => Reply::error(404, "not in this test"),
            };
            let _ = r.reply.try_send(reply);
        }
    }

    /// An API with `token` on a loopback port, answered by [`fake_hub`].
    async fn start(token: Option<&str>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = smol::channel::bounded(8);
        smol::spawn(fake_hub(rx)).detach();
        smol::spawn(serve(listener, token.map(Secret::new), tx, |r| r)).detach();
        addr
    }

    /// Sends `request` as it is and reads the response until the server closes.
    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut raw = Vec::new();
        async { s.read_to_end(&mut raw).await.map(|_| ()) }
            .or(async {
                smol::Timer::after(Duration::from_secs(5)).await;
                Err(io::ErrorKind::TimedOut.into())
            })
            .await
            .unwrap();
        String::from_utf8_lossy(&raw).into_owned()
    }

    fn status(response: &str) -> u16 {
        response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {response:?}"))
    }

    #[test]
    fn a_start_call_request_routes() {
        let body = br#"{"station":"door","to":"@me:example.org"}"#;
        assert!(
            matches!(route("POST", "/calls", body), Ok(Command::StartCall { station, to }) if station == "door" && to == "@me:example.org")
        );
    }

    #[test]
    fn paths_methods_and_bodies_are_checked() {
        assert_eq!(route("GET", "/nope", b"").unwrap_err().0, 404);
        let e = route("PUT", "/calls", b"").unwrap_err();
        assert_eq!((e.0, e.2), (405, vec!["GET", "POST"]));
        assert_eq!(route("POST", "/calls", b"").unwrap_err().0, 400);
        let e = route("POST", "/calls", br#"{"station":"door"}"#).unwrap_err();
        assert!(e.1.contains("\"to\""), "{}", e.1);
        assert!(
            matches!(route("DELETE", "/calls/abc", b""), Ok(Command::Hangup(id)) if id == "abc")
        );
        assert!(
            matches!(route("POST", "/calls/abc/keyframe", b""), Ok(Command::RequestKeyframe(id)) if id == "abc")
        );
        assert_eq!(route("GET", "/calls/abc/keyframe", b"").unwrap_err().0, 405);
        assert!(
            matches!(route("POST", "/calls/abc/dtmf", br#"{"digits":"12#"}"#), Ok(Command::SendDtmf { id, digits }) if id == "abc" && digits == "12#")
        );
        let e = route("POST", "/calls/abc/dtmf", br#"{"digit":"1"}"#).unwrap_err();
        assert!(e.0 == 400 && e.1.contains(r#"{"digits": "12#"}"#), "{e:?}");
        assert_eq!(route("POST", "/calls/abc/dtmf", b"12#").unwrap_err().0, 400);
        assert_eq!(route("GET", "/calls/abc/dtmf", b"").unwrap_err().0, 405);
        assert!(
            matches!(route("POST", "/calls/abc/mute", b""), Ok(Command::Mute { id, muted: true }) if id == "abc")
        );
        assert!(
            matches!(route("POST", "/calls/abc/unmute", b""), Ok(Command::Mute { id, muted: false }) if id == "abc")
        );
        assert_eq!(route("GET", "/calls/abc/mute", b"").unwrap_err().0, 405);
        assert!(matches!(
            route("GET", "/calls/", b""),
            Ok(Command::ListCalls)
        ));
    }

    #[test]
    fn requests_are_answered_in_json_over_http() {
        smol::block_on(async {
            let addr = start(None).await;
            let r = exchange(addr, b"GET /health?verbose=1 HTTP/1.1\r\nHost: x\r\n\r\n").await;
            assert_eq!(status(&r), 200, "{r}");
            let lower = r.to_ascii_lowercase();
            assert!(lower.contains("content-type: application/json"), "{r}");
            assert!(lower.contains("connection: close"), "{r}");
            assert!(r.ends_with("{\"status\":\"ok\"}\n"), "{r}");

            let body = r#"{"station":"door","to":"@me:example.org"}"#;
            let req = format!(
                "POST /calls HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let r = exchange(addr, req.as_bytes()).await;
            assert_eq!(status(&r), 201, "{r}");
            assert!(r.contains(r#""to":"@me:example.org""#), "{r}");

            let r = exchange(addr, b"PUT /calls HTTP/1.1\r\nHost: x\r\n\r\n").await;
            assert_eq!(status(&r), 405, "{r}");
            assert!(r.to_ascii_lowercase().contains("allow: get, post"), "{r}");
            assert!(
                r.contains(r#"{"error":"PUT is not allowed on /calls"}"#),
                "{r}"
            );
        });
    }

    #[test]
    fn heads_and_bodies_are_bounded() {
        smol::block_on(async {
            let addr = start(None).await;
            let r = exchange(addr, b"\x01\x02 / HTTP/1.1\r\n\r\n").await;
            assert_eq!(status(&r), 400, "{r}");

            let big_head = format!(
                "GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
                "a".repeat(MAX_HEAD)
            );
            assert_eq!(status(&exchange(addr, big_head.as_bytes()).await), 431);
            let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
            let many = format!("GET /health HTTP/1.1\r\n{many}\r\n");
            assert_eq!(status(&exchange(addr, many.as_bytes()).await), 431);

            // Refused on the declared length, before the body is sent.
            let declared = format!(
                "POST /calls HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                MAX_BODY + 1
            );
            let r = exchange(addr, declared.as_bytes()).await;
            assert_eq!(status(&r), 413, "{r}");
            assert!(r.contains("body larger than"), "{r}");

            // A chunked body has no declared length: the limit counts what arrives.
            let chunk = "a".repeat(1024);
            let chunks: String = (0..=MAX_BODY / 1024)
                .map(|_| format!("400\r\n{chunk}\r\n"))
                .collect();
            let chunked = format!(
                "POST /calls HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{chunks}0\r\n\r\n"
            );
            assert_eq!(status(&exchange(addr, chunked.as_bytes()).await), 413);
        });
    }

    #[test]
    fn the_token_is_required_when_set() {
        smol::block_on(async {
            let addr = start(Some("s3cret")).await;
            for auth in [
                "",
                "Authorization: Bearer s3cre\r\n",
                "Authorization: s3cret\r\n",
            ] {
                let req = format!("GET /health HTTP/1.1\r\nHost: x\r\n{auth}\r\n");
                let r = exchange(addr, req.as_bytes()).await;
                assert_eq!(status(&r), 401, "{auth:?}: {r}");
                assert!(
                    r.to_ascii_lowercase().contains("www-authenticate: bearer"),
                    "{r}"
                );
                assert!(r.contains("bearer token"), "{r}");
            }
            let ok = b"GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n\r\n";
            assert_eq!(status(&exchange(addr, ok).await), 200);
        });
    }

    #[test]
    fn events_stream_as_server_sent_events() {
        smol::block_on(async {
            let addr = start(None).await;
            // The fake hub drops its sender at once, so the stream ends after one event.
            let r = exchange(addr, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n").await;
            assert_eq!(status(&r), 200, "{r}");
            assert!(
                r.to_ascii_lowercase()
                    .contains("content-type: text/event-stream"),
                "{r}"
            );
            assert!(r.contains(": call-assist events\n\n"), "{r}");
            assert!(r.contains("data: {\"event\":\"hello\"}\n\n"), "{r}");
        });
    }

    #[test]
    fn connections_beyond_the_limit_are_refused() {
        smol::block_on(async {
            let addr = start(None).await;
            let mut idle = Vec::new();
            for _ in 0..MAX_CONNECTIONS {
                idle.push(TcpStream::connect(addr).await.unwrap());
            }
            let r = exchange(addr, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
            assert_eq!(status(&r), 503, "{r}");
            assert!(r.contains("too many connections"), "{r}");
            drop(idle);
        });
    }

    #[test]
    fn a_write_the_client_does_not_read_times_out() {
        smol::block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let client = TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            let (stream, _) = listener.accept().await.unwrap();
            let mut w = WriteDeadline::new(stream, Duration::from_millis(200));
            let chunk = vec![0u8; 64 * 1024];
            let fail = async {
                loop {
                    if let Err(e) = w.write_all(&chunk).await {
                        return e.kind();
                    }
                }
            }
            .or(async {
                smol::Timer::after(Duration::from_secs(10)).await;
                io::ErrorKind::Other
            })
            .await;
            assert_eq!(fail, io::ErrorKind::TimedOut);
            drop(client);
        });
    }

    #[test]
    fn tokens_compare_exactly() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
    }
}
