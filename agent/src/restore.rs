//! `matrix-agent restore`: the gate before the gateway. Restores the
//! snapshot `system/db/latest` names, or opens the gate on a fresh host,
//! and fails closed on anything it cannot be sure of.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use chrono::Utc;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio_postgres::Client;

use crate::config::{self, Config, Env};
use crate::gate::{self, MarkerState, RestoreDecision};
use crate::keys::{self, SnapshotKey};
use crate::postgres::{self, PgTool};
use crate::progress::Progress;
use crate::size::{format_bytes, format_duration};
use crate::state::{RestoreOutcome, RestoreRecord, StateDir};
use crate::store::{self, FailureKind, ObjectInfo, ObjectStore, StoreError};

/// Attempts to resume a download whose connection broke.
const DOWNLOAD_ATTEMPTS: u32 = 5;

/// Runs the gate. An existing regular marker ends it at once, before the
/// rest of the configuration is even read, so that a reboot never waits on
/// the network or the database and never restores over newer local data.
pub async fn run(env: &Env) -> anyhow::Result<()> {
    let marker = config::restore_marker_path(env);
    match gate::inspect_marker(&marker)
        .with_context(|| format!("cannot inspect the restore marker {}", marker.display()))?
    {
        MarkerState::Present => {
            tracing::info!(
                "the restore gate is already open ({} exists); nothing to do",
                marker.display()
            );
            return Ok(());
        }
        MarkerState::Invalid(why) => bail!(
            "the restore marker {} {why}, so the gate stays shut; the agent only ever writes \
             a regular file there. Find out what created it, remove it, and run \
             `systemctl restart matrix-restore`",
            marker.display()
        ),
        MarkerState::Absent => {}
    }

    let config = Config::from_env(env)?;
    let state = StateDir::open(&config.state_dir)?;
    let started = Instant::now();
    let result = restore(&config, &state, started).await;
    if let Err(error) = &result {
        let record = RestoreRecord {
            outcome: RestoreOutcome::Failed,
            snapshot: None,
            size: None,
            sha256: None,
            finished_at: Utc::now(),
            duration_seconds: started.elapsed().as_secs_f64(),
            error: Some(format!("{error:#}")),
        };
        if let Err(save_error) = state.save_restore(&record) {
            tracing::warn!("{save_error:#}");
        }
    }
    result
}

async fn restore(config: &Config, state: &StateDir, started: Instant) -> anyhow::Result<()> {
    let store = store::open(&config.store).await?;
    tracing::info!(
        "restore starting: {} from {} under {}",
        postgres::describe(&config.postgres),
        store.describe(),
        config.prefix
    );
    let client = postgres::wait_and_connect(&config.postgres, config.pg_wait).await?;

    let meta_exists = read_definitely(store.as_ref(), &config.object_key(keys::VPS_META))
        .await?
        .is_some();
    let pointer = read_definitely(store.as_ref(), &config.object_key(keys::LATEST)).await?;
    let decision = gate::decide(meta_exists, pointer.as_deref()).map_err(|reason| {
        anyhow!(
            "{reason}; the gate stays shut. An operator must point system/db/latest at a \
             valid snapshot (pattern {}) and run `systemctl restart matrix-restore`",
            keys::SNAPSHOT_PATTERN
        )
    })?;

    let record = match decision {
        RestoreDecision::FreshHost { registered_before } => {
            let why = if registered_before {
                "machine metadata exists but no snapshot was ever made"
            } else {
                "the bucket holds neither machine metadata nor a snapshot"
            };
            tracing::info!("fresh host: {why}, so there is nothing to restore");
            RestoreRecord {
                outcome: RestoreOutcome::FreshHost,
                snapshot: None,
                size: None,
                sha256: None,
                finished_at: Utc::now(),
                duration_seconds: started.elapsed().as_secs_f64(),
                error: None,
            }
        }
        RestoreDecision::Restore(snapshot) => {
            let server = postgres::server_version(&client).await?;
            let restored = restore_snapshot(
                store.as_ref(),
                config,
                state,
                &snapshot,
                server.major,
                &client,
            )
            .await?;
            tracing::info!("running ANALYZE so the planner has statistics");
            client
                // A non-superuser owner cannot analyze shared catalogs; the
                // server warns once per catalog, which is noise here.
                .batch_execute("SET client_min_messages TO error; ANALYZE")
                .await
                .map_err(|error| anyhow!("ANALYZE failed: {}", postgres::error_summary(&error)))?;
            RestoreRecord {
                outcome: RestoreOutcome::Restored,
                snapshot: Some(snapshot.key()),
                size: Some(restored.size),
                sha256: Some(restored.sha256),
                finished_at: Utc::now(),
                duration_seconds: started.elapsed().as_secs_f64(),
                error: None,
            }
        }
    };

    let marker_content = serde_json::to_string(&record)? + "\n";
    gate::write_marker(&config.restore_marker, &marker_content)?;
    // The gate is open now; a record that cannot be written only costs the
    // status report its detail.
    if let Err(error) = state.save_restore(&record) {
        tracing::warn!("{error:#}");
    }
    tracing::info!(
        "restore gate open ({}) after {}",
        config.restore_marker.display(),
        format_duration(started.elapsed())
    );
    Ok(())
}

