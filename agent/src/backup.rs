//! `matrix-agent backup`: stream a pg_dump into the bucket and move
//! `system/db/latest` to it, never to anything less than a whole snapshot.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use chrono::Utc;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::config::Config;
use crate::fencing;
use crate::gate::{self, MarkerState};
use crate::keys::{self, LatestPointer, SnapshotKey};
use crate::lock::BackupLock;
use crate::postgres;
use crate::progress::Progress;
use crate::size::{format_bytes, format_duration};
use crate::state::{BackupSuccess, Failure, StateDir};
use crate::store::{self, FailureKind, ObjectStore, WriteCondition};
use crate::upload;

/// How long pg_dump waits for a table lock before it gives up; a migration
/// that holds an exclusive lock longer than this fails the hour's backup
/// rather than blocking it without bound.
const LOCK_WAIT_TIMEOUT: &str = "15min";
/// The largest difference between the bucket's clock and this host's that
/// a backup accepts.
const MAX_CLOCK_SKEW: chrono::Duration = chrono::Duration::minutes(5);
/// How much of pg_dump's error output is kept for the failure message.
const STDERR_TAIL: usize = 4096;
/// Attempts to name the snapshot when its minute is taken by another run.
const NAME_ATTEMPTS: usize = 3;
/// Attempts to move the pointer when other writers keep moving it.
const POINTER_ATTEMPTS: usize = 5;
/// pg_dump's `--compress` level when MATRIX_DUMP_COMPRESSION is unset.
/// pg_dump's own default, 6, makes the single-threaded dump the slowest
/// step of a backup on a small host. In bench/results.md, level 1 dumped
/// two to three times as fast, and on data half text and half bytea the
/// dump was only a few percent larger.
const DEFAULT_DUMP_COMPRESSION: u8 = 1;

/// The pointer as read at the start, for the conditional move at the end.
struct PointerSeen {
    snapshot: Option<SnapshotKey>,
    etag: Option<String>,
}

/// Runs one backup: checks the gate, takes the lock, then streams.
pub async fn run(config: &Config) -> anyhow::Result<()> {
    require_open_gate(config)?;
    let state = StateDir::open(&config.state_dir)?;
    let _lock = BackupLock::acquire(state.path())?;
    let started = Instant::now();

    let result = tokio::select! {
        result = run_locked(config, &state, started) => result,
        signal = termination_signal() => Err(clean_up_after_signal(config, signal).await),
    };
    let mut record = state.backup();
    match &result {
        Ok(success) => {
            record.last_success = Some(success.clone());
            record.consecutive_failures = 0;
        }
        Err(error) => {
            record.last_failure = Some(Failure {
                at: Utc::now(),
                error: format!("{error:#}"),
            });
            record.failures_total += 1;
            record.consecutive_failures += 1;
        }
    }
    if let Err(error) = state.save_backup(&record) {
        tracing::warn!("{error:#}");
    }
    result.map(|_| ())
}

/// Waits for SIGTERM (`systemctl stop`) or SIGINT (Ctrl-C) and names it.
async fn termination_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without handlers the default action, exit, stays in place.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    }
}

/// Aborts what an interrupted backup left in the bucket. The backup's
/// future is gone by now, and pg_dump with it (`kill_on_drop`).
async fn clean_up_after_signal(config: &Config, signal: &str) -> anyhow::Error {
    tracing::warn!("{signal} received; stopping the backup and aborting its uploads");
    match store::open(&config.store).await {
        Ok(store) => abort_stale_uploads(store.as_ref(), config).await,
        Err(error) => tracing::warn!("cannot reach the store to abort the uploads: {error:#}"),
    }
    anyhow!(
        "backup interrupted by {signal}; its unfinished uploads were aborted, system/db/latest \
         keeps naming a complete snapshot, and the next backup removes anything else this run \
         left"
    )
}

fn require_open_gate(config: &Config) -> anyhow::Result<()> {
    let marker = &config.restore_marker;
    let state = gate::inspect_marker(marker)
        .with_context(|| format!("cannot inspect the restore marker {}", marker.display()))?;
    match state {
        MarkerState::Present => Ok(()),
        MarkerState::Absent => bail!(
            "backup refused: the restore gate is shut ({} does not exist), so this host \
             has not restored the customer's database and a backup could publish an empty \
             one; run `matrix-agent restore` first (see `systemctl status matrix-restore`)",
            marker.display()
        ),
        MarkerState::Invalid(why) => bail!(
            "backup refused: the restore marker {} {why}; the gate counts as shut until \
             `matrix-agent restore` writes a regular file there",
            marker.display()
        ),
    }
}

