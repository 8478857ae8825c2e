//! The customer's PostgreSQL server and the client tools that match it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::process::Command;
use tokio_postgres::{Client, NoTls};

use crate::config::PostgresConfig;

/// The server's version, as `server_version_num` reports it.
#[derive(Clone, Debug)]
pub struct ServerVersion {
    pub major: u32,
    pub text: String,
}

/// A client tool (`pg_dump`, `pg_restore`) and the major version it reports.
#[derive(Clone, Debug)]
pub struct PgTool {
    pub path: PathBuf,
    pub major: u32,
    pub version: String,
}

fn client_config(config: &PostgresConfig) -> tokio_postgres::Config {
    let mut pg = tokio_postgres::Config::new();
    pg.host(&config.host)
        .port(config.port)
        .user(&config.user)
        .dbname(&config.database)
        .application_name("matrix-agent")
        .connect_timeout(Duration::from_secs(10));
    if let Some(password) = &config.password {
        pg.password(password.expose());
    }
    pg
}

/// Describes the connection target for messages, without the password.
pub fn describe(config: &PostgresConfig) -> String {
    format!(
        "database {} as {} on {}:{}",
        config.database, config.user, config.host, config.port
    )
}

/// Connects once; the connection task ends with the client.
pub async fn connect(config: &PostgresConfig) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = client_config(config).connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!("PostgreSQL connection closed: {error}");
        }
    });
    Ok(client)
}

/// Connects, waiting up to `limit` for a server that is still starting.
pub async fn wait_and_connect(config: &PostgresConfig, limit: Duration) -> anyhow::Result<Client> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(250);
    let mut last_report = Instant::now();
    loop {
        match connect(config).await {
            Ok(client) => return Ok(client),
            Err(error) if !is_transient(&error) => bail!(
                "PostgreSQL rejected the connection ({}): {}; check the POSTGRES_* and PG* \
                 settings and the role and database on the server",
                describe(config),
                error_summary(&error)
            ),
            Err(error) => {
                let waited = started.elapsed();
                if waited >= limit {
                    bail!(
                        "PostgreSQL did not accept connections within {}s ({}): {}; check \
                         `systemctl status postgresql` and the POSTGRES_* and PG* settings",
                        limit.as_secs(),
                        describe(config),
                        error_summary(&error)
                    );
                }
                if last_report.elapsed() >= Duration::from_secs(10) || waited.is_zero() {
                    tracing::info!(
                        "waiting for PostgreSQL ({}): {}",
                        describe(config),
                        error_summary(&error)
                    );
                    last_report = Instant::now();
                }
                tokio::time::sleep(delay.min(limit.saturating_sub(waited))).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Tells a server that is not up yet (no answer, or "starting up") from one
/// that answered with a definite refusal such as a bad password.
fn is_transient(error: &tokio_postgres::Error) -> bool {
    match error.as_db_error() {
        None => true,
        Some(db) => *db.code() == tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW,
    }
}

/// Shortens a driver error to its cause; the driver never includes the
/// password in its messages.
pub fn error_summary(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => {
            let mut text = error.to_string();
            let mut source = std::error::Error::source(error);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            text
        }
    }
}

pub async fn server_version(client: &Client) -> anyhow::Result<ServerVersion> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_setting('server_version')",
            &[],
        )
        .await
        .context("cannot read the server version")?;
    let number: i32 = row.get(0);
    Ok(ServerVersion {
        major: (number / 10_000) as u32,
        text: row.get(1),
    })
}

pub async fn database_size(client: &Client) -> anyhow::Result<u64> {
    let row = client
        .query_one("SELECT pg_database_size(current_database())", &[])
        .await
        .context("cannot read the database size")?;
    let size: i64 = row.get(0);
    Ok(size.max(0) as u64)
}

/// Environment for the client tools: libpq's variables and nothing else
/// from the agent's environment, so bucket credentials never reach them.
pub fn tool_env(config: &PostgresConfig) -> Vec<(String, String)> {
    let mut env = vec![
        ("PGHOST".to_string(), config.host.clone()),
        ("PGPORT".to_string(), config.port.to_string()),
        ("PGUSER".to_string(), config.user.clone()),
        ("PGDATABASE".to_string(), config.database.clone()),
        ("PGAPPNAME".to_string(), "matrix-agent".to_string()),
        ("PGCONNECT_TIMEOUT".to_string(), "10".to_string()),
    ];
    if let Some(password) = &config.password {
        env.push(("PGPASSWORD".to_string(), password.expose().to_string()));
    }
    for name in ["PATH", "LANG", "LC_ALL", "TZ"] {
        if let Ok(value) = std::env::var(name) {
            env.push((name.to_string(), value));
        }
    }
    env
}

