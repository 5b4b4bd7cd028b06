//! End-to-end encryption between the core's homeserver HTTP and the network.
//!
//! The core stays sans-IO and knows nothing of Olm/Megolm: every request it makes passes
//! through [`E2ee::run`]. A /sync answer is fed to matrix-sdk-crypto's `OlmMachine`
//! (to-device events, device lists, one-time key counts) and its `m.room.encrypted` timeline
//! events are replaced by their plaintext before the core reads it; a `m.call.*` room send
//! into an encrypted room leaves as `m.room.encrypted` with the same transaction id, or not
//! at all. The machine's async methods reach tokio, so everything here runs inside
//! `async_compat::Compat` on the driver's smol tasks; one async mutex keeps sync processing
//! and sends in order.

mod requests;

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use call_assist_core::{HttpFailure, Secret};
use matrix_sdk_crypto::{
    DecryptionSettings, EncryptionSettings, EncryptionSyncChanges, OlmMachine, TrustRequirement,
};
use matrix_sdk_sqlite::SqliteCryptoStore;
use ruma::events::room::encryption::RoomEncryptionEventContent;
use ruma::events::room::history_visibility::HistoryVisibility;
use ruma::serde::Raw;
use ruma::OwnedDeviceId;
use ruma::{OwnedRoomId, OwnedUserId};
use serde_json::Value;
use smol::lock::Mutex;
use tracing::{debug, error, info, warn};

use crate::live::net;
use crate::room_crypto::{self as sync, classify, encrypted_uri, Kind, RoomCrypto, Slot};
use requests::Io;

/// Encrypted timeline events kept for a retry when their room key comes later; past this
/// the oldest is dropped (logged).
const MAX_UNDECRYPTED: usize = 64;
/// How long an undecryptable event is retried; well past any call invite's lifetime.
const UNDECRYPTED_KEEP: Duration = Duration::from_secs(300);
/// Rooms whose key is shared ahead per sync for joins (a first sync may list hundreds; the
/// rest get theirs with their first call event).
const MAX_WARM_PER_SYNC: usize = 8;
/// The crypto store's directory under the state dir.
const STORE_DIR: &str = "crypto";
/// The file matrix-sdk-sqlite keeps the crypto store in.
const STORE_FILE: &str = "matrix-sdk-crypto.sqlite3";

/// Why the layer could not do its part.
#[derive(Debug)]
pub(crate) enum E2eeError {
    /// The crypto store could not be opened or used.
    Store(String),
    /// The machine refused (e.g. Olm/Megolm failure).
    Crypto(String),
    /// A request of the machine's failed (transport, status or answer).
    Request(String),
    /// The room is encrypted but the layer has no machine (not logged in, or disabled).
    NoMachine,
}

impl std::fmt::Display for E2eeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            E2eeError::Store(e) => write!(f, "crypto store: {e}"),
            E2eeError::Crypto(e) => write!(f, "crypto: {e}"),
            E2eeError::Request(e) => write!(f, "key request: {e}"),
            E2eeError::NoMachine => f.write_str("encryption is not available"),
        }
    }
}

impl From<matrix_sdk_crypto::CryptoStoreError> for E2eeError {
    fn from(e: matrix_sdk_crypto::CryptoStoreError) -> Self {
        E2eeError::Store(e.to_string())
    }
}

impl From<matrix_sdk_crypto::OlmError> for E2eeError {
    fn from(e: matrix_sdk_crypto::OlmError) -> Self {
        E2eeError::Crypto(e.to_string())
    }
}

impl From<matrix_sdk_crypto::MegolmError> for E2eeError {
    fn from(e: matrix_sdk_crypto::MegolmError) -> Self {
        E2eeError::Crypto(e.to_string())
    }
}

impl From<matrix_sdk_crypto::SignatureError> for E2eeError {
    fn from(e: matrix_sdk_crypto::SignatureError) -> Self {
        E2eeError::Crypto(e.to_string())
    }
}

/// True when the state dir has a session but lost its crypto store: that device must not be
/// reused (its keys are gone; peers would see a device whose identity changed).
pub(crate) fn crypto_store_lost(state_dir: &Path) -> bool {
    !state_dir.join(STORE_DIR).join(STORE_FILE).exists()
}