/// Reads a small object; only a definite not-found counts as absent. Any
/// other failure fails the restore, because opening the gate on an empty
/// database during an outage would let its next backup replace the real one.
async fn read_definitely(store: &dyn ObjectStore, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
    match store.get(key).await {
        Ok(object) => Ok(object.map(|object| object.body.to_vec())),
        Err(error) => Err(anyhow!(
            "{error}; without a definite answer the restore cannot tell a fresh host from \
             one with backups, so the gate stays shut. Check the network, the endpoint and \
             the credentials, then run `systemctl restart matrix-restore`"
        )),
    }
}

struct Restored {
    size: u64,
    sha256: String,
}

async fn restore_snapshot(
    store: &dyn ObjectStore,
    config: &Config,
    state: &StateDir,
    snapshot: &SnapshotKey,
    server_major: u32,
    client: &Client,
) -> anyhow::Result<Restored> {
    let key = config.object_key(&snapshot.key());
    let info = store
        .head(&key)
        .await
        .map_err(|error| {
            anyhow!(
                "cannot read the snapshot {snapshot}: {error}; the gate stays shut. Check the \
                 network and the bucket, then run `systemctl restart matrix-restore`"
            )
        })?
        .ok_or_else(|| {
            anyhow!(
                "system/db/latest names {snapshot}, but that object does not exist; the gate \
                 stays shut. Point system/db/latest at an existing snapshot and run \
                 `systemctl restart matrix-restore`"
            )
        })?;
    if info.size == 0 {
        bail!(
            "the snapshot {snapshot} is empty; the gate stays shut. Point system/db/latest at \
             an earlier snapshot and run `systemctl restart matrix-restore`"
        );
    }
    check_size_metadata(&info, snapshot)?;
    let pg_restore =
        postgres::find_tool("pg_restore", server_major, &config.pg_install_root).await?;

    let download_dir = state.download_dir()?;
    remove_leftover_downloads(&download_dir);
    check_free_disk(&download_dir, info.size, config.disk_reserve)?;
    let file = download_dir.join(format!(
        "{}.dump",
        snapshot.taken_at().format("%Y-%m-%dT%H%MZ")
    ));
    let result = async {
        let sha256 = download(store, &key, &info, &file).await?;
        match info.metadata.get("sha256") {
            Some(expected) if !expected.eq_ignore_ascii_case(&sha256) => bail!(
                "the snapshot {snapshot} does not match its SHA-256 (stored {expected}, \
                 downloaded {sha256}); it is corrupt or was replaced, so the gate stays shut. \
                 Point system/db/latest at another snapshot and run `systemctl restart \
                 matrix-restore`"
            ),
            Some(_) => tracing::info!("SHA-256 verified: {sha256}"),
            None => tracing::warn!(
                "the snapshot {snapshot} carries no SHA-256 metadata (made by an older \
                 tool); its size matched"
            ),
        }
        check_archive(&pg_restore, &file, config).await?;
        let mode = prepare_target(client, config).await?;
        run_pg_restore(&pg_restore, &file, config, mode).await?;
        Ok(Restored {
            size: info.size,
            sha256,
        })
    }
    .await;
    if let Err(error) = tokio::fs::remove_file(&file).await {
        if error.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(
                "cannot remove the downloaded dump {}: {error}",
                file.display()
            );
        }
    }
    result
}

