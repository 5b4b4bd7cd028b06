//! The local control API: a small HTTP/1.1 server on smol's TCP listener, one request per
//! connection. Requests are parsed with `httparse` (already in the build through reqwest's
//! hyper), turned into a [`Command`] and answered by the hub's loop through a reply channel,
//! so the API never touches the agent itself.
//!
//! Routes: `GET /health`, `GET /stations`, `GET /calls`, `POST /calls` (`{"station", "to"}`),
//! `GET /calls/ID`, `DELETE /calls/ID` (or `POST /calls/ID/hangup`),
//! `POST /calls/ID/keyframe` (ask the peer for a video keyframe), `GET /events`
//! (Server-Sent Events, one `data:` JSON line per event). Errors are `{"error": "..."}`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use call_assist_core::Secret;
use futures_lite::{AsyncReadExt, AsyncWriteExt, FutureExt};
use serde_json::{json, Value};
use smol::channel::{Receiver, Sender};
use smol::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

/// Largest request head (request line and headers).
const MAX_HEAD: usize = 16 * 1024;
/// Largest request body.
const MAX_BODY: usize = 64 * 1024;
/// Connections served at once (event streams included); more are answered 503 and closed.
const MAX_CONNECTIONS: usize = 64;
/// A client must send its whole request within this.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The hub answers within this (a call to a user without a direct room waits for the room).
const REPLY_TIMEOUT: Duration = Duration::from_secs(90);
/// An event-stream write that takes longer than this ends the stream.
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
    loop {
        let (mut stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("API: accept failed: {e}");
                smol::Timer::after(Duration::from_millis(100)).await;
                continue;
            }
        };
        debug!(%peer, "API connection");
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::SeqCst);
            smol::spawn(async move {
                let _ = write_json(
                    &mut stream,
                    503,
                    &json!({"error": "too many connections"}),
                    &[],
                )
                .await;
            })
            .detach();
            continue;
        }
        let token = token.clone();
        let hub = hub.clone();
        let open = open.clone();
        smol::spawn(async move {
            connection(stream, &token, hub, wrap).await;
            open.fetch_sub(1, Ordering::SeqCst);
        })
        .detach();
    }
}

/// One parsed request.
#[derive(Debug, PartialEq, Eq)]
struct Http {
    method: String,
    path: String,
    authorization: Option<String>,
    body: Vec<u8>,
}

/// Why a request could not be read: the status and message to answer with.
type HttpError = (u16, String);

async fn connection<M>(
    mut stream: TcpStream,
    token: &Option<Secret>,
    hub: Sender<M>,
    wrap: fn(Request) -> M,
) {
    let request = read_request(&mut stream)
        .or(async {
            smol::Timer::after(READ_TIMEOUT).await;
            Err((408, "request not received in time".to_owned()))
        })
        .await;
    let request = match request {
        Ok(r) => r,
        Err((status, message)) => {
            let _ = write_json(&mut stream, status, &json!({ "error": message }), &[]).await;
            return;
        }
    };
    if let Some(t) = token {
        let given = request
            .authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| same(g.as_bytes(), t.expose().as_bytes())) {
            let _ = write_json(
                &mut stream,
                401,
                &json!({"error": "missing or wrong bearer token (Authorization: Bearer <token>)"}),
                &[("WWW-Authenticate", "Bearer")],
            )
            .await;
            return;
        }
    }
    let command = match route(&request) {
        Ok(c) => c,
        Err((status, message, allow)) => {
            let extra: Vec<(&str, &str)> = allow.iter().map(|a| ("Allow", *a)).collect();
            let _ = write_json(&mut stream, status, &json!({ "error": message }), &extra).await;
            return;
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
        let _ = write_json(&mut stream, 503, &json!({"error": "shutting down"}), &[]).await;
        return;
    }
    let reply = async { reply_rx.recv().await.ok() }
        .or(async {
            smol::Timer::after(REPLY_TIMEOUT).await;
            None
        })
        .await;
    match reply {
        Some(Reply::Json(status, body)) => {
            let _ = write_json(&mut stream, status, &body, &[]).await;
        }
        Some(Reply::Events(rx)) => event_stream(stream, rx).await,
        None => {
            let _ = write_json(
                &mut stream,
                503,
                &json!({"error": "no answer from the hub"}),
                &[],
            )
            .await;
        }
    }
}

/// Constant-time comparison (the token must not leak through timing).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn read_request(stream: &mut TcpStream) -> Result<Http, HttpError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| (400, format!("reading the request: {e}")))?;
        if n == 0 {
            return Err((
                400,
                "connection closed before the request was complete".into(),
            ));
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        match parse_head(&buf)? {
            Some((mut http, head_len, content_length)) => {
                if content_length > MAX_BODY {
                    return Err((413, format!("body larger than {MAX_BODY} bytes")));
                }
                let mut body = buf.get(head_len..).unwrap_or_default().to_vec();
                while body.len() < content_length {
                    let n = stream
                        .read(&mut chunk)
                        .await
                        .map_err(|e| (400, format!("reading the body: {e}")))?;
                    if n == 0 {
                        return Err((400, "connection closed before the body was complete".into()));
                    }
                    body.extend_from_slice(chunk.get(..n).unwrap_or_default());
                }
                body.truncate(content_length);
                http.body = body;
                return Ok(http);
            }
            None if buf.len() > MAX_HEAD => {
                return Err((431, format!("request head larger than {MAX_HEAD} bytes")))
            }
            None => {}
        }
    }
}