/// The layer, shared by every HTTP task of the driver.
#[derive(Clone)]
pub(crate) struct E2ee {
    layer: Arc<Mutex<Layer>>,
    client: reqwest::Client,
    base_url: String,
    state_dir: Option<PathBuf>,
}

/// An encrypted event waiting for its room key.
struct Undecrypted {
    room: OwnedRoomId,
    event: Value,
    since: Instant,
}

#[derive(Default)]
struct Layer {
    machine: Option<OlmMachine>,
    io: Option<Io>,
    rooms: BTreeMap<OwnedRoomId, RoomCrypto>,
    undecrypted: VecDeque<Undecrypted>,
    /// Rooms where a call invite just arrived: their key is shared before the core answers.
    warm: Vec<OwnedRoomId>,
}

impl E2ee {
    pub fn new(client: reqwest::Client, base_url: String, state_dir: Option<PathBuf>) -> Self {
        E2ee {
            layer: Arc::new(Mutex::new(Layer::default())),
            client,
            base_url: base_url.trim_end_matches('/').to_owned(),
            state_dir,
        }
    }

    /// After a login: opens the crypto store and makes the machine for this device, then
    /// uploads its keys and bootstraps cross-signing once. Sync answers and sends wait for it.
    pub fn start(&self, user: &str, device: &str, token: &Secret) {
        // Taken now, so the sync answer that follows the login waits for the machine.
        self.start_locked(self.layer.try_lock_arc(), user, device, token);
    }

    fn start_locked(
        &self,
        guard: Option<smol::lock::MutexGuardArc<Layer>>,
        user: &str,
        device: &str,
        token: &Secret,
    ) {
        let (Ok(user), Ok(device)) = (
            ruma::OwnedUserId::try_from(user),
            Ok::<_, ()>(OwnedDeviceId::from(device)),
        ) else {
            error!("e2ee: unusable user id; encryption disabled");
            return;
        };
        let io = Io {
            client: self.client.clone(),
            base_url: self.base_url.clone(),
            token: token.clone(),
        };
        let layer = self.layer.clone();
        let dir = self.state_dir.clone();
        smol::spawn(async_compat::Compat::new(async move {
            let mut layer = match guard {
                Some(g) => g,
                None => layer.lock_arc().await,
            };
            if layer
                .machine
                .as_ref()
                .is_some_and(|m| m.user_id() == user && m.device_id() == device)
            {
                // A new token for the same device (the saved one was refused).
                layer.io = Some(io);
                return;
            }
            match open_machine(&user, &device, dir.as_deref()).await {
                Ok(machine) => {
                    info!(%device, ed25519 = %machine.identity_keys().ed25519, "e2ee: ready");
                    // The core's first sync has no `since`, so it reports no device-list
                    // changes: devices peers added while we were down are queried afresh.
                    if let Err(e) = machine.mark_all_tracked_users_as_dirty().await {
                        warn!("e2ee: cannot refresh device lists: {e}");
                    }
                    if let Err(e) = io.flush(&machine).await {
                        warn!("e2ee: uploading keys failed: {e}");
                    }
                    bootstrap_cross_signing(&io, &machine).await;
                    layer.machine = Some(machine);
                    layer.io = Some(io);
                }
                Err(e) => error!(
                    "e2ee: {e}; encryption disabled: encrypted rooms cannot be read or called"
                ),
            }
        }))
        .detach();
    }

    /// For a token login (no LoggedIn event): the same as [`E2ee::start`]; without a known
    /// device the homeserver says which device the token belongs to.
    pub fn start_with_token(&self, user: &str, device: Option<String>, token: Secret) {
        if let Some(device) = device {
            self.start(user, &device, &token);
            return;
        }
        let io = Io {
            client: self.client.clone(),
            base_url: self.base_url.clone(),
            token: token.clone(),
        };
        let this = self.clone();
        let user = user.to_owned();
        // Held until the device is known, so nothing encrypted slips past a missing machine.
        let guard = self.layer.try_lock_arc();
        smol::spawn(async_compat::Compat::new(async move {
            let who = io
                .call(ruma::api::client::account::whoami::v3::Request::new())
                .await;
            match who {
                Ok(who) => match who.device_id {
                    Some(device) => this.start_locked(guard, &user, device.as_str(), &token),
                    None => error!("e2ee: the access token names no device; encryption disabled"),
                },
                Err(e) => error!("e2ee: cannot ask who the token is ({e}); encryption disabled"),
            }
        }))
        .detach();
    }

