//! A directory that behaves like a bucket: objects are files under the root,
//! their metadata and uploads in progress live under `.matrix-store/`.
//!
//! Conditional writes hold an exclusive `flock` on `.matrix-store/lock`, so
//! they are atomic between processes on one host. Writes go to a temporary
//! file that is renamed into place, so a reader never sees half an object.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{
    BodyStream, CompletedPart, FailureKind, Object, ObjectInfo, ObjectStore, PendingUpload,
    StoreError, WriteCondition,
};

const INTERNAL_DIR: &str = ".matrix-store";
const READ_CHUNK: usize = 256 * 1024;

/// Metadata kept beside each object.
#[derive(Serialize, Deserialize, Default)]
struct Sidecar {
    etag: String,
    metadata: HashMap<String, String>,
    part_sizes: Vec<u64>,
}

/// What an upload in progress was started with.
#[derive(Serialize, Deserialize)]
struct UploadRecord {
    key: String,
    metadata: HashMap<String, String>,
    initiated: DateTime<Utc>,
}

pub struct LocalStore {
    root: PathBuf,
}

fn io_error(operation: &'static str, key: &str, error: std::io::Error) -> StoreError {
    let kind = if error.kind() == std::io::ErrorKind::NotFound {
        FailureKind::NotFound
    } else {
        FailureKind::Other
    };
    StoreError::new(kind, operation, key, error.to_string())
}

fn etag_of(bytes_digest: &[u8]) -> String {
    format!("\"{}\"", hex::encode(&bytes_digest[..16]))
}

impl LocalStore {
    pub fn open(root: &Path) -> anyhow::Result<LocalStore> {
        for dir in ["meta", "uploads"] {
            let path = root.join(INTERNAL_DIR).join(dir);
            fs::create_dir_all(&path).map_err(|error| {
                anyhow::anyhow!(
                    "cannot create the local store directory {}: {error}; check \
                     MATRIX_STORE_DIR and its permissions",
                    path.display()
                )
            })?;
        }
        Ok(LocalStore { root: root.into() })
    }

    fn object_path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn sidecar_path(&self, key: &str) -> PathBuf {
        self.root
            .join(INTERNAL_DIR)
            .join("meta")
            .join(format!("{key}.json"))
    }

    fn upload_dir(&self, upload_id: &str) -> PathBuf {
        self.root.join(INTERNAL_DIR).join("uploads").join(upload_id)
    }