/// The request head in `buf`, when complete: the request, the head's length and the body's.
fn parse_head(buf: &[u8]) -> Result<Option<(Http, usize, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err((400, format!("malformed request: {e}"))),
    };
    let mut authorization = None;
    let mut content_length = 0usize;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("authorization") {
            authorization = Some(String::from_utf8_lossy(h.value).into_owned());
        } else if h.name.eq_ignore_ascii_case("content-length") {
            content_length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| (400, "Content-Length is not a number".to_owned()))?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err((
                411,
                "chunked bodies are not supported: send Content-Length".into(),
            ));
        }
    }
    let path = req.path.unwrap_or("/");
    let path = path.split('?').next().unwrap_or(path).to_owned();
    Ok(Some((
        Http {
            method: req.method.unwrap_or("").to_owned(),
            path,
            authorization,
            body: Vec::new(),
        },
        head_len,
        content_length,
    )))
}

/// A route error: status, message, and the methods the path allows (for 405).
type RouteError = (u16, String, Vec<&'static str>);

fn route(r: &Http) -> Result<Command, RouteError> {
    let segments: Vec<&str> = r.path.split('/').filter(|s| !s.is_empty()).collect();
    let method = r.method.as_str();
    let wrong = |allow: Vec<&'static str>| {
        Err((405, format!("{method} is not allowed on {}", r.path), allow))
    };
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
            "POST" => start_call(&r.body),
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
        _ => Err((404, format!("no such endpoint: {}", r.path), Vec::new())),
    }
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

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

async fn write_json(
    stream: &mut TcpStream,
    status: u16,
    body: &Value,
    extra: &[(&str, &str)],
) -> std::io::Result<()> {
    let body = format!("{body}\n");
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n",
        reason(status),
        body.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.flush().await?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}

/// `text/event-stream`: one `data:` line per event, a comment every [`KEEPALIVE`]; ends when
/// the client goes away or the hub drops the stream.
async fn event_stream(mut stream: TcpStream, rx: Receiver<String>) {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
                Connection: close\r\n\r\n: call-assist events\n\n";
    if stream.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let _ = stream.flush().await;
    loop {
        let next = async { Some(rx.recv().await) }
            .or(async {
                smol::Timer::after(KEEPALIVE).await;
                None
            })
            .await;
        let chunk = match next {
            Some(Ok(event)) => format!("data: {event}\n\n"),
            Some(Err(_)) => return,
            None => ": keepalive\n\n".to_owned(),
        };
        // A client that stops reading must not hold its connection forever.
        let written = async {
            stream.write_all(chunk.as_bytes()).await?;
            stream.flush().await
        }
        .or(async {
            smol::Timer::after(WRITE_TIMEOUT).await;
            Err(std::io::ErrorKind::TimedOut.into())
        })
        .await;
        if written.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Http {
        let (h, _, _) = parse_head(text.as_bytes()).unwrap().unwrap();
        h
    }

    #[test]
    fn a_start_call_request_routes() {
        let mut h = head("POST /calls HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n");
        h.body = br#"{"station":"door","to":"@me:example.org"}"#.to_vec();
        assert!(
            matches!(route(&h), Ok(Command::StartCall { station, to }) if station == "door" && to == "@me:example.org")
        );
    }

    #[test]
    fn paths_methods_and_bodies_are_checked() {
        assert_eq!(
            route(&head("GET /nope HTTP/1.1\r\n\r\n")).unwrap_err().0,
            404
        );
        let e = route(&head("PUT /calls HTTP/1.1\r\n\r\n")).unwrap_err();
        assert_eq!((e.0, e.2), (405, vec!["GET", "POST"]));
        let e = route(&head("POST /calls HTTP/1.1\r\n\r\n")).unwrap_err();
        assert_eq!(e.0, 400);
        let mut h = head("POST /calls HTTP/1.1\r\n\r\n");
        h.body = br#"{"station":"door"}"#.to_vec();
        assert!(route(&h).unwrap_err().1.contains("\"to\""));
        assert!(
            matches!(route(&head("DELETE /calls/abc HTTP/1.1\r\n\r\n")), Ok(Command::Hangup(id)) if id == "abc")
        );
        assert!(
            matches!(route(&head("POST /calls/abc/keyframe HTTP/1.1\r\n\r\n")), Ok(Command::RequestKeyframe(id)) if id == "abc")
        );
        assert_eq!(
            route(&head("GET /calls/abc/keyframe HTTP/1.1\r\n\r\n"))
                .unwrap_err()
                .0,
            405
        );
        assert!(matches!(
            route(&head("GET /calls?x=1 HTTP/1.1\r\n\r\n")),
            Ok(Command::ListCalls)
        ));
    }

    #[test]
    fn heads_are_parsed_incrementally_and_bounded() {
        assert!(parse_head(b"GET /health HTTP/1.1\r\nHost")
            .unwrap()
            .is_none());
        assert_eq!(
            parse_head(b"\x01\x02 / HTTP/1.1\r\n\r\n").unwrap_err().0,
            400
        );
        let h = head("GET /health HTTP/1.1\r\nAuthorization: Bearer abc\r\n\r\n");
        assert_eq!(h.authorization.as_deref(), Some("Bearer abc"));
        assert_eq!(
            parse_head(b"POST /calls HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
                .unwrap_err()
                .0,
            411
        );
    }

    #[test]
    fn tokens_compare_exactly() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
    }
}