/// Finds `name` for a server of major version `server_major`: the exact
/// version under `install_root`, then the oldest newer one there, then
/// `PATH`. A tool older than the server is rejected, because pg_dump
/// cannot dump a newer server and pg_restore may not read its archives.
pub async fn find_tool(
    name: &str,
    server_major: u32,
    install_root: &Path,
) -> anyhow::Result<PgTool> {
    let mut candidates = Vec::new();
    let exact = install_root
        .join(server_major.to_string())
        .join("bin")
        .join(name);
    if exact.is_file() {
        candidates.push(exact);
    }
    let mut newer: Vec<(u32, PathBuf)> = std::fs::read_dir(install_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major: u32 = entry.file_name().to_str()?.parse().ok()?;
            let path = entry.path().join("bin").join(name);
            (major > server_major && path.is_file()).then_some((major, path))
        })
        .collect();
    newer.sort();
    candidates.extend(newer.into_iter().map(|(_, path)| path));
    if let Some(on_path) = search_path(name) {
        candidates.push(on_path);
    }

    let mut too_old = Vec::new();
    for path in candidates {
        let tool = probe_tool(&path).await?;
        if tool.major >= server_major {
            return Ok(tool);
        }
        too_old.push(format!("{} is version {}", tool.path.display(), tool.major));
    }
    if too_old.is_empty() {
        bail!(
            "{name} was not found in {}/{server_major}/bin or on PATH; install the \
             postgresql-client-{server_major} package",
            install_root.display()
        );
    }
    bail!(
        "no {name} for PostgreSQL {server_major} was found ({}); an older {name} \
         cannot handle a newer server: install the postgresql-client-{server_major} package",
        too_old.join(", ")
    )
}

/// Finds the newest `name` under `install_root`, else on `PATH`: for reading
/// an archive without a server, where the newest tool reads the most.
pub async fn find_newest_tool(name: &str, install_root: &Path) -> anyhow::Result<PgTool> {
    let newest = std::fs::read_dir(install_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major: u32 = entry.file_name().to_str()?.parse().ok()?;
            let path = entry.path().join("bin").join(name);
            path.is_file().then_some((major, path))
        })
        .max();
    match newest.map(|(_, path)| path).or_else(|| search_path(name)) {
        Some(path) => probe_tool(&path).await,
        None => bail!(
            "{name} was not found under {} or on PATH; install a postgresql-client package",
            install_root.display()
        ),
    }
}

fn search_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

async fn probe_tool(path: &Path) -> anyhow::Result<PgTool> {
    let output = Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("cannot run {} --version", path.display()))?;
    let text = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let major = parse_tool_major(&text).with_context(|| {
        format!(
            "cannot read a version from `{} --version`: {text:?}",
            path.display()
        )
    })?;
    Ok(PgTool {
        path: path.into(),
        major,
        version: text,
    })
}

/// Describes how a client tool ended, for messages: "exited with status
/// 1", or "was killed by signal 9 (SIGKILL)" when the kernel, an operator
/// or the OOM killer ended it.
pub fn describe_exit(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(number)) => match nix::sys::signal::Signal::try_from(number) {
            Ok(signal) => format!("was killed by signal {number} ({signal})"),
            Err(_) => format!("was killed by signal {number}"),
        },
        (None, None) => "ended without an exit status".to_string(),
    }
}

/// Reads the major version from output such as
/// `pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)`.
pub fn parse_tool_major(text: &str) -> Option<u32> {
    let after = text.split_once("(PostgreSQL)")?.1.trim_start();
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_versions_parse() {
        assert_eq!(
            parse_tool_major("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(parse_tool_major("pg_restore (PostgreSQL) 17.2"), Some(17));
        assert_eq!(parse_tool_major("pg_dump (PostgreSQL) 9.6.24"), Some(9));
        assert_eq!(parse_tool_major("pg_dump 15"), None);
    }

    #[test]
    fn exits_are_described() {
        use std::os::unix::process::ExitStatusExt;
        let exited = std::process::ExitStatus::from_raw(1 << 8);
        assert_eq!(describe_exit(&exited), "exited with status 1");
        let killed = std::process::ExitStatus::from_raw(9);
        assert_eq!(describe_exit(&killed), "was killed by signal 9 (SIGKILL)");
    }
}
