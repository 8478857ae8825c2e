//! Settings from the environment, as cloud-init writes them into the env
//! files, validated up front so that every problem is reported at once.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use uuid::Uuid;

use crate::error::ConfigError;
use crate::keys;
use crate::size;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/matrix";
pub const DEFAULT_RESTORE_MARKER: &str = "/opt/matrix/restore-complete";
pub const DEFAULT_PG_INSTALL_ROOT: &str = "/usr/lib/postgresql";
const DEFAULT_UPLOAD_CONCURRENCY: usize = 4;
const DEFAULT_PG_WAIT: Duration = Duration::from_secs(300);
const DEFAULT_DISK_RESERVE: u64 = 1 << 30;
const MIN_PART_SIZE: u64 = 5 << 20;
const MAX_PART_SIZE: u64 = 5 << 30;

/// A value that must never reach a log, an error or a panic message.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    /// Returns the value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Where the snapshots live.
#[derive(Clone, Debug)]
pub enum StoreConfig {
    /// An S3-compatible bucket (Cloudflare R2 in production).
    S3(S3Config),
    /// A local directory, for demos and operators without a bucket.
    Local { root: PathBuf },
}

/// Limits on each request to the bucket.
#[derive(Clone, Debug)]
pub struct S3Timeouts {
    pub connect: Duration,
    /// Time to the first byte of a response.
    pub read: Duration,
    /// One attempt of one request, body included.
    pub attempt: Duration,
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// A download that moves no byte for this long is cut and resumed.
    pub stall_grace: Duration,
}

impl Default for S3Timeouts {
    fn default() -> S3Timeouts {
        S3Timeouts {
            connect: Duration::from_secs(10),
            read: Duration::from_secs(60),
            // An 8 MiB part at 64 KiB/s still fits.
            attempt: Duration::from_secs(180),
            max_attempts: 5,
            stall_grace: Duration::from_secs(30),
        }
    }
}

#[derive(Clone, Debug)]
pub struct S3Config {
    pub bucket: String,
    pub endpoint: String,
    pub region: String,
    pub access_key_id: Secret,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
    pub timeouts: S3Timeouts,
}

/// How to reach the customer's database.
#[derive(Clone, Debug)]
pub struct PostgresConfig {
    /// A host name, an address, or a socket directory (starts with `/`).
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
    pub password: Option<Secret>,
}

/// Everything the backup and restore commands need.
#[derive(Clone, Debug)]
pub struct Config {
    pub machine_id: Uuid,
    pub user_id: String,
    pub prefix: String,
    pub image_version: Option<String>,
    pub store: StoreConfig,
    pub postgres: PostgresConfig,
    pub state_dir: PathBuf,
    pub restore_marker: PathBuf,
    pub pg_install_root: PathBuf,
    /// Fixed multipart part size; chosen from the database size when unset.
    pub part_size: Option<u64>,
    pub upload_concurrency: usize,
    pub pg_wait: Duration,
    pub disk_reserve: u64,
    /// pg_dump's `--compress` level, 0 to 9; 1 when unset.
    pub dump_compression: Option<u8>,
    /// pg_restore's `--jobs`; the number of CPUs, at most 4, when unset.
    pub restore_jobs: Option<u32>,
}

/// Environment variables as a map, so that tests need not touch the
/// process environment.
pub struct Env {
    vars: HashMap<String, String>,
}

impl Env {
    pub fn from_process() -> Env {
        Env {
            vars: std::env::vars().collect(),
        }
    }

    pub fn from_pairs<I, K, V>(pairs: I) -> Env
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Env {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// Returns a non-empty value; an empty variable counts as unset.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(|value| value.trim())
            .filter(|value| !value.is_empty())
    }

    /// Checks whether a variable is set to nothing but whitespace.
    fn is_blank(&self, name: &str) -> bool {
        self.vars
            .get(name)
            .is_some_and(|value| value.trim().is_empty())
    }

