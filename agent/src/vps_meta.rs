//! `system/vps-meta.json`: whose machine the bucket currently belongs to.
//!
//! The platform writes it when a host registers. Until this host has
//! registered, metadata naming another machine describes the host being
//! replaced; once it has registered, metadata naming another machine means
//! a newer replacement exists and this host must stop writing.

use serde_json::Value;
use uuid::Uuid;

/// Who the metadata says the bucket belongs to, from this host's view.
#[derive(Debug, PartialEq, Eq)]
pub enum Ownership {
    /// No metadata yet: a first install before registration.
    Unclaimed,
    /// The metadata names this machine.
    Ours,
    /// It names another machine and this host has not registered yet.
    NotRegisteredYet { other: String },
    /// It names another machine although this host registered: a newer
    /// replacement exists.
    Superseded { other: String },
}

/// Parsed metadata, kept as a JSON object so that fields the host does not
/// own survive a read-modify-write unchanged.
#[derive(Clone, Debug)]
pub struct VpsMeta {
    pub document: serde_json::Map<String, Value>,
}

impl VpsMeta {
    pub fn parse(body: &[u8]) -> Result<VpsMeta, String> {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(document)) => Ok(VpsMeta { document }),
            Ok(_) => Err("is not a JSON object".into()),
            Err(error) => Err(format!("is not valid JSON ({error})")),
        }
    }

    pub fn machine_id(&self) -> Option<&str> {
        self.document.get("machineId").and_then(Value::as_str)
    }

    pub fn user_id(&self) -> Option<&str> {
        self.document.get("userId").and_then(Value::as_str)
    }
}

/// Decides whose bucket it is from the metadata (if any) and this host's
/// registration state.
pub fn ownership(meta: Option<&VpsMeta>, machine_id: Uuid, registered: bool) -> Ownership {
    let Some(meta) = meta else {
        return Ownership::Unclaimed;
    };
    let named = meta.machine_id().unwrap_or("");
    let ours = Uuid::parse_str(named).is_ok_and(|named| named == machine_id);
    if ours {
        Ownership::Ours
    } else if registered {
        Ownership::Superseded {
            other: named.to_string(),
        }
    } else {
        Ownership::NotRegisteredYet {
            other: named.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: &str = "9f05824c-2d3e-4b8a-9c1d-0e5f6a7b8c9d";
    const OTHER: &str = "11111111-2222-4333-8444-555555555555";

    fn meta(machine_id: &str) -> VpsMeta {
        VpsMeta::parse(
            format!(r#"{{"version":1,"userId":"user_2abc","machineId":"{machine_id}"}}"#)
                .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn absent_metadata_is_unclaimed() {
        let id = Uuid::parse_str(OURS).unwrap();
        assert_eq!(ownership(None, id, false), Ownership::Unclaimed);
    }

    #[test]
    fn our_machine_id_in_any_case_is_ours() {
        let id = Uuid::parse_str(OURS).unwrap();
        assert_eq!(ownership(Some(&meta(OURS)), id, true), Ownership::Ours);
        let upper = OURS.to_uppercase();
        assert_eq!(ownership(Some(&meta(&upper)), id, false), Ownership::Ours);
    }

    #[test]
    fn another_machine_before_registration_is_the_previous_host() {
        let id = Uuid::parse_str(OURS).unwrap();
        assert!(matches!(
            ownership(Some(&meta(OTHER)), id, false),
            Ownership::NotRegisteredYet { .. }
        ));
    }

    #[test]
    fn another_machine_after_registration_supersedes_us() {
        let id = Uuid::parse_str(OURS).unwrap();
        assert!(matches!(
            ownership(Some(&meta(OTHER)), id, true),
            Ownership::Superseded { .. }
        ));
    }

    #[test]
    fn metadata_must_be_an_object() {
        assert!(VpsMeta::parse(b"[1,2]").is_err());
        assert!(VpsMeta::parse(b"{not json").is_err());
    }
}