fn check_size_metadata(info: &ObjectInfo, snapshot: &SnapshotKey) -> anyhow::Result<()> {
    if let Some(recorded) = info.metadata.get("size") {
        if recorded.parse::<u64>().ok() != Some(info.size) {
            bail!(
                "the snapshot {snapshot} holds {} bytes but its metadata records {recorded}; \
                 it is incomplete or was replaced, so the gate stays shut",
                info.size
            );
        }
    }
    Ok(())
}

/// Removes the files an earlier restore left in the download directory
/// when it was killed. Nothing resumes them, and they would take the free
/// disk the new download needs.
fn remove_leftover_downloads(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let leftovers = entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.is_file());
    for path in leftovers {
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!("removed {}, left by an earlier restore", path.display()),
            Err(error) => tracing::warn!("cannot remove {}: {error}", path.display()),
        }
    }
}

fn check_free_disk(dir: &Path, needed: u64, reserve: u64) -> anyhow::Result<()> {
    let stats = nix::sys::statvfs::statvfs(dir)
        .with_context(|| format!("cannot read the free space of {}", dir.display()))?;
    let available = stats.blocks_available() as u64 * stats.fragment_size() as u64;
    let required = needed.saturating_add(reserve);
    if available < required {
        bail!(
            "not enough free disk in {} for the download: {} available, {} needed (the \
             snapshot's {} plus a reserve of {}); free space or lower MATRIX_DISK_RESERVE, \
             then run `systemctl restart matrix-restore`",
            dir.display(),
            format_bytes(available),
            format_bytes(required),
            format_bytes(needed),
            format_bytes(reserve)
        );
    }
    Ok(())
}

/// Downloads to `file`, hashing on the way and resuming from the last byte
/// written when the connection breaks. Every resumed read is pinned to the
/// first read's ETag, so a snapshot replaced in the middle fails the
/// download instead of mixing two objects.
async fn download(
    store: &dyn ObjectStore,
    key: &str,
    info: &ObjectInfo,
    file: &PathBuf,
) -> anyhow::Result<String> {
    tracing::info!(
        "downloading {key} ({}) to {}",
        format_bytes(info.size),
        file.display()
    );
    let mut output = tokio::fs::File::create(file)
        .await
        .with_context(|| format!("cannot create {}", file.display()))?;
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    let mut attempt = 0;
    let progress = Progress::start("downloading snapshot", Some(info.size));

    while written < info.size {
        attempt += 1;
        let failure: StoreError = match store.read_from(key, written, info.etag.as_deref()).await {
            Err(error) => error,
            Ok(mut stream) => {
                let mut broken = None;
                while let Some(chunk) = stream.next().await {
                    let chunk = match chunk {
                        Ok(chunk) => chunk,
                        Err(error) => {
                            broken = Some(error);
                            break;
                        }
                    };
                    if written + chunk.len() as u64 > info.size {
                        bail!("{key} is longer than its size; it changed during the download");
                    }
                    hasher.update(&chunk);
                    output
                        .write_all(&chunk)
                        .await
                        .with_context(|| format!("cannot write {}", file.display()))?;
                    written += chunk.len() as u64;
                    progress.advance(chunk.len() as u64);
                }
                match broken {
                    Some(error) => error,
                    None if written >= info.size => break,
                    None => StoreError::new(
                        FailureKind::Network,
                        "GET body",
                        key,
                        format!("the body ended after {written} of {} bytes", info.size),
                    ),
                }
            }
        };
        let retryable = matches!(
            failure.kind,
            FailureKind::Network | FailureKind::Timeout | FailureKind::Server
        );
        if !retryable || attempt >= DOWNLOAD_ATTEMPTS {
            bail!(
                "the download of the snapshot failed after {} of {} bytes: {failure}; the \
                 gate stays shut. Check the network and the bucket, then run `systemctl \
                 restart matrix-restore`",
                written,
                info.size
            );
        }
        tracing::warn!("{failure}; resuming at byte {written} (attempt {attempt})");
        tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
    }

    output.sync_all().await?;
    tracing::info!("download finished: {}", progress.summary());
    Ok(hex::encode(hasher.finalize()))
}

