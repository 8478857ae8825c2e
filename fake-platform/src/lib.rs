//! A stand-in for the Matrix platform's host API, for tests of
//! `matrix-agent` and of a whole first boot.
//!
//! It serves three things on 127.0.0.1, over HTTP or HTTPS:
//!
//! - `GET /system-bundles/<imageVersion>/matrix-host-bundle.tar.gz` and its
//!   `.sha256`, read from a directory;
//! - `POST /vps/register`, which checks `Authorization: Bearer <token>` and
//!   the body, then responds from a script of responses (500, a dropped
//!   connection, a success...). After a success it writes
//!   `<prefix>system/vps-meta.json` into the customer's bucket, as the real
//!   platform does;
//! - a 404 for everything else.
//!
//! Every request is recorded, headers and body included, for the test to
//! inspect, and optionally appended as a JSON line to a file.
//!
//! ```no_run
//! use std::time::Duration;
//! use matrix_fake_platform::{FakePlatform, PlatformConfig, ScriptedResponse};
//!
//! let platform = FakePlatform::start_blocking(
//!     PlatformConfig::new("token-1").responses(vec![
//!         ScriptedResponse::Status(500),
//!         ScriptedResponse::DropConnection,
//!         ScriptedResponse::Register,
//!     ]),
//! )
//! .unwrap();
//! // Point MATRIX_PLATFORM_REGISTER_URL at platform.register_url(), run
//! // the heartbeat, then:
//! let registrations = platform
//!     .wait_for_registrations_blocking(3, Duration::from_secs(60))
//!     .unwrap();
//! assert_eq!(registrations[2].status, Some(200));
//! platform.shutdown();
//! ```

mod bucket;
mod record;
mod registration;
mod script;
mod server;
mod tls;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

pub use bucket::BucketTarget;
pub use record::{RecordedRequest, REGISTER_PATH};
pub use registration::{parse_registration, vps_meta_document, Registration};
pub use script::{parse_script, InvalidScriptedResponse, ScriptedResponse};
pub use tls::TlsIdentity;

use bucket::MetaWriter;
use record::{lock, RequestLog};
use script::Script;
use server::{BundleSource, Shared};

/// How to start a [`FakePlatform`]. Built with chained setters from
/// [`PlatformConfig::new`].
#[derive(Clone, Debug)]
pub struct PlatformConfig {
    listen: SocketAddr,
    registration_token: String,
    bundle: Option<BundleSource>,
    bucket: Option<BucketTarget>,
    known_machine: Option<String>,
    responses: Vec<ScriptedResponse>,
    fallback: ScriptedResponse,
    tls: Option<TlsIdentity>,
    request_log: Option<PathBuf>,
}

impl PlatformConfig {
    /// Starts a configuration that accepts `registration_token` and, with
    /// nothing else set, listens on a free port of 127.0.0.1 over plain
    /// HTTP, serves no bundle, writes no metadata and accepts every valid
    /// registration.
    pub fn new(registration_token: impl Into<String>) -> PlatformConfig {
        PlatformConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            registration_token: registration_token.into(),
            bundle: None,
            bucket: None,
            known_machine: None,
            responses: Vec::new(),
            fallback: ScriptedResponse::Register,
            tls: None,
            request_log: None,
        }
    }

    /// Sets the address to listen on. It must be a loopback address; port 0
    /// picks a free port.
    pub fn listen(mut self, address: SocketAddr) -> PlatformConfig {
        self.listen = address;
        self
    }

    /// Serves `matrix-host-bundle.tar.gz` and `matrix-host-bundle.tar.gz.sha256`
    /// from `directory` as the bundle of `image_version`. The files are read
    /// on every request, so a test may replace them while the server runs.
    pub fn bundle(
        mut self,
        image_version: impl Into<String>,
        directory: impl Into<PathBuf>,
    ) -> PlatformConfig {
        self.bundle = Some(BundleSource {
            image_version: image_version.into(),
            directory: directory.into(),
        });
        self
    }

    /// Writes `vps-meta.json` into this bucket after each successful
    /// registration.
    pub fn bucket(mut self, target: BucketTarget) -> PlatformConfig {
        self.bucket = Some(target);
        self
    }

    /// Rejects registrations for any other machine id with 404 (unknown
    /// machine). Without it every machine id is accepted.
    pub fn known_machine(mut self, machine_id: impl Into<String>) -> PlatformConfig {
        self.known_machine = Some(machine_id.into());
        self
    }

    /// Sets the scripted responses, one per authorized, valid registration,
    /// in order.
    pub fn responses(mut self, responses: Vec<ScriptedResponse>) -> PlatformConfig {
        self.responses = responses;
        self
    }

    /// Sets the response sent once the script is used up (default
    /// [`ScriptedResponse::Register`]).
    pub fn fallback(mut self, response: ScriptedResponse) -> PlatformConfig {
        self.fallback = response;
        self
    }

    /// Serves HTTPS with this certificate instead of plain HTTP.
    pub fn tls(mut self, identity: TlsIdentity) -> PlatformConfig {
        self.tls = Some(identity);
        self
    }

    /// Appends every recorded request to this file as one JSON line (the
    /// serialized [`RecordedRequest`]). The file is created or truncated.
    pub fn request_log(mut self, path: impl Into<PathBuf>) -> PlatformConfig {
        self.request_log = Some(path.into());
        self
    }
}

/// Error of the `wait_for_registrations` methods.
#[derive(Debug, thiserror::Error)]
#[error("waited {waited:?} for {expected} registration requests, but {received} arrived")]
pub struct WaitTimedOut {
    pub expected: usize,
    pub received: usize,
    pub waited: Duration,
}