    fn lock(&self) -> std::io::Result<Flock<File>> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join(INTERNAL_DIR).join("lock"))?;
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| errno.into())
    }

    fn read_sidecar(&self, key: &str) -> Sidecar {
        fs::read(self.sidecar_path(key))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    fn info(&self, key: &str) -> std::io::Result<Option<ObjectInfo>> {
        let size = match fs::metadata(self.object_path(key)) {
            Ok(meta) if meta.is_file() => meta.len(),
            Ok(_) => return Ok(None),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error),
        };
        let sidecar = self.read_sidecar(key);
        Ok(Some(ObjectInfo {
            size,
            etag: Some(sidecar.etag),
            metadata: sidecar.metadata,
            parts_count: (!sidecar.part_sizes.is_empty())
                .then_some(sidecar.part_sizes.len() as u32),
        }))
    }

    fn check_condition(
        &self,
        key: &str,
        operation: &'static str,
        condition: &WriteCondition,
    ) -> Result<(), StoreError> {
        let current = self.info(key).map_err(|e| io_error(operation, key, e))?;
        let holds = match (condition, &current) {
            (WriteCondition::Unconditional, _) => true,
            (WriteCondition::IfAbsent, existing) => existing.is_none(),
            (WriteCondition::IfMatch(_), None) => {
                return Err(StoreError::new(
                    FailureKind::NotFound,
                    operation,
                    key,
                    "If-Match on a missing object",
                ));
            }
            (WriteCondition::IfMatch(etag), Some(info)) => {
                info.etag.as_deref() == Some(etag.as_str())
            }
        };
        if holds {
            Ok(())
        } else {
            Err(StoreError::new(
                FailureKind::PreconditionFailed,
                operation,
                key,
                "",
            ))
        }
    }

    /// Writes the object file and its sidecar by temporary file and rename.
    fn install(&self, key: &str, source: &Path, sidecar: &Sidecar) -> std::io::Result<()> {
        let target = self.object_path(key);
        let sidecar_target = self.sidecar_path(key);
        for path in [&target, &sidecar_target] {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
        }
        let sidecar_temp = sidecar_target.with_extension("json.tmp");
        fs::write(&sidecar_temp, serde_json::to_vec(sidecar)?)?;
        fs::rename(source, &target)?;
        fs::rename(&sidecar_temp, &sidecar_target)?;
        Ok(())
    }

    fn temp_path(&self) -> PathBuf {
        self.root
            .join(INTERNAL_DIR)
            .join(format!("tmp-{}", uuid::Uuid::new_v4()))
    }

    fn put_blocking(
        &self,
        key: &str,
        body: &[u8],
        condition: WriteCondition,
    ) -> Result<Option<String>, StoreError> {
        let _lock = self.lock().map_err(|e| io_error("PUT", key, e))?;
        self.check_condition(key, "PUT", &condition)?;
        let temp = self.temp_path();
        let etag = etag_of(&Sha256::digest(body));
        let write = || -> std::io::Result<()> {
            let mut file = File::create(&temp)?;
            file.write_all(body)?;
            file.sync_all()?;
            self.install(
                key,
                &temp,
                &Sidecar {
                    etag: etag.clone(),
                    metadata: HashMap::new(),
                    part_sizes: Vec::new(),
                },
            )
        };
        write().map_err(|e| io_error("PUT", key, e))?;
        Ok(Some(etag))
    }

    fn complete_blocking(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
        condition: WriteCondition,
    ) -> Result<(), StoreError> {
        const OPERATION: &str = "CompleteMultipartUpload";
        let dir = self.upload_dir(upload_id);
        let record: UploadRecord = fs::read(dir.join("upload.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or_else(|| {
                StoreError::new(FailureKind::NotFound, OPERATION, key, "no such upload")
            })?;
        if record.key != key {
            return Err(StoreError::new(
                FailureKind::Other,
                OPERATION,
                key,
                "the upload belongs to another key",
            ));
        }
        let _lock = self.lock().map_err(|e| io_error(OPERATION, key, e))?;
        self.check_condition(key, OPERATION, &condition)?;

        let temp = self.temp_path();
        let mut hasher = Sha256::new();
        let mut part_sizes = Vec::new();
        let mut assemble = || -> std::io::Result<()> {
            let mut output = File::create(&temp)?;
            for part in parts {
                let part_bytes = fs::read(dir.join(part.number.to_string()))?;
                if etag_of(&Sha256::digest(&part_bytes)) != part.etag {
                    return Err(std::io::Error::other(format!(
                        "part {} has another ETag",
                        part.number
                    )));
                }
                hasher.update(&part_bytes);
                part_sizes.push(part_bytes.len() as u64);
                output.write_all(&part_bytes)?;
            }
            output.sync_all()
        };
        assemble()
            .map_err(|e| StoreError::new(FailureKind::Other, OPERATION, key, e.to_string()))?;
        let sidecar = Sidecar {
            etag: format!(
                "{}-{}\"",
                etag_of(&hasher.finalize()).trim_end_matches('"'),
                parts.len()
            ),
            metadata: record.metadata,
            part_sizes,
        };
        self.install(key, &temp, &sidecar)
            .map_err(|e| io_error(OPERATION, key, e))?;
        fs::remove_dir_all(&dir).map_err(|e| io_error(OPERATION, key, e))?;
        Ok(())
    }
}

async fn blocking<T: Send + 'static>(
    operation: &'static str,
    key: &str,
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| StoreError::new(FailureKind::Other, operation, key, e.to_string()))?
}

impl Clone for LocalStore {
    fn clone(&self) -> LocalStore {
        LocalStore {
            root: self.root.clone(),
        }
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    fn describe(&self) -> String {
        format!("local directory {}", self.root.display())
    }

    async fn get(&self, key: &str) -> Result<Option<Object>, StoreError> {
        let store = self.clone();
        let owned_key = key.to_string();
        blocking("GET", key, move || {
            let key = owned_key.as_str();
            let Some(info) = store.info(key).map_err(|e| io_error("GET", key, e))? else {
                return Ok(None);
            };
            match fs::read(store.object_path(key)) {
                Ok(body) => Ok(Some(Object {
                    body: body.into(),
                    info,
                })),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(error) => Err(io_error("GET", key, error)),
            }
        })
        .await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        self.info(key).map_err(|e| io_error("HEAD", key, e))
    }

    async fn head_part(&self, key: &str, part_number: i32) -> Result<u64, StoreError> {
        let sidecar = self.read_sidecar(key);
        usize::try_from(part_number - 1)
            .ok()
            .and_then(|index| sidecar.part_sizes.get(index).copied())
            .ok_or_else(|| StoreError::new(FailureKind::NotFound, "HEAD part", key, "no such part"))
    }

    async fn read_from(
        &self,
        key: &str,
        offset: u64,
        expected_etag: Option<&str>,
    ) -> Result<BodyStream, StoreError> {
        if let Some(expected) = expected_etag {
            let current = self.read_sidecar(key).etag;
            if current != expected {
                return Err(StoreError::new(
                    FailureKind::PreconditionFailed,
                    "GET",
                    key,
                    "the object changed",
                ));
            }
        }
        let mut file = File::open(self.object_path(key)).map_err(|e| io_error("GET", key, e))?;
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| io_error("GET", key, e))?;
        let key = key.to_string();
        let stream = futures::stream::unfold(Some(file), move |file| {
            let key = key.clone();
            async move {
                let mut file = file?;
                let result = tokio::task::spawn_blocking(move || {
                    let mut buffer = vec![0u8; READ_CHUNK];
                    let read = file.read(&mut buffer);
                    (file, buffer, read)
                })
                .await;
                match result {
                    Ok((_, _, Ok(0))) => None,
                    Ok((file, mut buffer, Ok(read))) => {
                        buffer.truncate(read);
                        Some((Ok(Bytes::from(buffer)), Some(file)))
                    }
                    Ok((_, _, Err(error))) => Some((Err(io_error("GET body", &key, error)), None)),
                    Err(error) => Some((
                        Err(StoreError::new(
                            FailureKind::Other,
                            "GET body",
                            &key,
                            error.to_string(),
                        )),
                        None,
                    )),
                }
            }
        });
        Ok(stream.boxed())
    }

