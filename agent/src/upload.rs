//! Streaming multipart uploads: fixed-size parts read from a pipe, hashed
//! on the way, and sent with a bounded number in flight.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{bail, Context};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::progress::Progress;
use crate::store::{
    CompletedPart, FailureKind, ObjectInfo, ObjectStore, StoreError, WriteCondition,
};

/// The smallest part S3 and R2 accept, except for the last one.
pub const MIN_PART_SIZE: u64 = 5 << 20;
/// The part size for databases small enough that it keeps them under
/// [`MAX_PARTS`].
pub const DEFAULT_PART_SIZE: u64 = 8 << 20;
/// Maximum number of parts in one upload.
pub const MAX_PARTS: u64 = 10_000;
/// The largest part S3 accepts, used for server-side copies: the fewer the
/// parts, the fewer requests, and no bytes pass through this host.
pub const COPY_PART_SIZE: u64 = 5 << 30;
const COPIES_IN_FLIGHT: usize = 2;
/// Memory for part buffers; the number of parts in flight shrinks as the
/// part size grows so the agent's footprint stays flat.
pub const PART_MEMORY_BUDGET: u64 = 32 << 20;

/// Chooses the part size for a database of `database_size` bytes on disk.
///
/// A custom-format dump is usually smaller than the database because it
/// holds no indexes and is compressed, but incompressible data can make it
/// as large; twice the on-disk size keeps a wide margin under the limit.
pub fn choose_part_size(database_size: u64) -> u64 {
    let expected_dump = database_size.saturating_mul(2);
    let needed = expected_dump.div_ceil(MAX_PARTS);
    let rounded = needed.div_ceil(1 << 20) << 20;
    rounded.max(DEFAULT_PART_SIZE)
}

/// Returns how many parts may be buffered and in flight at once.
pub fn parts_in_flight(part_size: u64, configured: usize) -> usize {
    let by_budget = (PART_MEMORY_BUDGET / part_size.max(1)).max(1) as usize;
    configured.max(1).min(by_budget)
}

/// What was uploaded.
#[derive(Debug)]
pub struct StreamedObject {
    pub size: u64,
    pub sha256: String,
    pub parts: Vec<CompletedPart>,
}

/// Reads `reader` to its end in parts of exactly `part_size` bytes (the last
/// may be shorter) and uploads them to an upload already created. Memory is
/// bounded by `part_size * in_flight`: a buffer is only allocated once a
/// slot is free. Returns on the first failed part; the caller aborts.
pub async fn upload_parts<R>(
    store: Arc<dyn ObjectStore>,
    key: &str,
    upload_id: &str,
    mut reader: R,
    part_size: u64,
    in_flight: usize,
    progress: Arc<Progress>,
) -> anyhow::Result<StreamedObject>
where
    R: AsyncRead + Unpin,
{
    let slots = Arc::new(Semaphore::new(in_flight));
    let mut tasks: JoinSet<Result<CompletedPart, StoreError>> = JoinSet::new();
    let mut parts = Vec::new();
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut number = 0i32;

    loop {
        let slot = slots.clone().acquire_owned().await?;
        while let Some(finished) = tasks.try_join_next() {
            parts.push(finished.context("an upload task panicked")??);
        }

        let mut buffer = vec![0u8; part_size as usize];
        let mut filled = 0;
        while filled < buffer.len() {
            let read = reader
                .read(&mut buffer[filled..])
                .await
                .context("cannot read the dump stream")?;
            if read == 0 {
                break;
            }
            filled += read;
        }
        if filled == 0 {
            break;
        }
        buffer.truncate(filled);
        hasher.update(&buffer);
        size += filled as u64;
        number += 1;
        if number as u64 > MAX_PARTS {
            bail!(
                "the dump needs more than {MAX_PARTS} parts of {} bytes; set \
                 MATRIX_PART_SIZE larger or leave it unset",
                part_size
            );
        }

        let store = store.clone();
        let key = key.to_string();
        let upload_id = upload_id.to_string();
        let progress = progress.clone();
        let body = Bytes::from(buffer);
        tasks.spawn(async move {
            let length = body.len() as u64;
            let etag = store.upload_part(&key, &upload_id, number, body).await?;
            progress.advance(length);
            drop(slot);
            Ok(CompletedPart { number, etag })
        });

        if (filled as u64) < part_size {
            break;
        }
    }

    while let Some(finished) = tasks.join_next().await {
        parts.push(finished.context("an upload task panicked")??);
    }
    parts.sort_by_key(|part| part.number);
    Ok(StreamedObject {
        size,
        sha256: hex::encode(hasher.finalize()),
        parts,
    })
}

