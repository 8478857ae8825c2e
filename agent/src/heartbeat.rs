//! `matrix-agent heartbeat`: the long-running service that registers the
//! host once, keeps `lastSyncAt` fresh, publishes the host's health, and
//! serves the local endpoint.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use sd_notify::NotifyState;
use serde_json::{json, Value};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;

use crate::config::{Config, Env, HeartbeatSettings};
use crate::endpoint::{self, EndpointContext};
use crate::error::ConfigError;
use crate::gate::{self, MarkerState};
use crate::instance;
use crate::keys;
use crate::register;
use crate::state::{Failure, RegistrationState, StateDir};
use crate::status;
use crate::store::{self, ObjectStore, StoreError, WriteCondition};
use crate::vps_meta::{self, Ownership, VpsMeta};

const GATE_POLL: Duration = Duration::from_secs(2);
/// Attempts of the conditional read-modify-write of the metadata.
const META_ATTEMPTS: usize = 3;
/// Maximum time one heartbeat may take before it counts as failed.
const BEAT_TIMEOUT: Duration = Duration::from_secs(600);
/// Slack on top of the longest expected gap between two loop iterations.
const PROGRESS_SLACK: Duration = Duration::from_secs(60);

/// When the heartbeat loop last went round, so that the watchdog stops
/// pinging systemd, which then restarts the service, once the loop hangs.
#[derive(Clone)]
struct Progress(Arc<Mutex<Instant>>);

impl Progress {
    fn new() -> Progress {
        Progress(Arc::new(Mutex::new(Instant::now())))
    }

    fn mark(&self) {
        *self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Instant::now();
    }

    fn age(&self) -> Duration {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .elapsed()
    }
}

/// What one heartbeat did.
#[derive(Debug, PartialEq, Eq)]
enum Beat {
    Sent,
    /// Metadata names the machine being replaced; nothing was written.
    NotRegisteredYet {
        other: String,
    },
    Superseded {
        other: String,
    },
}

fn notify(states: &[NotifyState]) {
    // Outside systemd there is no socket, which is not an error.
    if let Err(error) = sd_notify::notify(states) {
        tracing::debug!("sd_notify failed: {error}");
    }
}

/// Runs the service until SIGTERM or SIGINT.
pub async fn run(env: &Env) -> anyhow::Result<()> {
    let (config, settings) = match (Config::from_env(env), HeartbeatSettings::from_env(env)) {
        (Ok(config), Ok(settings)) => (config, settings),
        (config, settings) => {
            let mut problems = Vec::new();
            for error in [config.err(), settings.err()].into_iter().flatten() {
                problems.extend(error.problems);
            }
            return Err(ConfigError { problems }.into());
        }
    };
    let config = Arc::new(config);
    let state = StateDir::open(&config.state_dir)?;

    let listener = tokio::net::TcpListener::bind(settings.status_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} for the status endpoint; set MATRIX_STATUS_LISTEN to a free \
                 address",
                settings.status_listen
            )
        })?;
    let bound = listener.local_addr().unwrap_or(settings.status_listen);
    tracing::info!("status endpoint listening on http://{bound}");
    tokio::spawn(endpoint::serve(
        listener,
        EndpointContext {
            config: config.clone(),
            state: state.clone(),
            backup_interval: settings.backup_interval,
        },
    ));

    notify(&[
        NotifyState::Ready,
        NotifyState::Status("waiting for the restore gate"),
    ]);
    let progress = Progress::new();
    if let Some(timeout) = sd_notify::watchdog_enabled() {
        // A beat may take BEAT_TIMEOUT and starts at most one interval
        // after the previous one ended.
        let stall_limit = settings.interval + BEAT_TIMEOUT + PROGRESS_SLACK;
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(timeout / 2);
            let mut reported = false;
            loop {
                ticker.tick().await;
                let age = progress.age();
                if age <= stall_limit {
                    notify(&[NotifyState::Watchdog]);
                } else if !reported {
                    tracing::error!(
                        "the heartbeat loop made no progress for {}s; withholding the watchdog \
                         ping so that systemd restarts the service",
                        age.as_secs()
                    );
                    reported = true;
                }
            }
        });
    }

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        result = serve_heartbeats(config.clone(), settings, state, progress) => result,
        _ = terminate.recv() => {
            notify(&[NotifyState::Stopping]);
            tracing::info!("heartbeat stopping on SIGTERM");
            Ok(())
        }
        _ = interrupt.recv() => {
            notify(&[NotifyState::Stopping]);
            tracing::info!("heartbeat stopping on SIGINT");
            Ok(())
        }
    }
}