    /// Returns the first of several names that is set, with the name used.
    fn first<'a>(&'a self, names: &[&'a str]) -> Option<(&'a str, &'a str)> {
        names
            .iter()
            .find_map(|name| self.get(name).map(|value| (*name, value)))
    }
}

pub const DEFAULT_ENV_DIR: &str = "/opt/matrix/env";

/// Lists the env files in `dir` whose mode is looser than 0640, the mode
/// their secrets need: anything other users may read, or anyone but the
/// owner may write.
pub fn exposed_env_files(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut exposed: Vec<String> = entries
        .flatten()
        .filter(|entry| entry.path().extension().is_some_and(|ext| ext == "env"))
        .filter_map(|entry| {
            let mode = entry.metadata().ok()?.permissions().mode() & 0o777;
            (mode & 0o027 != 0).then(|| {
                format!(
                    "{} has mode {mode:04o}, so other users can read or change the secrets in \
                     it; run `chmod 0640 {0}` and `chown root:matrix {0}`",
                    entry.path().display()
                )
            })
        })
        .collect();
    exposed.sort();
    exposed
}

/// Returns the marker path alone, so that `restore` can honour an existing
/// marker even when the rest of the configuration is broken.
pub fn restore_marker_path(env: &Env) -> PathBuf {
    env.get("MATRIX_RESTORE_MARKER")
        .unwrap_or(DEFAULT_RESTORE_MARKER)
        .into()
}

/// Collects problems while reading, so that one error can name them all.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    /// Records that none of `names` (a variable and its aliases) has a
    /// value. A variable set to nothing is reported as empty, because the
    /// line is in the env file and only its value is missing, as when a
    /// template placeholder was rendered empty.
    fn missing(&mut self, env: &Env, names: &[&str]) {
        let problem = match names.iter().find(|name| env.is_blank(name)) {
            Some(name) => format!("{name} is empty"),
            None if names.len() == 1 => format!("{} is not set", names[0]),
            None => format!("{} (or {}) is not set", names[0], names[1..].join(" or ")),
        };
        self.0.push(problem);
    }

    fn invalid(&mut self, name: &str, reason: impl fmt::Display) {
        self.0.push(format!("{name} is invalid: {reason}"));
    }
}

