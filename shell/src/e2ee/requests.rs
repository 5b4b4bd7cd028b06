//! The crypto machine's own homeserver requests (keys upload/query/claim, to-device,
//! signatures), built with ruma (0.16, matrix-sdk-crypto 0.18's) and run with the driver's
//! reqwest client.

use std::borrow::Cow;

use call_assist_core::Secret;
use matrix_sdk_crypto::types::requests::{AnyOutgoingRequest, OutgoingRequest, ToDeviceRequest};
use matrix_sdk_crypto::OlmMachine;
use ruma::api::auth_scheme::{AccessToken, SendAccessToken};
use ruma::api::client::keys::{claim_keys, get_keys, upload_signing_keys};
use ruma::api::client::to_device::send_event_to_device;
use ruma::api::path_builder::VersionHistory;
use ruma::api::{
    IncomingResponse, MatrixVersion, OutgoingRequest as RumaRequest, SupportedVersions,
};
use ruma::OwnedTransactionId;
use tracing::{debug, info};

use super::E2eeError;
use crate::live::net;

/// Where the machine's requests go, and as whom.
#[derive(Clone)]
pub(super) struct Io {
    pub client: reqwest::Client,
    pub base_url: String,
    pub token: Secret,
}

impl Io {
    /// Runs one ruma request; any failure (transport, status, body) is an [`E2eeError`].
    pub async fn call<R>(&self, request: R) -> Result<R::IncomingResponse, E2eeError>
    where
        R: RumaRequest<Authentication = AccessToken, PathBuilder = VersionHistory>,
    {
        let versions = SupportedVersions {
            versions: [MatrixVersion::V1_1].into_iter().collect(),
            features: Default::default(),
        };
        let http_request = request
            .try_into_http_request::<Vec<u8>>(
                &self.base_url,
                SendAccessToken::IfRequired(self.token.expose()),
                Cow::Owned(versions),
            )
            .map_err(|e| E2eeError::Request(e.to_string()))?;
        let path = http_request.uri().path().to_owned();
        let response = net::run_http(self.client.clone(), http_request)
            .await
            .map_err(|e| E2eeError::Request(format!("{path}: {e:?}")))?;
        let status = response.status();
        R::IncomingResponse::try_from_http_response(response)
            .map_err(|e| E2eeError::Request(format!("{path}: HTTP {status}: {e}")))
    }

    /// Sends every request the machine has queued and reports each answer.
    pub async fn flush(&self, machine: &OlmMachine) -> Result<(), E2eeError> {
        for r in machine.outgoing_requests().await? {
            self.send(machine, &r).await?;
        }
        Ok(())
    }

    /// Sends one queued request and reports its answer to the machine.
    pub async fn send(&self, machine: &OlmMachine, r: &OutgoingRequest) -> Result<(), E2eeError> {
        let id = r.request_id();
        match r.request() {
            AnyOutgoingRequest::KeysUpload(req) => {
                let resp = self.call(req.clone()).await?;
                machine.mark_request_as_sent(id, &resp).await?;
            }
            AnyOutgoingRequest::KeysQuery(req) => {
                let mut q = get_keys::v3::Request::new();
                q.device_keys = req.device_keys.clone();
                q.timeout = req.timeout;
                let resp = self.call(q).await?;
                // Which devices will get room keys from now on: what to read when a device
                // says it cannot decrypt the hub's call.
                for (user, devices) in resp.device_keys.iter().take(16) {
                    let ids: Vec<&str> = devices.keys().map(|d| d.as_str()).collect();
                    info!("e2ee: device keys of {user}: {}", ids.join(" "));
                }
                machine.mark_request_as_sent(id, &resp).await?;
            }
            AnyOutgoingRequest::KeysClaim(req) => {
                let resp = self.call(req.clone()).await?;
                machine.mark_request_as_sent(id, &resp).await?;
            }
            AnyOutgoingRequest::ToDeviceRequest(req) => self.to_device(machine, req).await?,
            AnyOutgoingRequest::SignatureUpload(req) => {
                let resp = self.call(req.clone()).await?;
                machine.mark_request_as_sent(id, &resp).await?;
            }
            // In-room verification is not offered; nothing queues these.
            AnyOutgoingRequest::RoomMessage(_) => debug!("in-room verification message skipped"),
        }
        Ok(())
    }

    /// Sends one to-device batch (room keys, Olm messages) and reports it sent.
    pub async fn to_device(
        &self,
        machine: &OlmMachine,
        req: &ToDeviceRequest,
    ) -> Result<(), E2eeError> {
        let q = send_event_to_device::v3::Request::new_raw(
            req.event_type.clone(),
            req.txn_id.clone(),
            req.messages.clone(),
        );
        let resp = self.call(q).await?;
        machine.mark_request_as_sent(&req.txn_id, &resp).await?;
        Ok(())
    }

    /// Claims one-time keys for Olm sessions the machine is missing.
    pub async fn claim(
        &self,
        machine: &OlmMachine,
        id: &OwnedTransactionId,
        req: claim_keys::v3::Request,
    ) -> Result<(), E2eeError> {
        let resp = self.call(req).await?;
        machine.mark_request_as_sent(id, &resp).await?;
        Ok(())
    }

    /// Creates the account's cross-signing keys, uploads them and signs this device with
    /// them. The first upload needs no password (spec v1.11; Synapse accepts it).
    pub async fn bootstrap_cross_signing(&self, machine: &OlmMachine) -> Result<(), E2eeError> {
        let reqs = machine.bootstrap_cross_signing(false).await?;
        if let Some(r) = &reqs.upload_keys_req {
            self.send(machine, r).await?;
        }
        let keys = reqs.upload_signing_keys_req;
        let raw = |k: Option<matrix_sdk_crypto::types::CrossSigningKey>| {
            k.map(|k| serde_json::value::to_raw_value(&k).map(ruma::serde::Raw::from_json))
                .transpose()
                .map_err(|e| E2eeError::Request(e.to_string()))
        };
        let mut upload = upload_signing_keys::v3::Request::new();
        upload.master_key = raw(keys.master_key)?;
        upload.self_signing_key = raw(keys.self_signing_key)?;
        upload.user_signing_key = raw(keys.user_signing_key)?;
        self.call(upload).await?;
        self.call(reqs.upload_signatures_req).await?;
        Ok(())
    }
}
