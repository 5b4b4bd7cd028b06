//! call-assist-core: a sans-IO Matrix 1:1 calling agent built on str0m.
//!
//! The core owns the Matrix client (login, /sync, sending room events, TURN credentials), the
//! m.call.* state machine (VoIP version "1") and one str0m [`Rtc`](str0m::Rtc) per call. It has
//! no sockets, threads, clock or randomness of its own: a driver feeds it time, datagrams and
//! HTTP answers, and carries out what it asks for.
//!
//! # The loop
//!
//! After every input or command the driver drains [`Agent::poll_output`] until it returns
//! [`Output::Timeout`]:
//!
//! ```no_run
//! use std::time::Instant;
//! use call_assist_core::{Agent, AgentConfig, Credentials, Input, Output, Secret};
//!
//! let now = Instant::now();
//! let config = AgentConfig::new(
//!     "https://matrix.example.org",
//!     "@hub:example.org".try_into().unwrap(),
//!     Credentials::Password(Secret::new("hunter2")),
//!     vec!["192.168.1.10:50000".parse().unwrap()],
//! );
//! let mut agent = Agent::new(config, 42, now, 1_700_000_000_000).unwrap();
//! loop {
//!     match agent.poll_output() {
//!         Output::Transmit(t) => { /* send t.contents from t.source to t.destination */ }
//!         Output::Http { id, request } => { /* run it; later Input::HttpResponse { id, .. } */ }
//!         Output::Event(event) => println!("{event:?}"),
//!         Output::Timeout(at) => {
//!             // wait for a datagram, an HTTP answer, a command or `at`, then:
//!             agent.handle_input(Input::Timeout(at));
//!             # break;
//!         }
//!     }
//! }
//! ```
//!
//! # Errors by blame
//!
//! `Err(ApiError)` only means the caller misused the API (unknown call id, ...). A bad peer,
//! packet, event or homeserver never gives an `Err` or a panic: it becomes a dropped input with
//! a traced reason, or [`AgentEvent::CallEnded`] with one of the spec's hangup reasons.
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

mod agent;
mod call;
mod dtls;
pub mod h264;
pub mod limits;
pub(crate) mod matrix;
mod rng;
mod stun;
pub mod turn;
mod types;

#[cfg(feature = "fuzzing")]
pub mod fuzzing;

pub use agent::{Agent, CallInfo};
pub use matrix::TurnServers;
pub use stun::Reflexive;
pub use types::*;

pub use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
pub use str0m::media::MediaKind;

/// Checks DTMF digits as [`Agent::send_dtmf`] does (`0-9 * # A-D`, at most
/// [`limits::MAX_DTMF_DIGITS`]), so a driver can refuse bad ones before any call exists.
///
/// # Errors
/// [`DtmfError`] naming what is wrong.
pub fn check_dtmf_digits(digits: &str) -> Result<(), DtmfError> {
    call::parse_digits(digits).map(|_| ())
}