/// A running fake platform. Dropping it stops the server.
pub struct FakePlatform {
    address: SocketAddr,
    scheme: &'static str,
    shared: Arc<Shared>,
    server: Option<JoinHandle<()>>,
    /// The runtime of a server started by [`FakePlatform::start_blocking`].
    runtime: Option<Runtime>,
}

impl FakePlatform {
    /// Binds the listener and starts serving on the current Tokio runtime.
    ///
    /// Fails when the address is not a loopback address or cannot be bound,
    /// when the TLS files are unusable, or when the request log cannot be
    /// created.
    pub async fn start(config: PlatformConfig) -> anyhow::Result<FakePlatform> {
        if !config.listen.ip().is_loopback() {
            bail!(
                "the fake platform listens on loopback addresses only, not {}",
                config.listen
            );
        }
        let tls = match &config.tls {
            Some(identity) => Some(TlsAcceptor::from(identity.server_config()?)),
            None => None,
        };
        let log = RequestLog::new(config.request_log.as_deref()).with_context(|| {
            let path = config.request_log.clone().unwrap_or_default();
            format!("cannot create the request log {}", path.display())
        })?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let address = listener.local_addr()?;

        let shared = Arc::new(Shared {
            token: config.registration_token,
            known_machine: config.known_machine,
            bundle: config.bundle,
            meta_writer: config.bucket.map(MetaWriter::new),
            script: Mutex::new(Script::new(config.responses, config.fallback)),
            log,
        });
        let scheme = if tls.is_some() { "https" } else { "http" };
        let server = tokio::spawn(server::serve(listener, tls, shared.clone()));
        Ok(FakePlatform {
            address,
            scheme,
            shared,
            server: Some(server),
            runtime: None,
        })
    }

    /// Starts the server on a runtime of its own, for synchronous tests.
    /// Must not be called from inside a Tokio runtime.
    pub fn start_blocking(config: PlatformConfig) -> anyhow::Result<FakePlatform> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fake-platform")
            .enable_all()
            .build()
            .context("cannot build a Tokio runtime for the fake platform")?;
        let mut platform = runtime.block_on(FakePlatform::start(config))?;
        platform.runtime = Some(runtime);
        Ok(platform)
    }

    /// Returns the bound address, with the port chosen when port 0 was
    /// asked for.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// Returns `http://127.0.0.1:<port>`, or `https://` with TLS.
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.address)
    }

    /// Returns the URL for `MATRIX_PLATFORM_REGISTER_URL`.
    pub fn register_url(&self) -> String {
        format!("{}{REGISTER_PATH}", self.base_url())
    }

    /// Returns the URL of the bundle tarball of `image_version`; the
    /// checksum is at the same URL plus `.sha256`.
    pub fn bundle_url(&self, image_version: &str) -> String {
        format!(
            "{}/system-bundles/{image_version}/matrix-host-bundle.tar.gz",
            self.base_url()
        )
    }

    /// Returns every request received so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.log.snapshot()
    }

    /// Returns the `POST /vps/register` requests received so far, whatever
    /// their response, oldest first.
    pub fn registrations(&self) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(RecordedRequest::is_registration)
            .collect()
    }

    /// Replaces the scripted responses not yet used.
    pub fn set_responses(&self, responses: Vec<ScriptedResponse>) {
        lock(&self.shared.script).replace(responses);
    }

    /// Appends one response to the script.
    pub fn push_response(&self, response: ScriptedResponse) {
        lock(&self.shared.script).push(response);
    }

    /// Sets the response sent once the script is used up.
    pub fn set_fallback(&self, response: ScriptedResponse) {
        lock(&self.shared.script).set_fallback(response);
    }

    /// Returns how many scripted responses are not used yet.
    pub fn remaining_responses(&self) -> usize {
        lock(&self.shared.script).remaining()
    }

    /// Waits until at least `count` registration requests have arrived and
    /// returns them all.
    pub async fn wait_for_registrations(
        &self,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<RecordedRequest>, WaitTimedOut> {
        let mut changes = self.shared.log.subscribe();
        let enough = async {
            loop {
                let registrations = self.registrations();
                if registrations.len() >= count {
                    return registrations;
                }
                if changes.changed().await.is_err() {
                    // The sender is owned by `self.shared`, so it is not
                    // dropped during this borrow. Wait for the timeout anyway.
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, enough)
            .await
            .map_err(|_| WaitTimedOut {
                expected: count,
                received: self.registrations().len(),
                waited: timeout,
            })
    }

    /// Blocking form of [`FakePlatform::wait_for_registrations`], polling
    /// every 20 ms. Do not call it from inside a Tokio runtime.
    pub fn wait_for_registrations_blocking(
        &self,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<RecordedRequest>, WaitTimedOut> {
        let started = Instant::now();
        loop {
            let registrations = self.registrations();
            if registrations.len() >= count {
                return Ok(registrations);
            }
            if started.elapsed() >= timeout {
                return Err(WaitTimedOut {
                    expected: count,
                    received: registrations.len(),
                    waited: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server and closes every open connection.
    ///
    /// A server from [`FakePlatform::start_blocking`] is stopped before
    /// this returns. One from [`FakePlatform::start`] is aborted, and its
    /// listening socket closes at the runtime's next poll.
    pub fn shutdown(mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

impl Drop for FakePlatform {
    /// Aborts the server without waiting. Dropping may happen inside an
    /// async context, where waiting for a runtime to stop would panic.
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
