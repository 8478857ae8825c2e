//! The on-host agent of the Matrix OS platform: it restores the customer's
//! PostgreSQL database at first boot, backs it up to an S3-compatible bucket,
//! and reports the host's health.

pub mod backup;
pub mod cli;
pub mod config;
pub mod endpoint;
pub mod error;
pub mod fencing;
pub mod gate;
pub mod heartbeat;
pub mod instance;
pub mod keys;
pub mod lock;
pub mod metrics;
pub mod postgres;
pub mod progress;
pub mod prune;
pub mod register;
pub mod restore;
pub mod size;
pub mod state;
pub mod status;
pub mod store;
pub mod upload;
pub mod verify;
pub mod vps_meta;