async fn serve_heartbeats(
    config: Arc<Config>,
    settings: HeartbeatSettings,
    state: StateDir,
    progress: Progress,
) -> anyhow::Result<()> {
    wait_for_gate(&config, &progress).await;
    let store = store::open(&config.store).await?;

    // Registration runs on its own, because its retries may take hours
    // while the heartbeat keeps going. It wakes the heartbeat when it is
    // done, so that the metadata is claimed without waiting for a tick.
    let registered = Arc::new(Notify::new());
    let _registration = {
        let (config, settings, state, registered) = (
            config.clone(),
            settings.clone(),
            state.clone(),
            registered.clone(),
        );
        tokio::spawn(async move {
            match register::register_until_done(&config, &settings, &state).await {
                Ok(meta_persistence_failed) => {
                    if meta_persistence_failed {
                        tracing::warn!(
                            "the platform could not store vps-meta.json; the heartbeat writes it"
                        );
                    }
                    registered.notify_one();
                }
                Err(error) => tracing::error!("{error:#}"),
            }
        })
    };

    let mut ticker = tokio::time::interval(settings.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = registered.notified() => {}
        }
        let result = match tokio::time::timeout(
            BEAT_TIMEOUT,
            beat(store.as_ref(), &config, &settings, &state),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(anyhow!(
                "the heartbeat did not finish within {}s",
                BEAT_TIMEOUT.as_secs()
            )),
        };
        progress.mark();
        let mut record = state.heartbeat();
        let status_line = match &result {
            Ok(Beat::Sent) => {
                record.last_success_at = Some(Utc::now());
                record.superseded_by = None;
                tracing::debug!("heartbeat sent");
                format!(
                    "heartbeat sent at {}",
                    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
                )
            }
            Ok(Beat::NotRegisteredYet { other }) => {
                tracing::info!(
                    "not registered yet; vps-meta.json still names machine {other} and is left \
                     alone"
                );
                "not registered yet".to_string()
            }
            Ok(Beat::Superseded { other }) => {
                if record.superseded_by.as_deref() != Some(other.as_str()) {
                    tracing::error!(
                        "superseded: vps-meta.json names machine {other}, a newer replacement; \
                         this host stops every write to the bucket"
                    );
                }
                record.superseded_by = Some(other.clone());
                format!("superseded by machine {other}; not writing")
            }
            Err(error) => {
                tracing::warn!("heartbeat failed, retrying at the next tick: {error:#}");
                record.failures_total += 1;
                record.last_failure = Some(Failure {
                    at: Utc::now(),
                    error: format!("{error:#}"),
                });
                "last heartbeat failed; retrying".to_string()
            }
        };
        if let Err(error) = state.save_heartbeat(&record) {
            tracing::warn!("{error:#}");
        }
        notify(&[NotifyState::Status(&status_line)]);
    }
}

async fn wait_for_gate(config: &Config, progress: &Progress) {
    let mut reported = false;
    loop {
        progress.mark();
        match gate::inspect_marker(&config.restore_marker) {
            Ok(MarkerState::Present) => return,
            state => {
                if !reported {
                    let why = match state {
                        Ok(MarkerState::Invalid(why)) => format!("the marker {why}"),
                        Err(error) => format!("cannot inspect the marker: {error}"),
                        _ => "no marker yet".to_string(),
                    };
                    tracing::info!(
                        "waiting for the restore gate before registering: {why} ({})",
                        config.restore_marker.display()
                    );
                    reported = true;
                }
            }
        }
        tokio::time::sleep(GATE_POLL).await;
    }
}

/// Sends one heartbeat, following whose metadata it is.
async fn beat(
    store: &dyn ObjectStore,
    config: &Config,
    settings: &HeartbeatSettings,
    state: &StateDir,
) -> anyhow::Result<Beat> {
    let registration = state.registration(&config.machine_id.to_string());
    let registered = registration
        .as_ref()
        .is_some_and(|record| record.state == RegistrationState::Registered);
    let meta_pending = registered
        && registration
            .as_ref()
            .is_some_and(|record| record.vps_meta_pending);
    let meta_key = config.object_key(keys::VPS_META);
    for _ in 0..META_ATTEMPTS {
        let object = store.get(&meta_key).await?;
        let meta = match &object {
            None => None,
            Some(object) => Some(
                VpsMeta::parse(&object.body).map_err(|reason| anyhow!("{meta_key} {reason}"))?,
            ),
        };
        // Every write below is conditional on the metadata this read saw.
        let claim = match &object {
            None => WriteCondition::IfAbsent,
            Some(object) => match &object.info.etag {
                Some(etag) => WriteCondition::IfMatch(etag.clone()),
                None => return Err(anyhow!("{meta_key} came without an ETag")),
            },
        };
        // While the host still owes the metadata, the machine it names is
        // the one this host replaces, as before registration.
        let ownership = vps_meta::ownership(
            meta.as_ref(),
            config.machine_id,
            registered && !meta_pending,
        );
        let outcome = match ownership {
            Ownership::Superseded { other } => return Ok(Beat::Superseded { other }),
            Ownership::NotRegisteredYet { other } if !meta_pending => {
                return Ok(Beat::NotRegisteredYet { other })
            }
            Ownership::NotRegisteredYet { .. } => {
                write_own_meta(store, config, settings, claim).await
            }
            // A superseded host does not reclaim metadata that went
            // missing: the replacement that superseded it owns the bucket.
            Ownership::Unclaimed if registered => match state.heartbeat().superseded_by {
                Some(other) => return Ok(Beat::Superseded { other }),
                None => write_own_meta(store, config, settings, claim).await,
            },
            Ownership::Unclaimed => Ok(()),
            Ownership::Ours => {
                let document = meta.expect("ours implies present").document;
                refresh_last_sync(store, &meta_key, document, claim).await
            }
        };
        match outcome {
            Ok(()) => {}
            Err(error) if is_precondition_failed(&error) => {
                tracing::info!("{meta_key} changed under the heartbeat; reading it again");
                continue;
            }
            Err(error) => return Err(error),
        }
        if meta_pending {
            if let Some(mut record) = registration {
                record.vps_meta_pending = false;
                state.save_registration(&record)?;
            }
        }
        write_host_status(store, config, state, settings).await?;
        return Ok(Beat::Sent);
    }
    Err(anyhow!(
        "{meta_key} kept changing during {META_ATTEMPTS} attempts"
    ))
}