impl Config {
    /// Reads and validates every setting, reporting all problems in one
    /// [`ConfigError`] that names each variable but never its value.
    pub fn from_env(env: &Env) -> Result<Config, ConfigError> {
        let mut problems = Problems::default();

        let machine_id = match env.get("MATRIX_MACHINE_ID") {
            None => {
                problems.missing(env, &["MATRIX_MACHINE_ID"]);
                None
            }
            Some(text) => match Uuid::parse_str(text) {
                Ok(id) => Some(id),
                Err(_) => {
                    problems.invalid("MATRIX_MACHINE_ID", "expected a UUID");
                    None
                }
            },
        };

        let user_id = match env.get("MATRIX_CLERK_USER_ID") {
            None => {
                problems.missing(env, &["MATRIX_CLERK_USER_ID"]);
                None
            }
            Some(id) if keys::valid_user_id(id) => Some(id.to_string()),
            Some(_) => {
                problems.invalid(
                    "MATRIX_CLERK_USER_ID",
                    "expected 3 to 256 characters from A-Z, a-z, 0-9, '_' and '-'",
                );
                None
            }
        };

        let prefix = match env.first(&["MATRIX_R2_PREFIX", "R2_PREFIX"]) {
            None => {
                problems.missing(env, &["MATRIX_R2_PREFIX", "R2_PREFIX"]);
                None
            }
            Some((name, prefix)) => match &user_id {
                Some(user_id) => match keys::validate_prefix(prefix, user_id) {
                    Ok(()) => Some(prefix.to_string()),
                    Err(reason) => {
                        problems.invalid(name, reason);
                        None
                    }
                },
                None => None,
            },
        };

        let store = match env.get("MATRIX_STORE_DIR") {
            Some(dir) => {
                if !Path::new(dir).is_absolute() {
                    problems.invalid("MATRIX_STORE_DIR", "must be an absolute path");
                }
                // A stray MATRIX_STORE_DIR on a host would otherwise send
                // its backups to local disk while the bucket goes stale.
                if let Some((bucket, _)) = env.first(&["MATRIX_R2_BUCKET", "R2_BUCKET"]) {
                    problems.invalid(
                        "MATRIX_STORE_DIR",
                        format!("is set together with {bucket}; unset one of them"),
                    );
                }
                Some(StoreConfig::Local { root: dir.into() })
            }
            None => read_s3(env, &mut problems).map(StoreConfig::S3),
        };

        let postgres = read_postgres(env, &mut problems);

        let part_size = match env.get("MATRIX_PART_SIZE") {
            None => None,
            Some(text) => match size::parse_bytes(text) {
                Ok(bytes) if (MIN_PART_SIZE..=MAX_PART_SIZE).contains(&bytes) => Some(bytes),
                Ok(_) => {
                    problems.invalid("MATRIX_PART_SIZE", "must be between 5MiB and 5GiB");
                    None
                }
                Err(reason) => {
                    problems.invalid("MATRIX_PART_SIZE", reason);
                    None
                }
            },
        };

        let upload_concurrency = match env.get("MATRIX_UPLOAD_CONCURRENCY") {
            None => DEFAULT_UPLOAD_CONCURRENCY,
            Some(text) => match text.parse::<usize>() {
                Ok(n) if (1..=64).contains(&n) => n,
                _ => {
                    problems.invalid(
                        "MATRIX_UPLOAD_CONCURRENCY",
                        "expected a number from 1 to 64",
                    );
                    DEFAULT_UPLOAD_CONCURRENCY
                }
            },
        };

        let pg_wait = match env.get("MATRIX_PG_WAIT") {
            None => DEFAULT_PG_WAIT,
            Some(text) => size::parse_duration(text).unwrap_or_else(|reason| {
                problems.invalid("MATRIX_PG_WAIT", reason);
                DEFAULT_PG_WAIT
            }),
        };

        let disk_reserve = match env.get("MATRIX_DISK_RESERVE") {
            None => DEFAULT_DISK_RESERVE,
            Some(text) => size::parse_bytes(text).unwrap_or_else(|reason| {
                problems.invalid("MATRIX_DISK_RESERVE", reason);
                DEFAULT_DISK_RESERVE
            }),
        };

        let dump_compression = env.get("MATRIX_DUMP_COMPRESSION").and_then(|text| {
            text.parse::<u8>()
                .ok()
                .filter(|level| *level <= 9)
                .or_else(|| {
                    problems.invalid("MATRIX_DUMP_COMPRESSION", "expected a level from 0 to 9");
                    None
                })
        });
        let restore_jobs = env.get("MATRIX_RESTORE_JOBS").and_then(|text| {
            text.parse::<u32>()
                .ok()
                .filter(|jobs| (1..=64).contains(jobs))
                .or_else(|| {
                    problems.invalid("MATRIX_RESTORE_JOBS", "expected a number from 1 to 64");
                    None
                })
        });

        let state_dir = absolute_path(env, "MATRIX_STATE_DIR", DEFAULT_STATE_DIR, &mut problems);
        let restore_marker = absolute_path(
            env,
            "MATRIX_RESTORE_MARKER",
            DEFAULT_RESTORE_MARKER,
            &mut problems,
        );
        let pg_install_root = absolute_path(
            env,
            "MATRIX_PG_INSTALL_ROOT",
            DEFAULT_PG_INSTALL_ROOT,
            &mut problems,
        );

        match (machine_id, user_id, prefix, store, postgres) {
            (Some(machine_id), Some(user_id), Some(prefix), Some(store), Some(postgres))
                if problems.0.is_empty() =>
            {
                Ok(Config {
                    machine_id,
                    user_id,
                    prefix,
                    image_version: env.get("MATRIX_IMAGE_VERSION").map(str::to_string),
                    store,
                    postgres,
                    state_dir,
                    restore_marker,
                    pg_install_root,
                    part_size,
                    upload_concurrency,
                    pg_wait,
                    disk_reserve,
                    dump_compression,
                    restore_jobs,
                })
            }
            _ => Err(ConfigError {
                problems: problems.0,
            }),
        }
    }

