//! Registration with the platform: one `POST /vps/register` after the gate
//! opened, retried through outages, stopped by a definite refusal, and
//! remembered on disk so that it happens once per machine.

use std::time::Duration;

use anyhow::anyhow;
use chrono::Utc;
use serde::{Deserialize, Serialize};

use crate::config::{Config, HeartbeatSettings};
use crate::instance::{self, ServerIdentity};
use crate::state::{RegistrationRecord, RegistrationState, StateDir};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(300);

/// The request body, exactly the platform's contract.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterRequest {
    pub machine_id: String,
    pub hetzner_server_id: u64,
    #[serde(rename = "publicIPv4")]
    pub public_ipv4: String,
    #[serde(rename = "publicIPv6", skip_serializing_if = "Option::is_none")]
    pub public_ipv6: Option<String>,
    pub image_version: String,
}

#[derive(Debug, Deserialize)]
struct RegisterResponse {
    #[serde(default)]
    registered: bool,
    #[serde(default)]
    warnings: Vec<String>,
}

/// How one attempt ended.
#[derive(Debug, PartialEq, Eq)]
pub enum AttemptOutcome {
    Registered {
        meta_persistence_failed: bool,
    },
    /// Worth another attempt: network failure, timeout, 429 or 5xx.
    Retry(String),
    /// Never retried: 400, 401, 404, 409 and other refusals.
    Refused(String),
}

/// Classifies an HTTP status from the platform.
pub fn classify_status(status: u16) -> Option<&'static str> {
    match status {
        200..=299 => None,
        400 => Some("invalid request (400)"),
        401 => Some("invalid or expired registration token (401)"),
        404 => Some("the platform does not know this machine (404)"),
        409 => Some("the machine is in the wrong state for registration (409)"),
        429 => Some("rate limited (429)"),
        500..=599 => Some("platform error (5xx)"),
        _ => Some("unexpected status"),
    }
}

fn is_retryable(status: u16) -> bool {
    status == 429 || (500..=599).contains(&status)
}

/// Returns the wait before attempt `attempt + 1`: exponential from one
/// second, capped at five minutes, with `jitter` (0.0 to 1.0) spreading it
/// over the upper half so that a fleet restarted together spreads out.
pub fn backoff_delay(attempt: u32, jitter: f64) -> Duration {
    let exponential = BACKOFF_BASE.saturating_mul(1u32 << attempt.min(20));
    let capped = exponential.min(BACKOFF_CAP);
    capped.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// Sends one registration request.
pub async fn attempt(
    client: &reqwest::Client,
    settings: &HeartbeatSettings,
    request: &RegisterRequest,
    token: &str,
) -> AttemptOutcome {
    let response = client
        .post(&settings.register_url)
        .bearer_auth(token)
        .timeout(REQUEST_TIMEOUT)
        .json(request)
        .send()
        .await;
    let response = match response {
        Ok(response) => response,
        Err(error) => return AttemptOutcome::Retry(describe_transport_error(&error)),
    };
    let status = response.status().as_u16();
    if let Some(reason) = classify_status(status) {
        let message = format!("HTTP {status}: {reason}");
        return if is_retryable(status) {
            AttemptOutcome::Retry(message)
        } else {
            AttemptOutcome::Refused(message)
        };
    }
    match response.json::<RegisterResponse>().await {
        Ok(body) if body.registered => AttemptOutcome::Registered {
            meta_persistence_failed: body
                .warnings
                .iter()
                .any(|warning| warning == "vps_meta_persistence_failed"),
        },
        Ok(_) => AttemptOutcome::Refused(format!(
            "HTTP {status} but the body does not say registered: true"
        )),
        Err(_) => AttemptOutcome::Retry(format!(
            "HTTP {status} with a body that is not the expected JSON"
        )),
    }
}

/// Describes a transport error without the URL's query or any header.
fn describe_transport_error(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let mut detail = String::new();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        detail = cause.to_string();
        source = cause.source();
    }
    if detail.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}: {detail}")
    }
}

/// Builds the request body for this machine.
pub fn build_request(config: &Config, identity: &ServerIdentity) -> RegisterRequest {
    RegisterRequest {
        machine_id: config.machine_id.to_string(),
        hetzner_server_id: identity.server_id,
        public_ipv4: identity.ipv4.to_string(),
        public_ipv6: identity.ipv6.map(|address| address.to_string()),
        image_version: config.image_version.clone().unwrap_or_default(),
    }
}

