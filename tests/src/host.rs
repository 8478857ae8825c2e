//! A simulated customer host: its database, its state directory and
//! restore marker, and the bucket it backs up to.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use tempfile::TempDir;

use crate::agent::{
    Agent, AgentRun, ACCESS_KEY_ID, DATABASE_PASSWORD, SECRET_ACCESS_KEY, SESSION_TOKEN,
};
use crate::bucket::{Bucket, LATEST, VPS_META};
use crate::fault_proxy::{s3_flavour, FaultProxy, ProxyMode};
use crate::fixtures;
use crate::moto::MotoServer;
use crate::postgres::{Cluster, DATABASE, OWNER};

/// The customer every test host belongs to.
pub const USER_ID: &str = "user_2xMatrixTests01";

/// The bucket every test host writes to.
pub const BUCKET_NAME: &str = "matrix-backups";

/// Returns the customer's key prefix, `matrixos-sync/<userId>/`.
pub fn user_prefix() -> String {
    format!("matrixos-sync/{USER_ID}/")
}

/// An S3 server holding the customer's bucket, shared by the hosts of one
/// test (an old host and its replacement, say).
pub struct ObjectStore {
    // Declared first so that the client and the proxy go before their
    // server.
    pub bucket: Bucket,
    /// The proxy the agent reaches the bucket through, when there is one;
    /// the test's own client always talks to moto directly.
    pub proxy: Option<FaultProxy>,
    pub server: MotoServer,
}

impl ObjectStore {
    /// Starts moto and creates an empty bucket.
    pub fn start() -> ObjectStore {
        ObjectStore::with_server(MotoServer::start())
    }

    /// Starts moto with its request recorder on and creates an empty
    /// bucket.
    pub fn start_recording() -> ObjectStore {
        ObjectStore::with_server(MotoServer::start_recording())
    }

    fn with_server(server: MotoServer) -> ObjectStore {
        let bucket = Bucket::create(&server.endpoint(), BUCKET_NAME, &user_prefix());
        let proxy = match s3_flavour() {
            ProxyMode::Plain => None,
            ProxyMode::R2 => Some(FaultProxy::start(&server.endpoint(), ProxyMode::R2)),
        };
        ObjectStore {
            bucket,
            proxy,
            server,
        }
    }

    /// Returns the endpoint the agent uses: the proxy's when there is one.
    pub fn agent_endpoint(&self) -> String {
        match &self.proxy {
            Some(proxy) => proxy.endpoint(),
            None => self.bucket.endpoint().to_owned(),
        }
    }

    /// Writes `system/vps-meta.json` naming `machine_id`, as the platform
    /// does when a host registers.
    pub fn register(&self, machine_id: &str) {
        self.bucket
            .put(VPS_META, fixtures::vps_meta(USER_ID, machine_id).as_bytes());
    }

    /// Uploads `dump` as the snapshot `key` without metadata, like the
    /// snapshots made before the agent, and points `system/db/latest` at it.
    pub fn publish_snapshot(&self, key: &str, dump: &[u8]) {
        self.bucket.put(key, dump);
        self.bucket.put(LATEST, format!("{key}\n").as_bytes());
    }
}

/// A host: a PostgreSQL cluster with the customer database, a machine id,
/// and the directories the agent keeps its state and marker in.
pub struct Host {
    pub cluster: Cluster,
    machine_id: String,
    endpoint: String,
    dir: TempDir,
}

impl Host {
    /// Creates a freshly provisioned host whose agent talks to `store`. The
    /// state directory exists and the restore marker does not.
    pub fn new(store: &ObjectStore) -> Host {
        let dir = tempfile::Builder::new()
            .prefix("matrix-host-")
            .tempdir()
            .expect("creating the host directory");
        let host = Host {
            cluster: Cluster::start(DATABASE_PASSWORD),
            machine_id: uuid::Uuid::new_v4().to_string(),
            endpoint: store.agent_endpoint(),
            dir,
        };
        fs::create_dir_all(host.state_dir()).expect("creating the state directory");
        fs::create_dir_all(host.marker_dir()).expect("creating the marker directory");
        host
    }

    pub fn machine_id(&self) -> &str {
        &self.machine_id
    }

    /// `MATRIX_STATE_DIR`, the host's `/var/lib/matrix`.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("var-lib-matrix")
    }

    fn marker_dir(&self) -> PathBuf {
        self.dir.path().join("opt-matrix")
    }

    /// `MATRIX_RESTORE_MARKER`, the host's `/opt/matrix/restore-complete`.
    pub fn marker_path(&self) -> PathBuf {
        self.marker_dir().join("restore-complete")
    }

    /// Checks whether the marker exists as a regular file (not through a
    /// symlink).
    pub fn has_regular_marker(&self) -> bool {
        fs::symlink_metadata(self.marker_path()).is_ok_and(|meta| meta.file_type().is_file())
    }

    /// Creates the marker as a completed restore would.
    pub fn write_marker(&self) {
        fs::write(self.marker_path(), b"restored by test setup\n").expect("writing the marker");
    }

    pub fn remove_marker(&self) {
        fs::remove_file(self.marker_path()).expect("removing the marker");
    }

    /// Returns the agent as this host's systemd units run it, with every
    /// variable of the documented interface set for this host's database
    /// and bucket.
    pub fn agent(&self) -> Agent {
        let env: BTreeMap<String, String> = [
            ("MATRIX_MACHINE_ID", self.machine_id.clone()),
            ("MATRIX_CLERK_USER_ID", USER_ID.to_owned()),
            ("MATRIX_R2_BUCKET", BUCKET_NAME.to_owned()),
            ("MATRIX_R2_PREFIX", user_prefix()),
            ("R2_ENDPOINT", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY.to_owned()),
            ("AWS_SESSION_TOKEN", SESSION_TOKEN.to_owned()),
            ("AWS_DEFAULT_REGION", "auto".to_owned()),
            ("POSTGRES_DB", DATABASE.to_owned()),
            ("POSTGRES_USER", OWNER.to_owned()),
            ("POSTGRES_PASSWORD", DATABASE_PASSWORD.to_owned()),
            ("PGHOST", "127.0.0.1".to_owned()),
            ("PGPORT", self.cluster.port().to_string()),
            ("MATRIX_STATE_DIR", self.state_dir().display().to_string()),
            (
                "MATRIX_RESTORE_MARKER",
                self.marker_path().display().to_string(),
            ),
            // A test whose database never comes up should fail in seconds,
            // not after the five-minute default.
            ("MATRIX_PG_WAIT", "20s".to_owned()),
            // The default reserve of 1 GiB would make the tests depend on
            // the free space of the machine that runs them.
            ("MATRIX_DISK_RESERVE", "16MiB".to_owned()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect();
        Agent::new(env)
    }

    /// Runs `matrix-agent restore` with the host's environment.
    pub fn restore(&self) -> AgentRun {
        self.agent().run(&["restore"])
    }

    /// Runs `matrix-agent backup` with the host's environment.
    pub fn backup(&self) -> AgentRun {
        self.agent().run(&["backup"])
    }
}
