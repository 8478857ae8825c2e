//! Harness for the integration tests of `matrix-agent`: real PostgreSQL
//! clusters, a real S3 API (moto), the agent binary run with a clean
//! environment, and helpers that compare databases and inspect the bucket.
//!
//! Everything listens on 127.0.0.1 and lives in temporary directories that
//! are removed, with their processes, when the owning value is dropped.

pub mod agent;
pub mod bucket;
pub mod contents;
pub mod fault_proxy;
pub mod fault_scenario;
pub mod fixtures;
pub mod heartbeat_service;
pub mod host;
pub mod install_root;
pub mod invariants;
pub mod loopback;
pub mod moto;
pub mod notify_socket;
pub mod platform;
pub mod postgres;
pub mod process;
pub mod prometheus_text;