fn is_precondition_failed(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<StoreError>()
        .is_some_and(StoreError::is_precondition_failed)
}

/// Writes the metadata back with a fresh `lastSyncAt` and every other
/// field as it was, on `condition`: unchanged since the heartbeat read it.
async fn refresh_last_sync(
    store: &dyn ObjectStore,
    key: &str,
    mut document: serde_json::Map<String, Value>,
    condition: WriteCondition,
) -> anyhow::Result<()> {
    document.insert("lastSyncAt".into(), Value::String(now_iso()));
    let body = Bytes::from(serde_json::to_vec_pretty(&document)?);
    store.put(key, body, "application/json", condition).await?;
    Ok(())
}

fn now_iso() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

async fn write_host_status(
    store: &dyn ObjectStore,
    config: &Config,
    state: &StateDir,
    settings: &HeartbeatSettings,
) -> anyhow::Result<()> {
    let report = status::gather(config, state, settings.backup_interval);
    let last_backup = report.backup.last_success.as_ref().map(|success| {
        json!({
            "key": success.snapshot,
            "size": success.size,
            "finishedAt": success.finished_at.to_rfc3339_opts(SecondsFormat::Secs, true),
            "durationSeconds": success.duration_seconds,
        })
    });
    let document = json!({
        "version": 1,
        "machineId": config.machine_id.to_string(),
        "agentVersion": status::AGENT_VERSION,
        "imageVersion": config.image_version,
        "heartbeatAt": now_iso(),
        "healthy": report.health.healthy,
        "healthReason": report.health.reason,
        "restore": report.restore.as_ref().map(|record| json!({
            "outcome": record.outcome,
            "snapshot": record.snapshot,
            "finishedAt": record.finished_at.to_rfc3339_opts(SecondsFormat::Secs, true),
        })),
        "lastBackup": last_backup,
        "backupFailuresTotal": report.backup.failures_total,
    });
    store
        .put(
            &config.object_key(keys::HOST_STATUS),
            Bytes::from(serde_json::to_vec_pretty(&document)?),
            "application/json",
            WriteCondition::Unconditional,
        )
        .await?;
    Ok(())
}

/// Writes `vps-meta.json` for this machine, as the platform would have, on
/// `condition`: still absent, or still the previous machine's as read.
async fn write_own_meta(
    store: &dyn ObjectStore,
    config: &Config,
    settings: &HeartbeatSettings,
    condition: WriteCondition,
) -> anyhow::Result<()> {
    let identity = instance::resolve(settings)?;
    let key = config.object_key(keys::VPS_META);
    let now = now_iso();
    let mut document = serde_json::Map::new();
    document.insert("version".into(), json!(1));
    document.insert("userId".into(), json!(config.user_id));
    document.insert("machineId".into(), json!(config.machine_id.to_string()));
    document.insert("hetznerServerId".into(), json!(identity.server_id));
    document.insert("imageVersion".into(), json!(config.image_version));
    document.insert("status".into(), json!("running"));
    document.insert("provisionedAt".into(), json!(now));
    document.insert("lastSyncAt".into(), json!(now));
    document.insert("publicIPv4".into(), json!(identity.ipv4.to_string()));
    if let Some(ipv6) = identity.ipv6 {
        document.insert("publicIPv6".into(), json!(ipv6.to_string()));
    }
    let body = serde_json::to_vec_pretty(&Value::Object(document))?;
    store
        .put(&key, Bytes::from(body), "application/json", condition)
        .await?;
    tracing::info!("wrote {key} for machine {}", config.machine_id);
    Ok(())
}
