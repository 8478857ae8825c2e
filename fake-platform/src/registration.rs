//! The body of `POST /vps/register` and the `vps-meta.json` document the
//! platform stores after a successful registration.

use std::net::{Ipv4Addr, Ipv6Addr};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Map, Value};

/// A registration request that passed validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub machine_id: String,
    pub hetzner_server_id: u64,
    pub public_ipv4: Ipv4Addr,
    pub public_ipv6: Option<Ipv6Addr>,
    pub image_version: String,
}

/// Parses and validates a request body the way the platform does: a JSON
/// object with a UUID `machineId`, a positive whole `hetznerServerId`, an
/// IPv4 `publicIPv4`, an optional IPv6 `publicIPv6` and a non-empty
/// `imageVersion`. Unknown fields are ignored. The error names the first
/// invalid field.
pub fn parse_registration(body: &[u8]) -> Result<Registration, String> {
    let document: Value =
        serde_json::from_slice(body).map_err(|error| format!("body is not JSON: {error}"))?;
    let object = document
        .as_object()
        .ok_or_else(|| "body is not a JSON object".to_string())?;

    let machine_id = required_string(object, "machineId")?;
    uuid::Uuid::parse_str(machine_id)
        .map_err(|_| format!("machineId '{machine_id}' is not a UUID"))?;

    let hetzner_server_id = object
        .get("hetznerServerId")
        .ok_or("hetznerServerId is missing")?
        .as_u64()
        .filter(|id| *id > 0)
        .ok_or("hetznerServerId must be a positive whole number")?;

    let ipv4_text = required_string(object, "publicIPv4")?;
    let public_ipv4 = ipv4_text
        .parse()
        .map_err(|_| format!("publicIPv4 '{ipv4_text}' is not an IPv4 address"))?;

    let public_ipv6 = match object.get("publicIPv6") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(
            text.parse()
                .map_err(|_| format!("publicIPv6 '{text}' is not an IPv6 address"))?,
        ),
        Some(_) => return Err("publicIPv6 must be a string".to_string()),
    };

    let image_version = required_string(object, "imageVersion")?;
    if image_version.trim().is_empty() {
        return Err("imageVersion is empty".to_string());
    }

    Ok(Registration {
        machine_id: machine_id.to_string(),
        hetzner_server_id,
        public_ipv4,
        public_ipv6,
        image_version: image_version.to_string(),
    })
}

fn required_string<'a>(object: &'a Map<String, Value>, field: &str) -> Result<&'a str, String> {
    match object.get(field) {
        None => Err(format!("{field} is missing")),
        Some(Value::String(text)) => Ok(text),
        Some(_) => Err(format!("{field} must be a string")),
    }
}

/// Builds `system/vps-meta.json`, version 1, for a registered machine.
/// `provisionedAt` and `lastSyncAt` are both the registration time, and
/// `publicIPv6` appears only when the host sent one.
pub fn vps_meta_document(user_id: &str, registration: &Registration, now: DateTime<Utc>) -> Value {
    let now = now.to_rfc3339_opts(SecondsFormat::Secs, true);
    let mut document = json!({
        "version": 1,
        "userId": user_id,
        "machineId": registration.machine_id,
        "hetznerServerId": registration.hetzner_server_id,
        "imageVersion": registration.image_version,
        "status": "running",
        "provisionedAt": now,
        "lastSyncAt": now,
        "publicIPv4": registration.public_ipv4.to_string(),
    });
    if let Some(ipv6) = registration.public_ipv6 {
        document["publicIPv6"] = json!(ipv6.to_string());
    }
    document
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    const MACHINE: &str = "9f05824c-2d3e-4b8a-9c1d-0e5f6a7b8c9d";

    fn valid_body() -> Value {
        json!({
            "machineId": MACHINE,
            "hetznerServerId": 12345678,
            "publicIPv4": "203.0.113.10",
            "imageVersion": "matrix-os-host-2026.04.26-1",
        })
    }

    fn parse_value(body: &Value) -> Result<Registration, String> {
        parse_registration(&serde_json::to_vec(body).unwrap())
    }

    #[test]
    fn valid_request_parses() {
        let mut body = valid_body();
        body["publicIPv6"] = json!("2a01:4f8::1");
        let registration = parse_value(&body).unwrap();
        assert_eq!(registration.machine_id, MACHINE);
        assert_eq!(registration.hetzner_server_id, 12345678);
        assert_eq!(registration.public_ipv4, Ipv4Addr::new(203, 0, 113, 10));
        assert_eq!(
            registration.public_ipv6,
            Some("2a01:4f8::1".parse().unwrap())
        );
        assert_eq!(registration.image_version, "matrix-os-host-2026.04.26-1");
    }

    #[test]
    fn invalid_fields_are_named() {
        let cases = [
            ("machineId", json!("not-a-uuid"), "machineId"),
            ("machineId", Value::Null, "machineId"),
            ("hetznerServerId", json!(0), "hetznerServerId"),
            ("hetznerServerId", json!("123"), "hetznerServerId"),
            ("hetznerServerId", json!(-4), "hetznerServerId"),
            ("publicIPv4", json!("2a01:4f8::1"), "publicIPv4"),
            ("publicIPv6", json!("203.0.113.10"), "publicIPv6"),
            ("publicIPv6", json!(6), "publicIPv6"),
            ("imageVersion", json!(""), "imageVersion"),
        ];
        for (field, value, expected) in cases {
            let mut body = valid_body();
            body[field] = value.clone();
            let error = parse_value(&body).unwrap_err();
            assert!(error.contains(expected), "{field}={value}: {error}");
        }
    }

    #[test]
    fn missing_fields_are_named() {
        for field in ["machineId", "hetznerServerId", "publicIPv4", "imageVersion"] {
            let mut body = valid_body();
            body.as_object_mut().unwrap().remove(field);
            let error = parse_value(&body).unwrap_err();
            assert_eq!(error, format!("{field} is missing"));
        }
    }

    #[test]
    fn non_json_body_is_rejected() {
        assert!(parse_registration(b"machineId=1").is_err());
        assert!(parse_registration(b"[1, 2]").is_err());
    }

    #[test]
    fn meta_document_has_contract_fields() {
        let registration = parse_value(&valid_body()).unwrap();
        let now = Utc.with_ymd_and_hms(2026, 4, 26, 10, 0, 0).unwrap();
        let document = vps_meta_document("user_2x", &registration, now);
        assert_eq!(
            document,
            json!({
                "version": 1,
                "userId": "user_2x",
                "machineId": MACHINE,
                "hetznerServerId": 12345678,
                "imageVersion": "matrix-os-host-2026.04.26-1",
                "status": "running",
                "provisionedAt": "2026-04-26T10:00:00Z",
                "lastSyncAt": "2026-04-26T10:00:00Z",
                "publicIPv4": "203.0.113.10",
            })
        );
    }

    #[test]
    fn meta_document_carries_ipv6_when_sent() {
        let mut body = valid_body();
        body["publicIPv6"] = json!("2a01:4f8::1");
        let registration = parse_value(&body).unwrap();
        let document = vps_meta_document("user_2x", &registration, Utc::now());
        assert_eq!(document["publicIPv6"], "2a01:4f8::1");
    }
}