/// Registers, retrying until success, a refusal or the deadline. Returns
/// whether the platform asked the host to write `vps-meta.json` itself.
/// The saved record keeps that request until the heartbeat has written it.
pub async fn register_until_done(
    config: &Config,
    settings: &HeartbeatSettings,
    state: &StateDir,
) -> anyhow::Result<bool> {
    let machine_id = config.machine_id.to_string();
    let now = Utc::now();
    let mut record = state
        .registration(&machine_id)
        .unwrap_or(RegistrationRecord {
            machine_id: machine_id.clone(),
            state: RegistrationState::Pending,
            attempts: 0,
            first_attempt_at: now,
            last_attempt_at: now,
            registered_at: None,
            last_error: None,
            vps_meta_pending: false,
        });
    match record.state {
        RegistrationState::Registered => return Ok(false),
        RegistrationState::Rejected => {
            return Err(anyhow!(
                "registration was refused earlier ({}); provision a new token and remove \
                 {}/registration.json to try again",
                record.last_error.as_deref().unwrap_or("no detail"),
                state.path().display()
            ))
        }
        RegistrationState::Pending => {}
    }

    let client = reqwest::Client::builder()
        .user_agent(concat!("matrix-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|error| anyhow!("cannot build the HTTP client: {error}"))?;

    loop {
        let image_version = config
            .image_version
            .as_deref()
            .filter(|version| !version.trim().is_empty());
        let outcome = match (
            &settings.registration_token,
            image_version,
            instance::resolve(settings),
        ) {
            (None, _, _) => AttemptOutcome::Refused(
                "MATRIX_REGISTRATION_TOKEN is not set; it is in /opt/matrix/env/registration.env \
                 on a provisioned host"
                    .to_string(),
            ),
            // The platform rejects an empty imageVersion with 400, so the
            // request is not worth sending.
            (Some(_), None, _) => AttemptOutcome::Refused(
                "MATRIX_IMAGE_VERSION is not set; it is in /opt/matrix/env/host.env on a \
                 provisioned host"
                    .to_string(),
            ),
            (Some(_), Some(_), Err(error)) => AttemptOutcome::Retry(format!("{error:#}")),
            (Some(token), Some(_), Ok(identity)) => {
                let request = build_request(config, &identity);
                tracing::info!(
                    "registering machine {} (server {}) with the platform",
                    request.machine_id,
                    request.hetzner_server_id
                );
                attempt(&client, settings, &request, token.expose()).await
            }
        };
        record.attempts += 1;
        record.last_attempt_at = Utc::now();

        match outcome {
            AttemptOutcome::Registered {
                meta_persistence_failed,
            } => {
                record.state = RegistrationState::Registered;
                record.registered_at = Some(Utc::now());
                record.last_error = None;
                // Saved with the registration, so that no reader sees this
                // machine registered while the metadata still names the
                // machine it replaces. The heartbeat retries the write at
                // every tick, across restarts, until it succeeds.
                record.vps_meta_pending = meta_persistence_failed;
                state.save_registration(&record)?;
                let plural = if record.attempts == 1 { "" } else { "s" };
                tracing::info!(
                    "registered with the platform after {} attempt{plural}",
                    record.attempts
                );
                return Ok(meta_persistence_failed);
            }
            AttemptOutcome::Refused(reason) => {
                record.state = RegistrationState::Rejected;
                record.last_error = Some(reason.clone());
                state.save_registration(&record)?;
                return Err(anyhow!(
                    "registration refused, not retrying: {reason}. Once the cause is fixed (a \
                     new token in /opt/matrix/env/registration.env, the machine's state on the \
                     platform, or a missing setting), remove {}/registration.json and restart \
                     matrix-heartbeat",
                    state.path().display()
                ));
            }
            AttemptOutcome::Retry(reason) => {
                let elapsed = (Utc::now() - record.first_attempt_at)
                    .to_std()
                    .unwrap_or_default();
                if elapsed >= settings.register_deadline {
                    record.state = RegistrationState::Rejected;
                    record.last_error = Some(format!("gave up after the deadline: {reason}"));
                    state.save_registration(&record)?;
                    return Err(anyhow!(
                        "registration failed for {}s, past MATRIX_REGISTER_DEADLINE: {reason}",
                        elapsed.as_secs()
                    ));
                }
                record.last_error = Some(reason.clone());
                state.save_registration(&record)?;
                let delay = backoff_delay(record.attempts - 1, rand::random::<f64>());
                tracing::warn!(
                    "registration attempt {} failed: {reason}; retrying in {:.1}s",
                    record.attempts,
                    delay.as_secs_f64()
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_then_caps() {
        assert_eq!(backoff_delay(0, 1.0), Duration::from_secs(1));
        assert_eq!(backoff_delay(1, 1.0), Duration::from_secs(2));
        assert_eq!(backoff_delay(5, 1.0), Duration::from_secs(32));
        assert_eq!(backoff_delay(9, 1.0), Duration::from_secs(300));
        assert_eq!(backoff_delay(40, 1.0), Duration::from_secs(300));
    }

    #[test]
    fn jitter_spreads_over_the_upper_half() {
        assert_eq!(backoff_delay(3, 0.0), Duration::from_secs(4));
        assert_eq!(backoff_delay(3, 0.5), Duration::from_secs(6));
        assert_eq!(backoff_delay(9, 0.0), Duration::from_secs(150));
    }

    #[test]
    fn refusals_are_not_retried() {
        for status in [400, 401, 404, 409] {
            assert!(classify_status(status).is_some());
            assert!(!is_retryable(status), "{status}");
        }
        for status in [429, 500, 502, 503] {
            assert!(is_retryable(status), "{status}");
        }
        assert_eq!(classify_status(200), None);
    }

    #[test]
    fn request_has_the_contract_fields() {
        let request = RegisterRequest {
            machine_id: "9f05824c-2d3e-4b8a-9c1d-0e5f6a7b8c9d".into(),
            hetzner_server_id: 123456,
            public_ipv4: "203.0.113.10".into(),
            public_ipv6: None,
            image_version: "matrix-os-host-2026.04.26-1".into(),
        };
        let json = serde_json::to_value(&request).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            ["machineId", "hetznerServerId", "publicIPv4", "imageVersion"]
        );
        assert!(json["hetznerServerId"].is_u64());
    }
}