    /// Returns the full object key for a relative key under `system/`.
    pub fn object_key(&self, relative: &str) -> String {
        format!("{}{}", self.prefix, relative)
    }
}

/// Settings only the heartbeat service reads.
#[derive(Clone, Debug)]
pub struct HeartbeatSettings {
    pub register_url: String,
    /// Needed only until the host has registered.
    pub registration_token: Option<Secret>,
    pub register_deadline: Duration,
    pub interval: Duration,
    pub backup_interval: Duration,
    pub status_listen: std::net::SocketAddr,
    pub instance_data: PathBuf,
    pub server_id_override: Option<u64>,
    pub ipv4_override: Option<std::net::Ipv4Addr>,
    pub ipv6_override: Option<std::net::Ipv6Addr>,
}

pub const DEFAULT_INSTANCE_DATA: &str = "/run/cloud-init/instance-data.json";
pub const DEFAULT_STATUS_LISTEN: &str = "127.0.0.1:7781";
const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(300);
const DEFAULT_BACKUP_INTERVAL: Duration = Duration::from_secs(3600);
const DEFAULT_REGISTER_DEADLINE: Duration = Duration::from_secs(24 * 3600);

impl HeartbeatSettings {
    /// Reads the heartbeat's settings; problems are reported like
    /// [`Config::from_env`]'s.
    pub fn from_env(env: &Env) -> Result<HeartbeatSettings, ConfigError> {
        let mut problems = Problems::default();
        let register_url = match env.get("MATRIX_PLATFORM_REGISTER_URL") {
            None => {
                problems.missing(env, &["MATRIX_PLATFORM_REGISTER_URL"]);
                String::new()
            }
            Some(url) => {
                if let Err(reason) = validate_endpoint(url) {
                    problems.invalid("MATRIX_PLATFORM_REGISTER_URL", reason);
                }
                url.to_string()
            }
        };
        let duration = |name: &str, default: Duration, problems: &mut Problems| match env.get(name)
        {
            None => default,
            Some(text) => match size::parse_duration(text) {
                Ok(value) if !value.is_zero() => value,
                Ok(_) => {
                    problems.invalid(name, "must be longer than zero");
                    default
                }
                Err(reason) => {
                    problems.invalid(name, reason);
                    default
                }
            },
        };
        let interval = duration(
            "MATRIX_HEARTBEAT_INTERVAL",
            DEFAULT_HEARTBEAT_INTERVAL,
            &mut problems,
        );
        let backup_interval = duration(
            "MATRIX_BACKUP_INTERVAL",
            DEFAULT_BACKUP_INTERVAL,
            &mut problems,
        );
        let register_deadline = duration(
            "MATRIX_REGISTER_DEADLINE",
            DEFAULT_REGISTER_DEADLINE,
            &mut problems,
        );
        let status_listen_text = env
            .get("MATRIX_STATUS_LISTEN")
            .unwrap_or(DEFAULT_STATUS_LISTEN);
        let status_listen = status_listen_text.parse().unwrap_or_else(|_| {
            problems.invalid(
                "MATRIX_STATUS_LISTEN",
                "expected an address and port such as 127.0.0.1:7781",
            );
            DEFAULT_STATUS_LISTEN
                .parse()
                .expect("the default address is valid")
        });
        let server_id_override = env.get("MATRIX_HETZNER_SERVER_ID").and_then(|text| {
            text.parse::<u64>().ok().filter(|id| *id > 0).or_else(|| {
                problems.invalid(
                    "MATRIX_HETZNER_SERVER_ID",
                    "expected a positive whole number",
                );
                None
            })
        });
        let ipv4_override = env.get("MATRIX_PUBLIC_IPV4").and_then(|text| {
            text.parse().ok().or_else(|| {
                problems.invalid("MATRIX_PUBLIC_IPV4", "expected an IPv4 address");
                None
            })
        });
        let ipv6_override = env.get("MATRIX_PUBLIC_IPV6").and_then(|text| {
            text.parse().ok().or_else(|| {
                problems.invalid("MATRIX_PUBLIC_IPV6", "expected an IPv6 address");
                None
            })
        });
        let instance_data = absolute_path(
            env,
            "MATRIX_INSTANCE_DATA",
            DEFAULT_INSTANCE_DATA,
            &mut problems,
        );
        if !problems.0.is_empty() {
            return Err(ConfigError {
                problems: problems.0,
            });
        }
        Ok(HeartbeatSettings {
            register_url,
            registration_token: env
                .get("MATRIX_REGISTRATION_TOKEN")
                .map(|token| Secret::new(token.to_string())),
            register_deadline,
            interval,
            backup_interval,
            status_listen,
            instance_data,
            server_id_override,
            ipv4_override,
            ipv6_override,
        })
    }
}

