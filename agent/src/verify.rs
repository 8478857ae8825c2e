//! `matrix-agent verify`: proves a snapshot is restorable without touching
//! the database, by streaming it through a hash and through `pg_restore`
//! into `/dev/null`, which reads and decompresses every entry.

use std::io::Write;
use std::process::Stdio;

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::config::Config;
use crate::keys::{self, LatestPointer, SnapshotKey};
use crate::postgres;
use crate::progress::Progress;
use crate::size::format_bytes;
use crate::store;

/// Verifies `snapshot`, or the one `system/db/latest` names.
pub async fn run(config: &Config, snapshot: Option<&str>) -> anyhow::Result<()> {
    let store = store::open(&config.store).await?;
    let snapshot = match snapshot {
        Some(text) => SnapshotKey::parse(text)
            .map_err(|reason| anyhow!("the snapshot key {text:?} {reason}"))?,
        None => {
            let key = config.object_key(keys::LATEST);
            let object = store
                .get(&key)
                .await?
                .ok_or_else(|| anyhow!("nothing to verify: {key} does not exist yet"))?;
            LatestPointer::parse(&object.body)
                .map_err(|reason| anyhow!("{key} {reason}"))?
                .snapshot
        }
    };
    let key = config.object_key(&snapshot.key());
    let info = store
        .head(&key)
        .await?
        .ok_or_else(|| anyhow!("the snapshot {key} does not exist"))?;

    let pg_restore = postgres::find_newest_tool("pg_restore", &config.pg_install_root).await?;
    let mut child = Command::new(&pg_restore.path)
        .args(["--file=/dev/null"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", pg_restore.path.display()))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");

    let progress = Progress::start("verifying snapshot", Some(info.size));
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut stream = store.read_from(&key, 0, info.etag.as_deref()).await?;
    let mut pipe_closed = false;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        hasher.update(&chunk);
        size += chunk.len() as u64;
        progress.advance(chunk.len() as u64);
        if !pipe_closed && stdin.write_all(&chunk).await.is_err() {
            // pg_restore stopped reading; its exit status says why.
            pipe_closed = true;
        }
    }
    drop(stdin);
    let output = child.wait_with_output().await?;
    let sha256 = hex::encode(hasher.finalize());

    let mut problems = Vec::new();
    if size != info.size {
        problems.push(format!(
            "read {size} bytes but the object has {}",
            info.size
        ));
    }
    match info.metadata.get("sha256") {
        Some(expected) if !expected.eq_ignore_ascii_case(&sha256) => problems.push(format!(
            "SHA-256 {sha256} does not match the recorded {expected}"
        )),
        Some(_) => {}
        None => tracing::warn!("{key} carries no SHA-256 metadata; only the archive was checked"),
    }
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        problems.push(format!(
            "pg_restore cannot read the archive: {}",
            stderr.trim()
        ));
    }
    if !problems.is_empty() {
        bail!(
            "the snapshot {key} failed verification: {}",
            problems.join("; ")
        );
    }
    // A closed stdout (`| head`) must not turn a passed check into a panic.
    let _ = writeln!(
        std::io::stdout(),
        "{} verified: {}, sha256 {sha256}, every archive entry readable by {}",
        snapshot,
        format_bytes(size),
        pg_restore.version
    );
    Ok(())
}