    /// Before exit: waits, at most `limit`, for the layer's work in flight (a key upload the
    /// homeserver took must also reach the store, or the next run's keys disagree with the
    /// server's), then closes the machine. Its SQLite store must be dropped inside a tokio
    /// context (deadpool hands the connections to `spawn_blocking`; outside one it panics).
    pub async fn close(&self, limit: Duration) {
        use futures_lite::FutureExt;
        let layer = self.layer.clone();
        let closed = async_compat::Compat::new(async move {
            let machine = layer.lock().await.machine.take();
            drop(machine);
            true
        })
        .or(async {
            smol::Timer::after(limit).await;
            false
        })
        .await;
        if !closed {
            warn!("e2ee: crypto work still in flight at exit");
        }
    }

    /// Runs one of the core's requests through the layer.
    pub async fn run(
        &self,
        request: http::Request<Vec<u8>>,
    ) -> Result<http::Response<Vec<u8>>, HttpFailure> {
        match classify(&request) {
            Kind::Other => net::run_http(self.client.clone(), request).await,
            Kind::Sync => {
                let response = net::run_http(self.client.clone(), request).await?;
                if !response.status().is_success() {
                    return Ok(response);
                }
                let (parts, body) = response.into_parts();
                let mut layer = self.layer.lock_arc().await;
                let body = layer.on_sync(body).await;
                let warm = std::mem::take(&mut layer.warm);
                let ready = layer.machine.is_some();
                drop(layer);
                if ready {
                    self.after_sync(warm);
                }
                Ok(http::Response::from_parts(parts, body))
            }
            Kind::CallSend { room, event_type } => {
                let mut layer = self.layer.lock_arc().await;
                match layer.on_call_send(request, &room, &event_type).await {
                    Ok(request) => {
                        drop(layer);
                        net::run_http(self.client.clone(), request).await
                    }
                    // A key request that did not get through: the core retries.
                    Err(e @ E2eeError::Request(_)) => {
                        warn!(%event_type, "e2ee: not sent yet: {e}");
                        Err(HttpFailure::Other(format!("encryption: {e}")))
                    }
                    Err(e) => {
                        // Never plaintext into an encrypted room: the core gives up on the
                        // event and ends its call.
                        error!(%event_type, "e2ee: not sent: cannot encrypt for the room: {e}");
                        Err(HttpFailure::Encryption(e.to_string()))
                    }
                }
            }
        }
    }

    /// After a sync, off the core's path: the machine's queued requests (key uploads, key
    /// queries, to-device), then the room key shared where a call invite came in, so the
    /// answer does not wait for those round trips (it waits for this lock instead).
    fn after_sync(&self, warm: Vec<OwnedRoomId>) {
        let layer = self.layer.clone();
        smol::spawn(async_compat::Compat::new(async move {
            let layer = layer.lock_arc().await;
            let (Some(m), Some(io)) = (&layer.machine, &layer.io) else {
                return;
            };
            if let Err(e) = io.flush(m).await {
                warn!("e2ee: key requests after sync failed: {e}");
            }
            for room in warm {
                let Some(info) = layer.rooms.get(&room) else {
                    continue;
                };
                let Some(encryption) = &info.encryption else {
                    continue;
                };
                match share_room_key(m, io, &room, &info.members, encryption).await {
                    Ok(()) => debug!(%room, "e2ee: room key shared ahead of the answer"),
                    Err(e) => warn!(%room, "e2ee: sharing the room key ahead failed: {e}"),
                }
            }
        }))
        .detach();
    }
}