fn absolute_path(env: &Env, name: &str, default: &str, problems: &mut Problems) -> PathBuf {
    let path = PathBuf::from(env.get(name).unwrap_or(default));
    if !path.is_absolute() {
        problems.invalid(name, "must be an absolute path");
    }
    path
}

fn read_s3(env: &Env, problems: &mut Problems) -> Option<S3Config> {
    let bucket = match env.first(&["MATRIX_R2_BUCKET", "R2_BUCKET"]) {
        None => {
            problems.missing(env, &["MATRIX_R2_BUCKET", "R2_BUCKET"]);
            None
        }
        Some((name, bucket)) => {
            if valid_bucket_name(bucket) {
                Some(bucket.to_string())
            } else {
                problems.invalid(
                    name,
                    "expected 3 to 63 characters from a-z, 0-9, '.' and '-'",
                );
                None
            }
        }
    };

    let endpoint = match (env.get("R2_ENDPOINT"), env.get("R2_ACCOUNT_ID")) {
        (Some(url), _) => match validate_endpoint(url) {
            Ok(()) => Some(url.trim_end_matches('/').to_string()),
            Err(reason) => {
                problems.invalid("R2_ENDPOINT", reason);
                None
            }
        },
        (None, Some(account)) => {
            if account.len() == 32 && account.bytes().all(|b| b.is_ascii_hexdigit()) {
                Some(format!("https://{account}.r2.cloudflarestorage.com"))
            } else {
                problems.invalid("R2_ACCOUNT_ID", "expected 32 hexadecimal characters");
                None
            }
        }
        (None, None) => {
            problems.missing(env, &["R2_ENDPOINT", "R2_ACCOUNT_ID"]);
            None
        }
    };

    let access_key_id = env.get("AWS_ACCESS_KEY_ID");
    if access_key_id.is_none() {
        problems.missing(env, &["AWS_ACCESS_KEY_ID"]);
    }
    let secret_access_key = env.get("AWS_SECRET_ACCESS_KEY");
    if secret_access_key.is_none() {
        problems.missing(env, &["AWS_SECRET_ACCESS_KEY"]);
    }
    let region = env.get("AWS_DEFAULT_REGION").unwrap_or("auto").to_string();
    let timeouts = read_s3_timeouts(env, problems);

    Some(S3Config {
        bucket: bucket?,
        endpoint: endpoint?,
        region,
        access_key_id: Secret::new(access_key_id?.to_string()),
        secret_access_key: Secret::new(secret_access_key?.to_string()),
        session_token: env
            .get("AWS_SESSION_TOKEN")
            .map(|token| Secret::new(token.to_string())),
        timeouts,
    })
}

