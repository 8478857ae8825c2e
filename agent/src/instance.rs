//! The server's identity at the provider: Hetzner server id and public
//! addresses, from cloud-init's instance data or explicit overrides.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use anyhow::{anyhow, Context};
use serde_json::Value;

use crate::config::HeartbeatSettings;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerIdentity {
    pub server_id: u64,
    pub ipv4: Ipv4Addr,
    pub ipv6: Option<Ipv6Addr>,
}

/// What cloud-init's instance data says, each part optional.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct InstanceData {
    pub server_id: Option<u64>,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

/// Parses `instance-data.json` as cloud-init writes it on Hetzner: the id
/// in `v1.instance_id` (a string) or the datasource's `instance-id`, the
/// IPv4 address in the metadata's `public-ipv4`, and the IPv6 address in
/// the static IPv6 subnet of its `network-config`.
pub fn parse_instance_data(document: &Value) -> InstanceData {
    let meta = &document["ds"]["meta_data"];
    let server_id = match &document["v1"]["instance_id"] {
        Value::String(text) => text.parse().ok(),
        Value::Number(number) => number.as_u64(),
        _ => None,
    }
    .or_else(|| meta["instance-id"].as_u64())
    .or_else(|| {
        meta["instance-id"]
            .as_str()
            .and_then(|text| text.parse().ok())
    });

    let ipv4 = meta["public-ipv4"]
        .as_str()
        .or_else(|| document["v1"]["public_ipv4"].as_str())
        .and_then(|text| text.parse().ok());

    let ipv6 = meta["network-config"]["config"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|interface| interface["subnets"].as_array().into_iter().flatten())
        .filter(|subnet| subnet["ipv6"].as_bool() == Some(true) || subnet["type"] == "static6")
        .filter_map(|subnet| subnet["address"].as_str())
        .filter_map(|address| address.split('/').next()?.parse().ok())
        .next();

    InstanceData {
        server_id,
        ipv4,
        ipv6,
    }
}

/// Resolves the identity: each override wins over the instance data, which
/// is read only when an override is missing.
pub fn resolve(settings: &HeartbeatSettings) -> anyhow::Result<ServerIdentity> {
    let needs_file = settings.server_id_override.is_none() || settings.ipv4_override.is_none();
    let from_file = if needs_file {
        read_instance_data(&settings.instance_data)?
    } else {
        InstanceData::default()
    };
    let server_id = settings
        .server_id_override
        .or(from_file.server_id)
        .ok_or_else(|| {
            anyhow!(
                "no Hetzner server id: {} has none and MATRIX_HETZNER_SERVER_ID is not set",
                settings.instance_data.display()
            )
        })?;
    let ipv4 = settings.ipv4_override.or(from_file.ipv4).ok_or_else(|| {
        anyhow!(
            "no public IPv4 address: {} has none and MATRIX_PUBLIC_IPV4 is not set",
            settings.instance_data.display()
        )
    })?;
    Ok(ServerIdentity {
        server_id,
        ipv4,
        ipv6: settings.ipv6_override.or(from_file.ipv6),
    })
}

fn read_instance_data(path: &Path) -> anyhow::Result<InstanceData> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "cannot read cloud-init's instance data {}; set MATRIX_HETZNER_SERVER_ID and \
             MATRIX_PUBLIC_IPV4, or MATRIX_INSTANCE_DATA",
            path.display()
        )
    })?;
    let document: Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    Ok(parse_instance_data(&document))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hetzner_instance_data_parses() {
        let document: Value = serde_json::from_str(
            r#"{
              "v1": {"cloud_name": "hetzner", "instance_id": "12345678", "platform": "hetzner"},
              "ds": {"meta_data": {
                "instance-id": 12345678,
                "public-ipv4": "203.0.113.10",
                "network-config": {"version": 1, "config": [{"type": "physical", "name": "eth0",
                  "subnets": [
                    {"type": "dhcp", "ipv4": true},
                    {"type": "static", "ipv6": true, "address": "2001:db8:1c1c::1/64", "gateway": "fe80::1"}
                  ]}]}
              }}
            }"#,
        )
        .unwrap();
        assert_eq!(
            parse_instance_data(&document),
            InstanceData {
                server_id: Some(12345678),
                ipv4: Some("203.0.113.10".parse().unwrap()),
                ipv6: Some("2001:db8:1c1c::1".parse().unwrap()),
            }
        );
    }

    #[test]
    fn missing_parts_stay_empty() {
        let document: Value = serde_json::from_str(r#"{"v1": {"instance_id": "i-abc"}}"#).unwrap();
        assert_eq!(parse_instance_data(&document), InstanceData::default());
    }
}