/// Reads the archive's table of contents, so a dump newer than this
/// pg_restore understands is reported before the database is touched.
async fn check_archive(pg_restore: &PgTool, file: &Path, config: &Config) -> anyhow::Result<()> {
    let output = Command::new(&pg_restore.path)
        .arg("--list")
        .arg(file)
        .env_clear()
        .envs(postgres::tool_env(&config.postgres))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("cannot run {}", pg_restore.path.display()))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    if stderr.contains("unsupported version") {
        bail!(
            "the snapshot was made by a newer pg_dump than {} ({}) can read: {}; install \
             the PostgreSQL client that made it and run `systemctl restart matrix-restore`",
            pg_restore.path.display(),
            pg_restore.version,
            stderr.trim()
        );
    }
    bail!(
        "the snapshot is not a readable pg_dump archive: {}; the gate stays shut",
        stderr.trim()
    )
}

/// How pg_restore treats what the database already holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TargetMode {
    /// The database was emptied first; restore into it as it is.
    Emptied,
    /// Drop each object just before recreating it (`--clean --if-exists`).
    CleanInPlace,
}

/// Empties the database before the restore by dropping everything the
/// connecting role owns in it. A second restore, after one that failed half
/// way, then starts from the same state as the first. pg_restore's own
/// `--clean` cannot do this: pg_restore 15 drops a partition's primary key
/// before its parent's, which the server rejects.
///
/// A superuser owns the system catalogs, so for one the agent falls back to
/// `--clean`, with that limit.
async fn prepare_target(client: &Client, config: &Config) -> anyhow::Result<TargetMode> {
    let row = client
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(|error| anyhow!("cannot read the role: {}", postgres::error_summary(&error)))?;
    let superuser: bool = row.get(0);
    if superuser {
        tracing::warn!(
            "POSTGRES_USER {} is a superuser, so the database cannot be emptied by owner; \
             restoring with --clean, which fails on partitioned tables with keys",
            config.postgres.user
        );
        return Ok(TargetMode::CleanInPlace);
    }
    tracing::info!(
        "emptying database {}: dropping everything {} owns in it",
        config.postgres.database,
        config.postgres.user
    );
    client
        .batch_execute("SET client_min_messages TO warning; DROP OWNED BY CURRENT_USER CASCADE")
        .await
        .map_err(|error| {
            anyhow!(
                "cannot empty the database before the restore: {}; the gate stays shut",
                postgres::error_summary(&error)
            )
        })?;
    Ok(TargetMode::Emptied)
}

async fn run_pg_restore(
    pg_restore: &PgTool,
    file: &Path,
    config: &Config,
    mode: TargetMode,
) -> anyhow::Result<()> {
    let jobs = config
        .restore_jobs
        .map(|jobs| jobs as usize)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get().min(4))
                .unwrap_or(1)
        });
    tracing::info!(
        "restoring into {} with {} ({jobs} jobs)",
        postgres::describe(&config.postgres),
        pg_restore.path.display()
    );
    let started = Instant::now();
    let mut command = Command::new(&pg_restore.path);
    if mode == TargetMode::CleanInPlace {
        command.args(["--clean", "--if-exists"]);
    }
    let output = command
        .args([
            "--exit-on-error",
            "--no-password",
            &format!("--jobs={jobs}"),
            &format!("--dbname={}", config.postgres.database),
        ])
        .arg(file)
        .env_clear()
        .envs(postgres::tool_env(&config.postgres))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("cannot run {}", pg_restore.path.display()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.trim().lines().collect();
        let tail = match lines[lines.len().saturating_sub(5)..].join(" / ") {
            tail if tail.is_empty() => String::new(),
            tail => format!(": {tail}"),
        };
        bail!(
            "pg_restore failed ({}){tail}; the gate stays shut. The database may be partly \
             restored: fix the cause and run `systemctl restart matrix-restore`, which \
             cleans and restores again",
            postgres::describe_exit(&output.status)
        );
    }
    tracing::info!(
        "pg_restore finished in {}",
        format_duration(started.elapsed())
    );
    Ok(())
}
