//! The command line: one subcommand per mode, configuration from the
//! environment as the env files under /opt/matrix/env/ set it.

use clap::{Parser, Subcommand};

use crate::config::{self, Config, Env};
use crate::error::ConfigError;
use crate::prune::{self, RetentionPolicy};
use crate::{backup, heartbeat, restore, status, verify};

const ENVIRONMENT_HELP: &str = "\
Configuration comes from the environment (systemd loads it from the files
under /opt/matrix/env/):
  MATRIX_MACHINE_ID            UUID of this machine
  MATRIX_CLERK_USER_ID         the customer's id
  MATRIX_R2_BUCKET             bucket name (or R2_BUCKET)
  MATRIX_R2_PREFIX             matrixos-sync/<MATRIX_CLERK_USER_ID>/ (or R2_PREFIX)
  R2_ENDPOINT | R2_ACCOUNT_ID  endpoint URL, or the R2 account it is derived from
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN
  AWS_DEFAULT_REGION           default: auto
  POSTGRES_DB, POSTGRES_USER, POSTGRES_PASSWORD, PGHOST, PGPORT
  MATRIX_STATE_DIR             default: /var/lib/matrix
  MATRIX_RESTORE_MARKER        default: /opt/matrix/restore-complete
  MATRIX_STORE_DIR             use a local directory instead of a bucket
  MATRIX_PG_INSTALL_ROOT       default: /usr/lib/postgresql
  MATRIX_PART_SIZE             multipart part size, e.g. 16MiB (default: from the database size)
  MATRIX_UPLOAD_CONCURRENCY    parts in flight (default: 4, fewer for large parts)
  MATRIX_DUMP_COMPRESSION      pg_dump --compress level 0-9 (default: 1)
  MATRIX_RESTORE_JOBS          pg_restore --jobs (default: CPUs, at most 4)
  MATRIX_PG_WAIT               how long to wait for PostgreSQL to start (default: 5m)
  MATRIX_DISK_RESERVE          free disk kept beyond a download (default: 1GiB)
  MATRIX_S3_CONNECT_TIMEOUT    default: 10s
  MATRIX_S3_READ_TIMEOUT       time to a response's first byte (default: 60s)
  MATRIX_S3_ATTEMPT_TIMEOUT    one attempt of one request (default: 3m)
  MATRIX_S3_MAX_ATTEMPTS       attempts per request (default: 5)
  MATRIX_S3_STALL_GRACE        a download idle this long is resumed (default: 30s)
  MATRIX_ENV_DIR               env files checked for loose modes (default: /opt/matrix/env)
  MATRIX_LOG                   log filter, e.g. debug (default: info)

Exit status: 0 success, 1 failure, 2 bad configuration or usage,
75 another backup holds the lock.";

