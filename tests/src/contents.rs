//! What a database holds, captured in a form two databases can be compared
//! by: the schema as `pg_dump` prints it, a hash of each table's rows, the
//! large objects and the sequence positions.

use std::collections::BTreeMap;

use crate::postgres::Cluster;

/// The observable contents of the customer database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatabaseContents {
    /// `pg_dump --schema-only` output, without the lines that differ on
    /// every run.
    pub schema: String,
    /// Row count and MD5 of the sorted row texts, by qualified table name.
    pub tables: BTreeMap<String, (u64, String)>,
    /// Owner, comment and MD5 of the content, by large object OID.
    pub large_objects: BTreeMap<u32, (String, String, String)>,
    /// `last_value` and `is_called`, by qualified sequence name.
    pub sequences: BTreeMap<String, (i64, bool)>,
}

impl DatabaseContents {
    pub fn capture(cluster: &Cluster) -> DatabaseContents {
        DatabaseContents {
            schema: schema(cluster),
            tables: table_hashes(cluster),
            large_objects: large_objects(cluster),
            sequences: sequence_positions(cluster),
        }
    }

    /// Asserts that `actual` contains the same as `self`, naming the first
    /// difference rather than printing both dumps whole.
    pub fn assert_same_as(&self, actual: &DatabaseContents) {
        let expected_lines: Vec<&str> = self.schema.lines().collect();
        let actual_lines: Vec<&str> = actual.schema.lines().collect();
        if let Some(index) = (0..expected_lines.len().max(actual_lines.len()))
            .find(|&i| expected_lines.get(i) != actual_lines.get(i))
        {
            let context = |lines: &[&str]| {
                lines[index.saturating_sub(3)..(index + 4).min(lines.len())].join("\n")
            };
            panic!(
                "schemas differ at line {}:\n--- expected ---\n{}\n--- actual ---\n{}",
                index + 1,
                context(&expected_lines),
                context(&actual_lines)
            );
        }

        assert_eq!(self.tables, actual.tables, "table contents differ");
        assert_eq!(
            self.large_objects, actual.large_objects,
            "large objects differ"
        );
        assert_eq!(
            self.sequences, actual.sequences,
            "sequence positions differ"
        );
    }
}

/// Dumps the schema with `pg_dump --schema-only`, as the owner.
///
/// Current pg_dump releases (15.18 here) print `\restrict KEY` and
/// `\unrestrict KEY` lines with a new random key on every run. Those lines
/// are dropped and nothing else is.
pub fn schema(cluster: &Cluster) -> String {
    let mut command = cluster.owner_command("pg_dump");
    command.arg("--schema-only");
    let output = command.output().expect("running pg_dump --schema-only");
    assert!(
        output.status.success(),
        "pg_dump --schema-only failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    let dump = String::from_utf8(output.stdout).expect("pg_dump output is UTF-8");
    dump.lines()
        .filter(|line| !line.starts_with("\\restrict ") && !line.starts_with("\\unrestrict "))
        .map(|line| format!("{line}\n"))
        .collect()
}

fn table_hashes(cluster: &Cluster) -> BTreeMap<String, (u64, String)> {
    // The server quotes the names, so odd identifiers need no care here.
    let query = cluster.psql(
        "SELECT string_agg(
             format('SELECT %L, count(*), md5(coalesce(string_agg(t::text, E''\\n'' \
                     ORDER BY t::text), '''')) FROM %s AS t', name, name),
             ' UNION ALL ' ORDER BY name)
         FROM (SELECT format('%I.%I', n.nspname, c.relname) AS name
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE c.relkind IN ('r', 'm')
                 AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                 AND n.nspname NOT LIKE 'pg\\_toast%') AS tables",
    );
    if query.is_empty() {
        return BTreeMap::new();
    }

    cluster
        .psql_rows(&query)
        .into_iter()
        .map(|row| {
            let count = row[1].parse().expect("count(*) is a number");
            (row[0].clone(), (count, row[2].clone()))
        })
        .collect()
}

fn large_objects(cluster: &Cluster) -> BTreeMap<u32, (String, String, String)> {
    let rows = cluster.psql_rows(
        "SELECT l.oid, pg_get_userbyid(l.lomowner),
                coalesce(obj_description(l.oid, 'pg_largeobject'), ''),
                md5(lo_get(l.oid))
         FROM pg_largeobject_metadata l ORDER BY l.oid",
    );
    rows.into_iter()
        .map(|row| {
            let oid = row[0].parse().expect("an OID is a number");
            (oid, (row[1].clone(), row[2].clone(), row[3].clone()))
        })
        .collect()
}

fn sequence_positions(cluster: &Cluster) -> BTreeMap<String, (i64, bool)> {
    let query = cluster.psql(
        "SELECT string_agg(
             format('SELECT %L, last_value, is_called FROM %s', name, name),
             ' UNION ALL ' ORDER BY name)
         FROM (SELECT format('%I.%I', schemaname, sequencename) AS name
               FROM pg_sequences) AS sequences",
    );
    if query.is_empty() {
        return BTreeMap::new();
    }

    cluster
        .psql_rows(&query)
        .into_iter()
        .map(|row| {
            let last_value = row[1].parse().expect("last_value is a number");
            (row[0].clone(), (last_value, row[2] == "t"))
        })
        .collect()
}
