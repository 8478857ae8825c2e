//! Data the tests load into databases and buckets.

use std::path::PathBuf;

use crate::postgres::Cluster;

/// Path of the SQL script with one of every kind of object a customer
/// database may hold.
pub fn fidelity_sql() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/fidelity.sql")
}

/// Loads the fidelity fixture into the customer database, as its owner.
pub fn load_fidelity(cluster: &Cluster) {
    cluster.psql_file(&fidelity_sql());
}

/// Creates a small table of customer notes, enough to tell whether a run
/// touched the database.
pub fn load_notes(cluster: &Cluster) {
    cluster.psql(
        "CREATE TABLE notes (id integer PRIMARY KEY, body text NOT NULL);
         INSERT INTO notes VALUES (1, 'first note'), (2, 'zweite Notiz');",
    );
}

/// Creates the table `payload` with `mebibytes` rows of 1 MiB of
/// pseudo-random bytes each.
///
/// The bytes are MD5 digests of distinct inputs, which zlib cannot
/// compress, so the custom-format dump is at least as large as the data.
/// That keeps the number of multipart parts predictable.
pub fn load_payload(cluster: &Cluster, mebibytes: usize) {
    cluster.psql(&format!(
        "CREATE TABLE payload (id integer PRIMARY KEY, data bytea NOT NULL);
         INSERT INTO payload
         SELECT row_number, decode(string_agg(md5(random()::text || row_number || chunk), ''
                                              ORDER BY chunk), 'hex')
         FROM generate_series(1, {mebibytes}) AS row_number,
              generate_series(1, 65536) AS chunk
         GROUP BY row_number;"
    ));
}

/// Builds `system/vps-meta.json` as the platform writes it when the
/// machine `machine_id` registers.
pub fn vps_meta(user_id: &str, machine_id: &str) -> String {
    let meta = serde_json::json!({
        "version": 1,
        "userId": user_id,
        "machineId": machine_id,
        "hetznerServerId": 12345678,
        "imageVersion": "matrix-os-host-2026.04.26-1",
        "status": "running",
        "provisionedAt": "2026-04-26T10:00:00Z",
        "lastSyncAt": "2026-04-26T18:05:00Z",
        "publicIPv4": "192.0.2.10",
        "publicIPv6": "2001:db8::10"
    });
    serde_json::to_string_pretty(&meta).expect("serializing vps-meta.json")
}