fn read_s3_timeouts(env: &Env, problems: &mut Problems) -> S3Timeouts {
    let defaults = S3Timeouts::default();
    let mut duration = |name: &str, default: Duration| match env.get(name) {
        None => default,
        Some(text) => match size::parse_duration(text) {
            Ok(value) if !value.is_zero() => value,
            Ok(_) => {
                problems.invalid(name, "must be longer than zero");
                default
            }
            Err(reason) => {
                problems.invalid(name, reason);
                default
            }
        },
    };
    let connect = duration("MATRIX_S3_CONNECT_TIMEOUT", defaults.connect);
    let read = duration("MATRIX_S3_READ_TIMEOUT", defaults.read);
    let attempt = duration("MATRIX_S3_ATTEMPT_TIMEOUT", defaults.attempt);
    let stall_grace = duration("MATRIX_S3_STALL_GRACE", defaults.stall_grace);
    let max_attempts = match env.get("MATRIX_S3_MAX_ATTEMPTS") {
        None => defaults.max_attempts,
        Some(text) => match text.parse::<u32>() {
            Ok(attempts) if (1..=20).contains(&attempts) => attempts,
            _ => {
                problems.invalid("MATRIX_S3_MAX_ATTEMPTS", "expected a number from 1 to 20");
                defaults.max_attempts
            }
        },
    };
    S3Timeouts {
        connect,
        read,
        attempt,
        max_attempts,
        stall_grace,
    }
}

fn read_postgres(env: &Env, problems: &mut Problems) -> Option<PostgresConfig> {
    let database = env.get("POSTGRES_DB");
    if database.is_none() {
        problems.missing(env, &["POSTGRES_DB"]);
    }
    let user = env.get("POSTGRES_USER");
    if user.is_none() {
        problems.missing(env, &["POSTGRES_USER"]);
    }
    let port = match env.get("PGPORT") {
        None => 5432,
        Some(text) => match text.parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => {
                problems.invalid("PGPORT", "expected a port number from 1 to 65535");
                5432
            }
        },
    };
    let host = match env.get("PGHOST") {
        Some(host) => host.to_string(),
        None => default_pg_host(port),
    };
    Some(PostgresConfig {
        host,
        port,
        database: database?.to_string(),
        user: user?.to_string(),
        password: env
            .get("POSTGRES_PASSWORD")
            .map(|password| Secret::new(password.to_string())),
    })
}

/// Uses Debian's socket directory when the server listens there, as libpq
/// does, and falls back to TCP on loopback.
fn default_pg_host(port: u16) -> String {
    let socket_dir = "/var/run/postgresql";
    if Path::new(socket_dir)
        .join(format!(".s.PGSQL.{port}"))
        .exists()
    {
        socket_dir.to_string()
    } else {
        "127.0.0.1".to_string()
    }
}