async fn run_locked(
    config: &Config,
    state: &StateDir,
    started: Instant,
) -> anyhow::Result<BackupSuccess> {
    let store = store::open(&config.store).await?;
    tracing::info!(
        "backup starting: {} to {} under {}",
        postgres::describe(&config.postgres),
        store.describe(),
        config.prefix
    );

    fencing::require_ownership(store.as_ref(), config, state, "backup").await?;
    let pointer = read_pointer(store.as_ref(), config).await?;
    check_clock(store.as_ref())?;

    let client = postgres::wait_and_connect(&config.postgres, config.pg_wait).await?;
    let server = postgres::server_version(&client).await?;
    let database_size = postgres::database_size(&client).await?;
    drop(client);
    let pg_dump = postgres::find_tool("pg_dump", server.major, &config.pg_install_root).await?;
    tracing::info!(
        "PostgreSQL {} ({} on disk), using {} ({})",
        server.text,
        format_bytes(database_size),
        pg_dump.path.display(),
        pg_dump.version
    );

    let snapshot = free_snapshot_name(store.as_ref(), config, pointer.snapshot.as_ref()).await?;
    abort_stale_uploads(store.as_ref(), config).await;

    let part_size = config
        .part_size
        .unwrap_or_else(|| upload::choose_part_size(database_size));
    let in_flight = upload::parts_in_flight(part_size, config.upload_concurrency);
    let staging = config.object_key(&format!(
        "{}{}-{}.dump",
        keys::STAGING_DIR,
        snapshot.taken_at().format("%Y-%m-%dT%H%MZ"),
        uuid::Uuid::new_v4()
    ));
    tracing::info!(
        "dumping into {staging} at compression level {} in parts of {} ({in_flight} in flight)",
        dump_compression(config),
        format_bytes(part_size)
    );

    let streamed = dump_to_staging(
        store.clone(),
        config,
        &pg_dump.path,
        &staging,
        part_size,
        in_flight,
    )
    .await?;

    let upload_token = uuid::Uuid::new_v4().to_string();
    let metadata = HashMap::from([
        ("sha256".to_string(), streamed.sha256.clone()),
        ("size".to_string(), streamed.size.to_string()),
        ("machine-id".to_string(), config.machine_id.to_string()),
        ("pg-server-version".to_string(), server.text.clone()),
        ("pg-dump-version".to_string(), pg_dump.version.clone()),
        ("part-size".to_string(), part_size.to_string()),
        ("created-at".to_string(), Utc::now().to_rfc3339()),
        ("upload-token".to_string(), upload_token.clone()),
    ]);
    let publish = publish_snapshot(
        store.as_ref(),
        config,
        &staging,
        snapshot,
        streamed.size,
        &metadata,
    )
    .await;
    if let Err(error) = store.delete(&staging).await {
        tracing::warn!("cannot delete the staging object: {error}; the next backup retries");
    }
    let snapshot = publish?;
    verify_stored(
        store.as_ref(),
        config,
        &snapshot,
        streamed.size,
        &streamed.sha256,
    )
    .await?;

    // Fencing: a replacement may have registered while this host dumped.
    fencing::require_ownership(store.as_ref(), config, state, "backup").await?;
    let pointer_moved = move_pointer(store.as_ref(), config, pointer, &snapshot).await?;

    let duration = started.elapsed();
    tracing::info!(
        "backup finished: {} ({}, sha256 {}) in {}",
        snapshot,
        format_bytes(streamed.size),
        streamed.sha256,
        format_duration(duration)
    );
    Ok(BackupSuccess {
        snapshot: snapshot.key(),
        size: streamed.size,
        sha256: streamed.sha256,
        part_size,
        parts: streamed.parts.len() as u32,
        finished_at: Utc::now(),
        duration_seconds: duration.as_secs_f64(),
        pointer_moved,
    })
}

/// Refuses when the bucket's clock and this host's differ by more than
/// [`MAX_CLOCK_SKEW`]: snapshot names come from this host's clock, and a
/// wrong clock could name a snapshot older than the one `latest` holds.
fn check_clock(store: &dyn ObjectStore) -> anyhow::Result<()> {
    let Some(offset) = store.clock_offset() else {
        return Ok(());
    };
    if offset.abs() > MAX_CLOCK_SKEW {
        let direction = if offset > chrono::Duration::zero() {
            "behind"
        } else {
            "ahead of"
        };
        bail!(
            "backup refused: this host's clock is {}s {direction} the bucket's, more than \
             the {}s allowed, and snapshot names come from this host's clock; fix time \
             synchronisation (`timedatectl status`) and run the backup again",
            offset.num_seconds().abs(),
            MAX_CLOCK_SKEW.num_seconds()
        );
    }
    Ok(())
}