#[derive(Parser, Debug)]
#[command(
    name = "matrix-agent",
    version,
    about = "Backs up, restores and reports on a Matrix OS host's PostgreSQL database",
    after_help = ENVIRONMENT_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Restore the database from the bucket before the gateway starts.
    ///
    /// Exits 0 at once when the restore marker already exists. Otherwise
    /// restores the snapshot system/db/latest names, or opens the gate on
    /// a fresh host whose bucket holds no snapshot, then writes the marker.
    /// Any failure to read the bucket keeps the gate shut.
    #[command(after_help = "Examples:\n  \
        sudo -u matrix sh -c 'set -a; . /opt/matrix/env/host.env; . /opt/matrix/env/r2.env; \
        . /opt/matrix/env/postgres.env; exec /opt/matrix/bin/matrix-agent restore'\n  \
        systemctl restart matrix-restore")]
    Restore,

    /// Stream a pg_dump into the bucket and move system/db/latest to it.
    ///
    /// Refuses before the restore gate opened and while the machine
    /// metadata names another machine. Exits 75 when another backup runs.
    #[command(after_help = "Examples:\n  systemctl start matrix-db-backup\n  \
        MATRIX_PART_SIZE=16MiB matrix-agent backup")]
    Backup,

    /// Check a snapshot end to end without touching the database.
    ///
    /// Streams the snapshot through SHA-256 and through pg_restore into
    /// /dev/null, so every archive entry is read and decompressed.
    #[command(after_help = "Examples:\n  matrix-agent verify\n  \
        matrix-agent verify --snapshot system/db/snapshots/2026-04-26T1800Z.dump")]
    Verify {
        /// Snapshot key to check instead of the one system/db/latest names.
        #[arg(long, value_name = "KEY")]
        snapshot: Option<String>,
    },

    /// Delete old snapshots by a retention policy (opt-in).
    ///
    /// Keeps the newest --keep-last snapshots and the newest of each of the
    /// last --keep-hourly hours, --keep-daily days, --keep-weekly ISO weeks
    /// and --keep-monthly months. Never deletes the snapshot
    /// system/db/latest names, nor the newest one, and deletes at most 100
    /// a run. At least one --keep-* option is required.
    #[command(
        after_help = "Examples:\n  matrix-agent prune --keep-last 48 --keep-daily 14 \
        --keep-weekly 8 --dry-run\n  matrix-agent prune --keep-last 48 --keep-daily 14"
    )]
    Prune {
        /// Keep the N newest snapshots (the newest one is kept in any case).
        #[arg(long, value_name = "N")]
        keep_last: Option<usize>,
        /// Keep the newest snapshot of each of the last N hours that have one.
        #[arg(long, value_name = "N")]
        keep_hourly: Option<usize>,
        /// Keep the newest snapshot of each of the last N days (UTC) that have one.
        #[arg(long, value_name = "N")]
        keep_daily: Option<usize>,
        /// Keep the newest snapshot of each of the last N ISO weeks that have one.
        #[arg(long, value_name = "N")]
        keep_weekly: Option<usize>,
        /// Keep the newest snapshot of each of the last N months that have one.
        #[arg(long, value_name = "N")]
        keep_monthly: Option<usize>,
        /// List what would be deleted and delete nothing.
        #[arg(long)]
        dry_run: bool,
    },

    /// Run the heartbeat service (systemd Type=notify, with a watchdog).
    ///
    /// Waits for the restore gate, registers with the platform once, then
    /// refreshes lastSyncAt in system/vps-meta.json and writes
    /// system/host-status.json every MATRIX_HEARTBEAT_INTERVAL (default
    /// 5m). Serves /healthz, /status and /metrics on MATRIX_STATUS_LISTEN
    /// (default 127.0.0.1:7781).
    #[command(after_help = "Settings, besides those of backup:
  MATRIX_PLATFORM_REGISTER_URL  full URL of POST /vps/register (required)
  MATRIX_REGISTRATION_TOKEN     one-time bearer token, needed until registered
  MATRIX_IMAGE_VERSION          sent as imageVersion; required to register
  MATRIX_REGISTER_DEADLINE      how long registration is retried (default: 24h)
  MATRIX_HEARTBEAT_INTERVAL     time between heartbeats (default: 5m)
  MATRIX_BACKUP_INTERVAL        /healthz allows twice this between backups (default: 1h)
  MATRIX_STATUS_LISTEN          endpoint address (default: 127.0.0.1:7781)
  MATRIX_INSTANCE_DATA          cloud-init instance data with the server id and addresses
                                (default: /run/cloud-init/instance-data.json)
  MATRIX_HETZNER_SERVER_ID, MATRIX_PUBLIC_IPV4, MATRIX_PUBLIC_IPV6
                                override the instance data, each on its own

Examples:
  systemctl status matrix-heartbeat
  curl -s http://127.0.0.1:7781/healthz
  curl -s http://127.0.0.1:7781/metrics")]
    Heartbeat,

    /// Show the gate, the last restore and backup, what latest names in the
    /// bucket, registration and heartbeat, with a health verdict.
    #[command(after_help = "Examples:\n  matrix-agent status\n  \
        matrix-agent status --json | jq .health")]
    Status {
        /// Print JSON for scripts instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Runs the chosen command against the process environment.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let env = Env::from_process();
    let env_dir = env.get("MATRIX_ENV_DIR").unwrap_or(config::DEFAULT_ENV_DIR);
    for problem in config::exposed_env_files(std::path::Path::new(env_dir)) {
        tracing::warn!("{problem}");
    }
    match cli.command {
        Command::Restore => restore::run(&env).await,
        Command::Backup => backup::run(&Config::from_env(&env)?).await,
        Command::Verify { snapshot } => {
            verify::run(&Config::from_env(&env)?, snapshot.as_deref()).await
        }
        Command::Prune {
            keep_last,
            keep_hourly,
            keep_daily,
            keep_weekly,
            keep_monthly,
            dry_run,
        } => {
            let given = [
                keep_last,
                keep_hourly,
                keep_daily,
                keep_weekly,
                keep_monthly,
            ];
            // Zeros alone are most likely a typo, and would delete all but
            // the newest snapshot and the one latest names.
            if given.iter().all(|count| count.unwrap_or(0) == 0) {
                return Err(ConfigError {
                    problems: vec!["prune needs a policy: give at least one of --keep-last, \
                         --keep-hourly, --keep-daily, --keep-weekly, --keep-monthly with a \
                         count of 1 or more"
                        .to_string()],
                }
                .into());
            }
            let policy = RetentionPolicy {
                keep_last: keep_last.unwrap_or(1),
                keep_hourly: keep_hourly.unwrap_or(0),
                keep_daily: keep_daily.unwrap_or(0),
                keep_weekly: keep_weekly.unwrap_or(0),
                keep_monthly: keep_monthly.unwrap_or(0),
            };
            prune::run(&Config::from_env(&env)?, &policy, dry_run).await
        }
        Command::Heartbeat => heartbeat::run(&env).await,
        Command::Status { json } => status::run(&env, json).await,
    }
}