fn valid_bucket_name(bucket: &str) -> bool {
    (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
}

fn validate_endpoint(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or("expected an http:// or https:// URL")?;
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err("the URL has no host".into());
    }
    if authority.contains('@') {
        return Err("the URL must not carry credentials".into());
    }
    if rest.contains(['?', '#']) || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("expected a plain URL with no query, fragment or spaces".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete() -> Vec<(&'static str, &'static str)> {
        vec![
            ("MATRIX_MACHINE_ID", "9f05824c-2d3e-4b8a-9c1d-0e5f6a7b8c9d"),
            ("MATRIX_CLERK_USER_ID", "user_2abc"),
            ("MATRIX_R2_BUCKET", "matrix-backups"),
            ("MATRIX_R2_PREFIX", "matrixos-sync/user_2abc/"),
            ("R2_ENDPOINT", "http://127.0.0.1:9000"),
            ("AWS_ACCESS_KEY_ID", "AKIDSECRETVALUE1"),
            ("AWS_SECRET_ACCESS_KEY", "secret-access-value-2"),
            ("POSTGRES_DB", "matrix"),
            ("POSTGRES_USER", "matrix"),
            ("POSTGRES_PASSWORD", "db-password-value-3"),
            ("PGHOST", "127.0.0.1"),
            ("PGPORT", "5432"),
        ]
    }

    fn with(changes: &[(&'static str, &'static str)]) -> Env {
        let mut vars: HashMap<&str, &str> = complete().into_iter().collect();
        for (name, value) in changes {
            vars.insert(name, value);
        }
        Env::from_pairs(vars)
    }

    fn problems(env: &Env) -> String {
        Config::from_env(env).unwrap_err().to_string()
    }

    #[test]
    fn complete_environment_is_accepted() {
        let config = Config::from_env(&with(&[])).unwrap();
        assert_eq!(config.prefix, "matrixos-sync/user_2abc/");
        assert_eq!(
            config.object_key(keys::LATEST),
            "matrixos-sync/user_2abc/system/db/latest"
        );
        match config.store {
            StoreConfig::S3(s3) => assert_eq!(s3.region, "auto"),
            StoreConfig::Local { .. } => panic!("expected the S3 store"),
        }
    }

    #[test]
    fn every_problem_is_named_at_once() {
        let message = problems(&with(&[
            ("MATRIX_MACHINE_ID", "not-a-uuid"),
            ("R2_ENDPOINT", "ftp://127.0.0.1"),
            ("AWS_SECRET_ACCESS_KEY", ""),
        ]));
        assert!(
            message.contains("MATRIX_MACHINE_ID is invalid"),
            "{message}"
        );
        assert!(message.contains("R2_ENDPOINT is invalid"), "{message}");
        assert!(
            message.contains("AWS_SECRET_ACCESS_KEY is empty"),
            "{message}"
        );
    }

    #[test]
    fn secrets_never_appear_in_errors() {
        let message = problems(&with(&[("MATRIX_MACHINE_ID", "AKIDSECRETVALUE1")]));
        assert!(!message.contains("AKIDSECRETVALUE1"), "{message}");
        let config = Config::from_env(&with(&[])).unwrap();
        let debug = format!("{config:?}");
        for secret in [
            "AKIDSECRETVALUE1",
            "secret-access-value-2",
            "db-password-value-3",
        ] {
            assert!(!debug.contains(secret), "{debug}");
        }
    }

    #[test]
    fn empty_variable_reported_as_empty() {
        let mut env = with(&[("MATRIX_MACHINE_ID", " "), ("R2_PREFIX", "")]);
        env.vars.remove("MATRIX_R2_PREFIX");
        env.vars.remove("POSTGRES_DB");
        let message = problems(&env);
        assert!(message.contains("MATRIX_MACHINE_ID is empty"), "{message}");
        assert!(message.contains("R2_PREFIX is empty"), "{message}");
        assert!(message.contains("POSTGRES_DB is not set"), "{message}");
    }

    #[test]
    fn prefix_of_another_user_is_rejected() {
        let message = problems(&with(&[("MATRIX_R2_PREFIX", "matrixos-sync/user_2xyz/")]));
        assert!(message.contains("MATRIX_R2_PREFIX is invalid"), "{message}");
        assert!(message.contains("another customer"), "{message}");
    }

    #[test]
    fn local_store_needs_no_bucket() {
        let env = Env::from_pairs(
            complete()
                .into_iter()
                .filter(|(name, _)| !name.starts_with("AWS_") && !name.starts_with("R2_"))
                .filter(|(name, _)| *name != "MATRIX_R2_BUCKET")
                .chain([("MATRIX_STORE_DIR", "/tmp/store")]),
        );
        let config = Config::from_env(&env).unwrap();
        assert!(matches!(config.store, StoreConfig::Local { .. }));
    }

    #[test]
    fn local_store_must_be_absolute() {
        let env = Env::from_pairs(
            complete()
                .into_iter()
                .filter(|(name, _)| *name != "MATRIX_R2_BUCKET")
                .chain([("MATRIX_STORE_DIR", "relative/store")]),
        );
        let message = Config::from_env(&env).unwrap_err().to_string();
        assert!(
            message.contains("MATRIX_STORE_DIR is invalid: must be an absolute path"),
            "{message}"
        );
    }

    #[test]
    fn local_store_and_bucket_conflict() {
        let env = Env::from_pairs(
            complete()
                .into_iter()
                .chain([("MATRIX_STORE_DIR", "/tmp/store")]),
        );
        let message = Config::from_env(&env).unwrap_err().to_string();
        assert!(message.contains("MATRIX_STORE_DIR is invalid"), "{message}");
        assert!(message.contains("MATRIX_R2_BUCKET"), "{message}");
    }

    #[test]
    fn account_id_derives_the_endpoint() {
        let env = Env::from_pairs(
            complete()
                .into_iter()
                .filter(|(name, _)| *name != "R2_ENDPOINT")
                .chain([("R2_ACCOUNT_ID", "0123456789abcdef0123456789abcdef")]),
        );
        let config = Config::from_env(&env).unwrap();
        match config.store {
            StoreConfig::S3(s3) => assert_eq!(
                s3.endpoint,
                "https://0123456789abcdef0123456789abcdef.r2.cloudflarestorage.com"
            ),
            StoreConfig::Local { .. } => panic!("expected the S3 store"),
        }
    }

    #[test]
    fn part_size_has_bounds() {
        assert!(problems(&with(&[("MATRIX_PART_SIZE", "1MiB")])).contains("MATRIX_PART_SIZE"));
        let config = Config::from_env(&with(&[("MATRIX_PART_SIZE", "16MiB")])).unwrap();
        assert_eq!(config.part_size, Some(16 << 20));
    }

    #[test]
    fn heartbeat_settings_parse_durations_and_overrides() {
        let env = Env::from_pairs([
            (
                "MATRIX_PLATFORM_REGISTER_URL",
                "http://127.0.0.1:8080/vps/register",
            ),
            ("MATRIX_REGISTRATION_TOKEN", "token-value-4"),
            ("MATRIX_HEARTBEAT_INTERVAL", "30s"),
            ("MATRIX_HETZNER_SERVER_ID", "12345678"),
            ("MATRIX_PUBLIC_IPV6", "2a01:4f8::1"),
        ]);
        let settings = HeartbeatSettings::from_env(&env).unwrap();
        assert_eq!(settings.interval, Duration::from_secs(30));
        assert_eq!(settings.backup_interval, Duration::from_secs(3600));
        assert_eq!(settings.server_id_override, Some(12345678));
        assert!(settings.ipv4_override.is_none());
        assert!(!format!("{settings:?}").contains("token-value-4"));
    }

    #[test]
    fn heartbeat_settings_name_bad_values() {
        let env = Env::from_pairs([
            ("MATRIX_HEARTBEAT_INTERVAL", "often"),
            ("MATRIX_PUBLIC_IPV4", "1.2.3"),
            ("MATRIX_STATUS_LISTEN", "everywhere"),
        ]);
        let message = HeartbeatSettings::from_env(&env).unwrap_err().to_string();
        for name in [
            "MATRIX_PLATFORM_REGISTER_URL is not set",
            "MATRIX_HEARTBEAT_INTERVAL is invalid",
            "MATRIX_PUBLIC_IPV4 is invalid",
            "MATRIX_STATUS_LISTEN is invalid",
        ] {
            assert!(message.contains(name), "{message}");
        }
    }

    #[test]
    fn loose_env_files_are_reported() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("env-mode-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let strict = dir.join("r2.env");
        let loose = dir.join("postgres.env");
        for (path, mode) in [(&strict, 0o640), (&loose, 0o644)] {
            std::fs::write(path, "SECRET=value\n").unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let exposed = exposed_env_files(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(exposed.len(), 1, "{exposed:?}");
        assert!(
            exposed[0].contains("postgres.env has mode 0644"),
            "{exposed:?}"
        );
    }

    #[test]
    fn endpoint_with_credentials_is_rejected() {
        let message = problems(&with(&[("R2_ENDPOINT", "https://key:pw@host.invalid")]));
        assert!(message.contains("R2_ENDPOINT is invalid"), "{message}");
        assert!(!message.contains("key:pw"), "{message}");
    }
}