async fn read_pointer(store: &dyn ObjectStore, config: &Config) -> anyhow::Result<PointerSeen> {
    let key = config.object_key(keys::LATEST);
    let object = store
        .get(&key)
        .await
        .context("backup refused: cannot read the latest pointer")?;
    Ok(match object {
        None => PointerSeen {
            snapshot: None,
            etag: None,
        },
        Some(object) => {
            let snapshot = match LatestPointer::parse(&object.body) {
                Ok(pointer) => Some(pointer.snapshot),
                Err(reason) => {
                    tracing::warn!("{key} {reason}; this backup will replace it");
                    None
                }
            };
            PointerSeen {
                snapshot,
                etag: object.info.etag,
            }
        }
    })
}

/// Picks the current minute's snapshot name, or a later one when it is
/// taken; refuses when `latest` is ahead of this host's clock.
async fn free_snapshot_name(
    store: &dyn ObjectStore,
    config: &Config,
    current: Option<&SnapshotKey>,
) -> anyhow::Result<SnapshotKey> {
    let now = SnapshotKey::for_minute(Utc::now());
    if let Some(current) = current {
        if *current > now {
            bail!(
                "backup refused: system/db/latest names {current}, which is later than this \
                 host's clock ({}); the pointer never moves backwards, so check the clock \
                 with `timedatectl`",
                Utc::now().format("%Y-%m-%d %H:%M:%SZ")
            );
        }
    }
    loop {
        let candidate = SnapshotKey::for_minute(Utc::now());
        let taken_by_pointer = current.is_some_and(|current| *current >= candidate);
        let key = config.object_key(&candidate.key());
        let exists = taken_by_pointer
            || store
                .head(&key)
                .await
                .context("cannot check whether the snapshot name is free")?
                .is_some();
        if !exists {
            return Ok(candidate);
        }
        tracing::info!("{candidate} already exists; waiting for the next minute");
        wait_for_minute_after(&candidate).await;
    }
}

async fn wait_for_minute_after(snapshot: &SnapshotKey) {
    let next = snapshot.next_minute().taken_at();
    let wait = (next - Utc::now())
        .to_std()
        .unwrap_or_default()
        .saturating_add(Duration::from_millis(200));
    tokio::time::sleep(wait).await;
}

/// Aborts uploads left by earlier runs that were killed or lost their
/// connection. The lock guarantees none of them belongs to a live run on
/// this host, and a superseded host is refused before it gets here.
async fn abort_stale_uploads(store: &dyn ObjectStore, config: &Config) {
    for dir in [keys::STAGING_DIR, keys::SNAPSHOTS_DIR] {
        let prefix = config.object_key(dir);
        let uploads = match store.list_multipart_uploads(&prefix).await {
            Ok(uploads) => uploads,
            Err(error) => {
                tracing::warn!("cannot list unfinished uploads: {error}");
                continue;
            }
        };
        for upload in uploads {
            match store.abort_multipart(&upload.key, &upload.upload_id).await {
                Ok(()) => tracing::info!("aborted an unfinished upload of {}", upload.key),
                Err(error) => tracing::warn!("cannot abort an unfinished upload: {error}"),
            }
        }
    }
    if let Ok(keys) = store.list_keys(&config.object_key(keys::STAGING_DIR)).await {
        for key in keys {
            match store.delete(&key).await {
                Ok(()) => tracing::info!("deleted the leftover staging object {key}"),
                Err(error) => tracing::warn!("cannot delete a leftover staging object: {error}"),
            }
        }
    }
}

fn dump_compression(config: &Config) -> u8 {
    config.dump_compression.unwrap_or(DEFAULT_DUMP_COMPRESSION)
}