    async fn put(
        &self,
        key: &str,
        body: Bytes,
        _content_type: &str,
        condition: WriteCondition,
    ) -> Result<Option<String>, StoreError> {
        let store = self.clone();
        let owned_key = key.to_string();
        blocking("PUT", key, move || {
            store.put_blocking(&owned_key, &body, condition)
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        for path in [self.object_path(key), self.sidecar_path(key)] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(io_error("DELETE", key, error)),
            }
        }
        Ok(())
    }

    async fn create_multipart(
        &self,
        key: &str,
        metadata: &HashMap<String, String>,
    ) -> Result<String, StoreError> {
        let upload_id = uuid::Uuid::new_v4().to_string();
        let dir = self.upload_dir(&upload_id);
        let record = UploadRecord {
            key: key.to_string(),
            metadata: metadata.clone(),
            initiated: Utc::now(),
        };
        let create = || -> std::io::Result<()> {
            fs::create_dir_all(&dir)?;
            fs::write(dir.join("upload.json"), serde_json::to_vec(&record)?)
        };
        create().map_err(|e| io_error("CreateMultipartUpload", key, e))?;
        Ok(upload_id)
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> Result<String, StoreError> {
        let dir = self.upload_dir(upload_id);
        let owned_key = key.to_string();
        blocking("UploadPart", key, move || {
            if !dir.is_dir() {
                return Err(StoreError::new(
                    FailureKind::NotFound,
                    "UploadPart",
                    &owned_key,
                    "no such upload",
                ));
            }
            let etag = etag_of(&Sha256::digest(&body));
            let temp = dir.join(format!("{number}.tmp"));
            fs::write(&temp, &body)
                .and_then(|()| fs::rename(&temp, dir.join(number.to_string())))
                .map_err(|e| io_error("UploadPart", &owned_key, e))?;
            Ok(etag)
        })
        .await
    }

    async fn copy_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        source: &str,
        first: u64,
        last: u64,
    ) -> Result<String, StoreError> {
        let source_path = self.object_path(source);
        let owned_key = key.to_string();
        let body = blocking("UploadPartCopy", key, move || {
            let mut file =
                File::open(&source_path).map_err(|e| io_error("UploadPartCopy", &owned_key, e))?;
            let mut buffer = vec![0u8; (last - first + 1) as usize];
            file.seek(SeekFrom::Start(first))
                .and_then(|_| file.read_exact(&mut buffer))
                .map_err(|e| io_error("UploadPartCopy", &owned_key, e))?;
            Ok(Bytes::from(buffer))
        })
        .await?;
        self.upload_part(key, upload_id, number, body).await
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
        condition: WriteCondition,
    ) -> Result<(), StoreError> {
        let store = self.clone();
        let owned_key = key.to_string();
        let upload_id = upload_id.to_string();
        let parts = parts.to_vec();
        blocking("CompleteMultipartUpload", key, move || {
            store.complete_blocking(&owned_key, &upload_id, &parts, condition)
        })
        .await
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StoreError> {
        match fs::remove_dir_all(self.upload_dir(upload_id)) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(io_error("AbortMultipartUpload", key, error)),
        }
    }

    async fn list_multipart_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>, StoreError> {
        let dir = self.root.join(INTERNAL_DIR).join("uploads");
        let entries =
            fs::read_dir(&dir).map_err(|e| io_error("ListMultipartUploads", prefix, e))?;
        let mut uploads = Vec::new();
        for entry in entries.flatten() {
            let record: Option<UploadRecord> = fs::read(entry.path().join("upload.json"))
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok());
            if let Some(record) = record.filter(|record| record.key.starts_with(prefix)) {
                uploads.push(PendingUpload {
                    key: record.key,
                    upload_id: entry.file_name().to_string_lossy().into_owned(),
                    initiated: Some(record.initiated),
                });
            }
        }
        Ok(uploads)
    }

    async fn list_keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let (dir_part, _) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        let dir = self.root.join(dir_part);
        let mut keys = Vec::new();
        let mut pending = vec![dir];
        while let Some(dir) = pending.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => return Err(io_error("LIST", prefix, error)),
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    pending.push(path);
                } else if let Ok(relative) = path.strip_prefix(&self.root) {
                    let key = relative.to_string_lossy().into_owned();
                    if key.starts_with(prefix) && !key.starts_with(INTERNAL_DIR) {
                        keys.push(key);
                    }
                }
            }
        }
        keys.sort();
        Ok(keys)
    }
}