/// Copies `source` to `target` server-side in parts of [`COPY_PART_SIZE`]
/// (every part but the last the same size, as R2 requires), giving the
/// copy `metadata`. The copy is created only if `target` does not exist;
/// on any failure the copy's upload is aborted.
pub async fn copy_object(
    store: &dyn ObjectStore,
    source: &str,
    target: &str,
    size: u64,
    metadata: &HashMap<String, String>,
) -> Result<(), StoreError> {
    let part_size = COPY_PART_SIZE;
    let upload_id = store.create_multipart(target, metadata).await?;
    let ranges: Vec<(i32, u64, u64)> = (0..size)
        .step_by(part_size as usize)
        .enumerate()
        .map(|(index, first)| {
            let last = (first + part_size).min(size) - 1;
            (index as i32 + 1, first, last)
        })
        .collect();
    let copied: Result<Vec<CompletedPart>, StoreError> = futures::stream::iter(ranges)
        .map(|(number, first, last)| {
            let upload_id = upload_id.as_str();
            async move {
                let etag = store
                    .copy_part(target, upload_id, number, source, first, last)
                    .await?;
                Ok(CompletedPart { number, etag })
            }
        })
        .buffered(COPIES_IN_FLIGHT)
        .try_collect()
        .await;
    let result = match copied {
        Ok(parts) => {
            complete_upload(
                store,
                target,
                &upload_id,
                &parts,
                WriteCondition::IfAbsent,
                |info| info.size == size && info.metadata == *metadata,
            )
            .await
        }
        Err(error) => Err(error),
    };
    if let Err(error) = result {
        if let Err(abort_error) = store.abort_multipart(target, &upload_id).await {
            tracing::warn!("cannot abort the copy to {target}: {abort_error}");
        }
        return Err(error);
    }
    Ok(())
}

/// Completes an upload, and accepts an object that `is_ours` recognises
/// when the completion fails for any reason but refused credentials. A
/// completion whose response was lost is retried, and a store that
/// discards an upload once it is complete responds to the retry with
/// NoSuchUpload, or with 412 for a conditional create, although the
/// object was written. A response the SDK cannot parse ends the same way.
pub async fn complete_upload(
    store: &dyn ObjectStore,
    key: &str,
    upload_id: &str,
    parts: &[CompletedPart],
    condition: WriteCondition,
    is_ours: impl Fn(&ObjectInfo) -> bool,
) -> Result<(), StoreError> {
    let error = match store
        .complete_multipart(key, upload_id, parts, condition)
        .await
    {
        Err(error) if error.kind != FailureKind::Denied => error,
        result => return result,
    };
    match store.head(key).await {
        Ok(Some(info)) if is_ours(&info) => {
            tracing::info!(
                "{key} is complete although its completion failed ({error}); an earlier \
                 attempt's response was lost or unreadable"
            );
            Ok(())
        }
        _ => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_databases_use_the_default_part_size() {
        assert_eq!(choose_part_size(0), DEFAULT_PART_SIZE);
        assert_eq!(choose_part_size(10 << 30), DEFAULT_PART_SIZE);
    }

    #[test]
    fn large_databases_fit_in_ten_thousand_parts() {
        for size in [80u64 << 30, 200 << 30, 2 << 40] {
            let part = choose_part_size(size);
            assert!(part.is_multiple_of(1 << 20));
            assert!(part >= MIN_PART_SIZE);
            assert!((size * 2).div_ceil(part) <= MAX_PARTS, "{size} with {part}");
        }
    }

    #[test]
    fn memory_budget_limits_parts_in_flight() {
        assert_eq!(parts_in_flight(8 << 20, 4), 4);
        assert_eq!(parts_in_flight(16 << 20, 4), 2);
        assert_eq!(parts_in_flight(64 << 20, 4), 1);
        assert_eq!(parts_in_flight(8 << 20, 1), 1);
    }
}