/// Runs pg_dump and streams its output into a completed staging object.
/// On any failure, pg_dump's included, the upload is aborted.
async fn dump_to_staging(
    store: Arc<dyn ObjectStore>,
    config: &Config,
    pg_dump: &std::path::Path,
    staging: &str,
    part_size: u64,
    in_flight: usize,
) -> anyhow::Result<upload::StreamedObject> {
    let upload_id = store
        .create_multipart(staging, &HashMap::new())
        .await
        .context("cannot start the upload")?;
    let result = dump_and_upload(
        store.clone(),
        config,
        pg_dump,
        staging,
        &upload_id,
        part_size,
        in_flight,
    )
    .await;
    let streamed = match result {
        Ok(streamed) => streamed,
        Err(error) => {
            if let Err(abort_error) = store.abort_multipart(staging, &upload_id).await {
                tracing::warn!(
                    "cannot abort the failed upload: {abort_error}; the next backup retries"
                );
            } else {
                tracing::info!("aborted the upload of {staging}");
            }
            return Err(error);
        }
    };
    // The staging key is unique to this run, so an object of the size
    // streamed there can only be this upload.
    let completed = upload::complete_upload(
        store.as_ref(),
        staging,
        &upload_id,
        &streamed.parts,
        WriteCondition::Unconditional,
        |info| info.size == streamed.size,
    )
    .await;
    if let Err(error) = completed {
        let _ = store.abort_multipart(staging, &upload_id).await;
        return Err(error).context("cannot complete the upload");
    }
    Ok(streamed)
}

async fn dump_and_upload(
    store: Arc<dyn ObjectStore>,
    config: &Config,
    pg_dump: &std::path::Path,
    staging: &str,
    upload_id: &str,
    part_size: u64,
    in_flight: usize,
) -> anyhow::Result<upload::StreamedObject> {
    let mut command = Command::new(pg_dump);
    command.args([
        "--format=custom",
        "--no-password",
        &format!("--lock-wait-timeout={LOCK_WAIT_TIMEOUT}"),
    ]);
    command.arg(format!("--compress={}", dump_compression(config)));
    let mut child = command
        .env_clear()
        .envs(postgres::tool_env(&config.postgres))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", pg_dump.display()))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let stderr_task = tokio::spawn(read_tail(stderr));

    let progress = Arc::new(Progress::start("uploading dump", None));
    let uploaded = upload::upload_parts(
        store,
        staging,
        upload_id,
        stdout,
        part_size,
        in_flight,
        progress.clone(),
    )
    .await;
    if uploaded.is_err() {
        let _ = child.start_kill();
    }
    let status = child.wait().await.context("cannot wait for pg_dump")?;
    let stderr_tail = stderr_task.await.unwrap_or_default();
    let stderr_tail = stderr_tail.trim();

    // When the upload failed, pg_dump was killed because of it: report the
    // upload's error rather than the kill.
    let streamed = uploaded.context(
        "cannot upload the dump; the upload was aborted and system/db/latest was not moved",
    )?;
    if !status.success() {
        let reason = postgres::describe_exit(&status);
        let detail = if stderr_tail.is_empty() {
            String::new()
        } else {
            format!(": {}", last_lines(stderr_tail, 5))
        };
        bail!(
            "pg_dump {reason}{detail}; the upload was aborted and system/db/latest was not \
             moved"
        );
    }
    if !stderr_tail.is_empty() {
        tracing::warn!("pg_dump: {}", last_lines(stderr_tail, 5));
    }
    if streamed.size == 0 {
        bail!("pg_dump exited successfully but wrote nothing; the upload was aborted");
    }
    tracing::info!("dump uploaded: {}", progress.summary());
    Ok(streamed)
}

/// Reads a child's stderr to its end, keeping only the last bytes.
async fn read_tail(mut stderr: tokio::process::ChildStderr) -> String {
    let mut tail: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(read) = stderr.read(&mut chunk).await {
        if read == 0 {
            break;
        }
        tail.extend_from_slice(&chunk[..read]);
        if tail.len() > STDERR_TAIL {
            tail.drain(..tail.len() - STDERR_TAIL);
        }
    }
    String::from_utf8_lossy(&tail).into_owned()
}

/// Joins the last `count` non-blank lines of `text` into one line, without
/// the indentation libpq gives its continuation lines.
fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    lines[lines.len().saturating_sub(count)..].join(" / ")
}

