//! The fidelity fixture and the comparison helpers, checked with the real
//! PostgreSQL tools before any agent is involved. While these fail, a
//! failing round trip tells nothing about the agent.

use matrix_agent_tests::agent::DATABASE_PASSWORD;
use matrix_agent_tests::contents::DatabaseContents;
use matrix_agent_tests::fixtures;
use matrix_agent_tests::postgres::Cluster;

#[test]
fn fidelity_fixture_loads_as_owner() {
    let cluster = Cluster::start(DATABASE_PASSWORD);

    fixtures::load_fidelity(&cluster);

    let contents = DatabaseContents::capture(&cluster);
    assert_eq!(contents.tables["app.users"].0, 4);
    assert_eq!(
        contents.tables["app.audit_log"].0, 4,
        "the insert trigger ran"
    );
    assert_eq!(contents.tables["app.blobs"].0, 6);
    assert_eq!(contents.tables["\"Mixed Case\".\"Order Items\""].0, 3);
    assert_eq!(contents.large_objects.len(), 3);
    assert_eq!(contents.sequences["app.invoice_numbers"], (1014, true));
    assert!(
        !contents.sequences["app.never_used"].1,
        "app.never_used reports is_called"
    );
    assert!(contents
        .schema
        .contains("CREATE EXTENSION IF NOT EXISTS citext"));
    assert!(contents.schema.contains("CREATE POLICY notes_by_author"));
    assert!(!contents.schema.contains("\\restrict"));
}

#[test]
fn fidelity_fixture_survives_pg_restore_as_owner() {
    let source = Cluster::start(DATABASE_PASSWORD);
    fixtures::load_fidelity(&source);
    let expected = DatabaseContents::capture(&source);
    let dump = source.dump_custom_format();

    let target = Cluster::start(DATABASE_PASSWORD);
    target.restore_custom_format(&dump);

    expected.assert_same_as(&DatabaseContents::capture(&target));
}

#[test]
fn contents_comparison_notices_changes() {
    let source = Cluster::start(DATABASE_PASSWORD);
    fixtures::load_fidelity(&source);
    let before = DatabaseContents::capture(&source);

    source.psql("UPDATE app.blobs SET data = '\\x0001' WHERE id = 1");
    let after_update = DatabaseContents::capture(&source);
    source.psql("SELECT nextval('app.never_used')");
    let after_nextval = DatabaseContents::capture(&source);
    source.psql("SELECT lo_put(424244, 0, '\\x00')");
    let after_lo_write = DatabaseContents::capture(&source);
    source.psql("COMMENT ON TABLE app.blobs IS 'changed'");
    let after_comment = DatabaseContents::capture(&source);

    assert_ne!(before.tables, after_update.tables);
    assert_ne!(after_update.sequences, after_nextval.sequences);
    assert_ne!(after_nextval.large_objects, after_lo_write.large_objects);
    assert_ne!(after_lo_write.schema, after_comment.schema);
}