impl Layer {
    /// The sync answer as the core should see it: crypto changes fed to the machine,
    /// encrypted events decrypted, plaintext call events in encrypted rooms dropped.
    async fn on_sync(&mut self, body: Vec<u8>) -> Vec<u8> {
        let mut json: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            // The core reports what it cannot parse.
            Err(_) => return body,
        };
        let before = sync::encrypted_members(&self.rooms);
        let new_users = sync::track_rooms(&mut self.rooms, &json);
        // Joined an encrypted room, or someone joined one: its key goes out now, so the
        // first call event there does not wait for Olm sessions and the key share.
        let changed = sync::changed_encrypted_rooms(&before, &self.rooms);
        for room in changed.into_iter().take(MAX_WARM_PER_SYNC) {
            if !self.warm.contains(&room) {
                self.warm.push(room);
            }
        }
        let dropped = sync::drop_plaintext_calls(&mut json, &self.rooms);
        if dropped > 0 {
            warn!(
                dropped,
                "e2ee: plaintext call events in encrypted rooms ignored"
            );
        }
        let Some(machine) = &self.machine else {
            if !sync::encrypted_slots(&json).is_empty() {
                warn!("e2ee: encrypted events dropped: encryption is not available");
            }
            return serde_json::to_vec(&json).unwrap_or(body);
        };
        if let Err(e) = feed_machine(machine, &json, &new_users).await {
            warn!("e2ee: sync changes not taken by the crypto machine: {e}");
        }
        self.retry_undecrypted(&mut json).await;
        for slot in sync::encrypted_slots(&json) {
            self.decrypt_slot(&mut json, &slot).await;
        }
        serde_json::to_vec(&json).unwrap_or(body)
    }

    /// Replaces the encrypted event at `slot` by its plaintext, or keeps it for a retry.
    async fn decrypt_slot(&mut self, json: &mut Value, slot: &Slot) {
        let Some(envelope) = sync::event_at(json, slot).cloned() else {
            return;
        };
        match self.decrypt(&slot.room, &envelope).await {
            Ok(plain) => {
                let invite = plain.get("type").and_then(Value::as_str) == Some("m.call.invite");
                if invite && !self.warm.contains(&slot.room) {
                    self.warm.push(slot.room.clone());
                }
                if let Some(ev) = sync::event_at_mut(json, slot) {
                    *ev = plain;
                }
            }
            Err(e) => {
                info!(room = %slot.room, "e2ee: cannot decrypt yet ({e}); kept for a retry");
                self.keep_undecrypted(slot.room.clone(), envelope);
            }
        }
    }

    async fn decrypt(&self, room: &OwnedRoomId, envelope: &Value) -> Result<Value, E2eeError> {
        let machine = self.machine.as_ref().ok_or(E2eeError::NoMachine)?;
        let raw = Raw::from_json_string(envelope.to_string())
            .map_err(|e| E2eeError::Crypto(e.to_string()))?;
        let settings = DecryptionSettings {
            sender_device_trust_requirement: TrustRequirement::Untrusted,
        };
        let decrypted = machine.decrypt_room_event(&raw, room, &settings).await?;
        let info = &decrypted.encryption_info;
        if matches!(
            info.verification_state,
            matrix_sdk_common::deserialized_responses::VerificationState::Unverified(
                matrix_sdk_common::deserialized_responses::VerificationLevel::MismatchedSender
            )
        ) {
            return Err(E2eeError::Crypto(
                "the room key's owner is not the event's sender".into(),
            ));
        }
        let plain: Value = serde_json::from_str(decrypted.event.json().get())
            .map_err(|e| E2eeError::Crypto(e.to_string()))?;
        Ok(sync::plaintext_event(
            envelope,
            &plain,
            info.sender.as_str(),
        ))
    }

    fn keep_undecrypted(&mut self, room: OwnedRoomId, event: Value) {
        if self.undecrypted.len() >= MAX_UNDECRYPTED {
            warn!("e2ee: too many undecryptable events; dropping the oldest");
            self.undecrypted.pop_front();
        }
        self.undecrypted.push_back(Undecrypted {
            room,
            event,
            since: Instant::now(),
        });
    }

    /// Events that failed before are tried again (their key may have come in this sync);
    /// those that decrypt join this answer, older ones first.
    async fn retry_undecrypted(&mut self, json: &mut Value) {
        let mut still = VecDeque::new();
        let mut late: BTreeMap<OwnedRoomId, Vec<Value>> = BTreeMap::new();
        for u in std::mem::take(&mut self.undecrypted) {
            let waited = u.since.elapsed();
            match self.decrypt(&u.room, &u.event).await {
                Ok(mut plain) => {
                    info!(room = %u.room, ?waited, "e2ee: decrypted an event after its key came");
                    sync::age_by(
                        &mut plain,
                        u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                    );
                    if plain.get("type").and_then(Value::as_str) == Some("m.call.invite")
                        && !self.warm.contains(&u.room)
                    {
                        self.warm.push(u.room.clone());
                    }
                    late.entry(u.room).or_default().push(plain);
                }
                Err(_) if waited >= UNDECRYPTED_KEEP => {
                    warn!(room = %u.room, "e2ee: no room key came for an event; dropped");
                }
                Err(_) => still.push_back(u),
            }
        }
        self.undecrypted = still;
        for (room, events) in late {
            sync::inject(json, &room, events);
        }
    }

    /// The core's call event as an encrypted send, if the room is encrypted; unchanged if not.
    async fn on_call_send(
        &mut self,
        request: http::Request<Vec<u8>>,
        room: &OwnedRoomId,
        event_type: &str,
    ) -> Result<http::Request<Vec<u8>>, E2eeError> {
        let Some(info) = self.rooms.get(room).cloned() else {
            return Ok(request);
        };
        let Some(encryption) = info.encryption else {
            return Ok(request);
        };
        let (machine, io) = match (&self.machine, &self.io) {
            (Some(m), Some(io)) => (m, io),
            _ => return Err(E2eeError::NoMachine),
        };
        share_room_key(machine, io, room, &info.members, &encryption).await?;
        let (mut parts, body) = request.into_parts();
        let content = String::from_utf8(body)
            .ok()
            .and_then(|s| Raw::from_json_string(s).ok())
            .ok_or_else(|| E2eeError::Crypto("the event content is not JSON".into()))?;
        let encrypted = machine
            .encrypt_room_event_raw(room, event_type, &content)
            .await?;
        parts.uri = encrypted_uri(&parts.uri, event_type)
            .ok_or_else(|| E2eeError::Crypto("unexpected send URI".into()))?;
        debug!(%event_type, "e2ee: call event encrypted");
        Ok(http::Request::from_parts(
            parts,
            encrypted.content.json().get().as_bytes().to_vec(),
        ))
    }
}