/// Copies the staging object to the snapshot key with its metadata,
/// created only if absent; when another run took the minute, takes the
/// next free one. A retried request whose first attempt succeeded is
/// recognised by the upload token in the metadata.
///
/// The copy is what lets the snapshot carry the SHA-256 as metadata, which
/// S3 fixes when an upload starts, before the hash is known. It runs inside
/// the store, in parts of [`upload::COPY_PART_SIZE`], so a dump of up to
/// 5 GiB costs three requests.
async fn publish_snapshot(
    store: &dyn ObjectStore,
    config: &Config,
    staging: &str,
    mut snapshot: SnapshotKey,
    size: u64,
    metadata: &HashMap<String, String>,
) -> anyhow::Result<SnapshotKey> {
    for _ in 0..NAME_ATTEMPTS {
        let key = config.object_key(&snapshot.key());
        match upload::copy_object(store, staging, &key, size, metadata).await {
            Ok(()) => return Ok(snapshot),
            Err(error) if error.is_precondition_failed() => {
                let existing = store.head(&key).await?;
                let ours = existing
                    .as_ref()
                    .and_then(|info| info.metadata.get("upload-token"))
                    == metadata.get("upload-token");
                if ours {
                    return Ok(snapshot);
                }
                tracing::info!(
                    "{snapshot} was created by another run; waiting for the next minute"
                );
                wait_for_minute_after(&snapshot).await;
                snapshot = SnapshotKey::for_minute(Utc::now()).max(snapshot.next_minute());
            }
            Err(error) => {
                return Err(error).context(format!("cannot create the snapshot {snapshot}"));
            }
        }
    }
    bail!("cannot find a free snapshot name after {NAME_ATTEMPTS} minutes; another writer keeps taking them")
}

/// Checks that the stored snapshot has the size and SHA-256 that were sent.
async fn verify_stored(
    store: &dyn ObjectStore,
    config: &Config,
    snapshot: &SnapshotKey,
    size: u64,
    sha256: &str,
) -> anyhow::Result<()> {
    let key = config.object_key(&snapshot.key());
    let info = store
        .head(&key)
        .await
        .with_context(|| {
            format!("cannot check the stored snapshot {snapshot}; system/db/latest was not moved")
        })?
        .ok_or_else(|| anyhow!("{key} is missing right after it was created"))?;
    if info.size != size {
        bail!(
            "{key} holds {} bytes but {size} were uploaded; system/db/latest was not moved",
            info.size
        );
    }
    if info.metadata.get("sha256").map(String::as_str) != Some(sha256) {
        bail!("{key} lacks the SHA-256 metadata that was sent; system/db/latest was not moved");
    }
    Ok(())
}

/// Moves `latest` to `snapshot` with a conditional write against what was
/// read, re-reading when another writer moved it first. Returns false when
/// the pointer already names a newer snapshot, which is left in place.
async fn move_pointer(
    store: &dyn ObjectStore,
    config: &Config,
    mut seen: PointerSeen,
    snapshot: &SnapshotKey,
) -> anyhow::Result<bool> {
    let key = config.object_key(keys::LATEST);
    let body = Bytes::from(
        LatestPointer {
            snapshot: snapshot.clone(),
        }
        .body(),
    );
    for _ in 0..POINTER_ATTEMPTS {
        if seen.snapshot.as_ref() == Some(snapshot) {
            // A write whose response was lost and whose retry then failed
            // the If-Match: snapshot keys are created only if absent, so a
            // pointer naming this key was written by this run.
            tracing::info!("system/db/latest now names {snapshot}");
            return Ok(true);
        }
        if !keys::pointer_may_advance(seen.snapshot.as_ref(), snapshot) {
            tracing::warn!(
                "system/db/latest already names {}, newer than {snapshot}; it stays",
                seen.snapshot
                    .as_ref()
                    .map(SnapshotKey::key)
                    .unwrap_or_default()
            );
            return Ok(false);
        }
        let condition = match &seen.etag {
            Some(etag) => WriteCondition::IfMatch(etag.clone()),
            None => WriteCondition::IfAbsent,
        };
        match store
            .put(&key, body.clone(), "text/plain; charset=utf-8", condition)
            .await
        {
            Ok(_) => {
                tracing::info!("system/db/latest now names {snapshot}");
                return Ok(true);
            }
            Err(error)
                if matches!(
                    error.kind,
                    FailureKind::PreconditionFailed | FailureKind::NotFound
                ) =>
            {
                tracing::info!("system/db/latest changed while this backup ran; reading it again");
                seen = read_pointer(store, config).await?;
            }
            Err(error) => {
                return Err(error).context(format!(
                    "the snapshot {snapshot} is stored but system/db/latest was not moved to it"
                ));
            }
        }
    }
    bail!(
        "system/db/latest kept changing during {POINTER_ATTEMPTS} attempts; the snapshot \
         {snapshot} is stored but the pointer was not moved"
    )
}
