//! Builds without the `e2ee` feature (the fuzz targets): the same interface as `e2ee`, with
//! every request passed through as it is. Such a build must not be used for encrypted rooms;
//! the product's default build has the feature.

use std::path::{Path, PathBuf};
use std::time::Duration;

use call_assist_core::{HttpFailure, Secret};

use crate::live::net;

/// Without the feature there is no crypto store to lose.
pub(crate) fn crypto_store_lost(_state_dir: &Path) -> bool {
    false
}

#[derive(Clone)]
pub(crate) struct E2ee {
    client: reqwest::Client,
}

impl E2ee {
    pub fn new(client: reqwest::Client, _base_url: String, _state_dir: Option<PathBuf>) -> Self {
        E2ee { client }
    }

    pub fn start(&self, _user: &str, _device: &str, _token: &Secret) {}

    pub fn start_with_token(&self, _user: &str, _device: Option<String>, _token: Secret) {}

    pub async fn close(&self, _limit: Duration) {}

    pub async fn run(
        &self,
        request: http::Request<Vec<u8>>,
    ) -> Result<http::Response<Vec<u8>>, HttpFailure> {
        net::run_http(self.client.clone(), request).await
    }
}