/// Opens the persistent store (private to the service user) in the state dir, or an
/// in-memory one without a state dir, and the machine for this device in it. A store that
/// belongs to another device (its session was lost) is moved aside: keys are never reused
/// across devices.
async fn open_machine(
    user: &ruma::OwnedUserId,
    device: &OwnedDeviceId,
    state_dir: Option<&Path>,
) -> Result<OlmMachine, E2eeError> {
    let Some(dir) = state_dir else {
        warn!("e2ee: no state dir: this device's keys last only as long as the process");
        return Ok(OlmMachine::new(user, device).await);
    };
    let store_dir = dir.join(STORE_DIR);
    private_dir(&store_dir).map_err(|e| E2eeError::Store(e.to_string()))?;
    let store = SqliteCryptoStore::open(&store_dir, None)
        .await
        .map_err(|e| E2eeError::Store(e.to_string()))?;
    private_files(&store_dir);
    match OlmMachine::with_store(user, device, store, None).await {
        Err(matrix_sdk_crypto::CryptoStoreError::MismatchedAccount { expected, .. }) => {
            let aside = dir.join(format!("{STORE_DIR}.{}", expected.1));
            warn!(
                old_device = %expected.1,
                "e2ee: the crypto store belongs to another device; moved to {} and starting a new one",
                aside.display()
            );
            std::fs::rename(&store_dir, &aside).map_err(|e| E2eeError::Store(e.to_string()))?;
            private_dir(&store_dir).map_err(|e| E2eeError::Store(e.to_string()))?;
            let store = SqliteCryptoStore::open(&store_dir, None)
                .await
                .map_err(|e| E2eeError::Store(e.to_string()))?;
            private_files(&store_dir);
            Ok(OlmMachine::with_store(user, device, store, None).await?)
        }
        other => Ok(other?),
    }
}

fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// SQLite creates its files with the umask's mode; the directory is private already, the
/// files are made so too.
fn private_files(dir: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let _ = std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o600));
        }
    }
}

/// Cross-signing keys for the account on its first start, so clients that only share keys
/// with cross-signed devices still talk to this one.
async fn bootstrap_cross_signing(io: &Io, machine: &OlmMachine) {
    if machine.cross_signing_status().await.is_complete() {
        return;
    }
    match io.bootstrap_cross_signing(machine).await {
        Ok(()) => info!("e2ee: cross-signing set up; this device is signed by the account"),
        Err(e) => warn!("e2ee: cross-signing not set up: {e}"),
    }
}

/// One sync's crypto changes into the machine; newly seen room members are tracked.
async fn feed_machine(
    machine: &OlmMachine,
    json: &Value,
    new_users: &std::collections::BTreeSet<OwnedUserId>,
) -> Result<(), E2eeError> {
    let de = |p: &str| json.pointer(p).cloned().unwrap_or(Value::Null);
    let to_device: Vec<Raw<ruma::events::AnyToDeviceEvent>> =
        serde_json::from_value(de("/to_device/events")).unwrap_or_default();
    let device_lists: ruma::api::client::sync::sync_events::DeviceLists =
        serde_json::from_value(de("/device_lists")).unwrap_or_default();
    // A member's new device gets this room's keys only once its keys are here (logged by
    // the key query): worth a line when a freshly logged-in device cannot decrypt a call.
    for user in device_lists.changed.iter().take(16) {
        info!(%user, "e2ee: devices changed; their keys are queried before the next share");
    }
    let counts: BTreeMap<ruma::OneTimeKeyAlgorithm, ruma::UInt> =
        serde_json::from_value(de("/device_one_time_keys_count")).unwrap_or_default();
    let fallback: Option<Vec<ruma::OneTimeKeyAlgorithm>> =
        serde_json::from_value(de("/device_unused_fallback_key_types")).unwrap_or_default();
    if !new_users.is_empty() {
        // Collected first: a borrowing closure held across the await makes the future !Send.
        let users: Vec<&ruma::UserId> = new_users.iter().map(|u| u.as_ref()).collect();
        machine.update_tracked_users(users).await?;
    }
    let changes = EncryptionSyncChanges {
        to_device_events: to_device,
        changed_devices: &device_lists,
        one_time_keys_counts: &counts,
        unused_fallback_keys: fallback.as_deref(),
        next_batch_token: json
            .get("next_batch")
            .and_then(Value::as_str)
            .map(str::to_owned),
    };
    let settings = DecryptionSettings {
        sender_device_trust_requirement: TrustRequirement::Untrusted,
    };
    let (_, keys) = machine.receive_sync_changes(changes, &settings).await?;
    if !keys.is_empty() {
        debug!(keys = keys.len(), "e2ee: room keys received");
    }
    Ok(())
}

/// Makes sure every member's devices have this room's current key: Olm sessions first
/// (claiming one-time keys), then the key itself over to-device.
async fn share_room_key(
    machine: &OlmMachine,
    io: &Io,
    room: &OwnedRoomId,
    members: &std::collections::BTreeSet<OwnedUserId>,
    encryption: &Value,
) -> Result<(), E2eeError> {
    // Device lists of members first: a key query still pending would leave devices out.
    io.flush(machine).await?;
    let users: Vec<&ruma::UserId> = members.iter().map(|u| u.as_ref()).collect();
    if let Some((id, claim)) = machine
        .get_missing_sessions(users.clone().into_iter())
        .await?
    {
        io.claim(machine, &id, claim).await?;
    }
    let settings = match serde_json::from_value::<RoomEncryptionEventContent>(encryption.clone()) {
        Ok(content) => EncryptionSettings::new(
            content,
            HistoryVisibility::Shared,
            matrix_sdk_crypto::CollectStrategy::default(),
        ),
        Err(_) => EncryptionSettings::default(),
    };
    for req in machine
        .share_room_key(room, users.into_iter(), settings)
        .await?
    {
        io.to_device(machine, &req).await?;
    }
    Ok(())
}
