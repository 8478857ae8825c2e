//! Object keys in the customer's bucket, and the rules they must follow.
//!
//! Every key the agent touches is the customer's prefix plus a relative key
//! under `system/`. The platform reads `system/db/latest` and checks the
//! snapshot key it holds against [`SNAPSHOT_PATTERN`], so the snapshot name
//! carries the UTC minute and nothing else.

use std::fmt;

use chrono::{DateTime, NaiveDateTime, Timelike, Utc};

/// Relative key of the machine metadata the platform writes.
pub const VPS_META: &str = "system/vps-meta.json";
/// Relative key of the agent's own health report.
pub const HOST_STATUS: &str = "system/host-status.json";
/// Relative key of the pointer to the newest good snapshot.
pub const LATEST: &str = "system/db/latest";
/// Folder of the snapshots, each named by the UTC minute it was taken.
pub const SNAPSHOTS_DIR: &str = "system/db/snapshots/";
/// Folder of uploads in progress; nothing outside the agent reads it.
pub const STAGING_DIR: &str = "system/db/staging/";
/// The pattern the platform validates the pointer with, for messages.
pub const SNAPSHOT_PATTERN: &str = r"^system/db/snapshots/\d{4}-\d{2}-\d{2}T\d{4}Z\.dump$";

const SNAPSHOT_TIME_FORMAT: &str = "%Y-%m-%dT%H%MZ";

/// Checks a relative key: under `system/`, no `..` segment, no `://`, no
/// leading `/`, no control characters.
pub fn validate_relative(key: &str) -> Result<(), String> {
    if key.chars().any(char::is_control) {
        return Err("contains a control character".into());
    }
    if key.starts_with('/') {
        return Err("starts with '/'".into());
    }
    if key.contains("://") {
        return Err("looks like a URL".into());
    }
    if key.split('/').any(|segment| segment == "..") || key.contains("..") {
        return Err("contains '..'".into());
    }
    if !key.starts_with("system/") {
        return Err("is not under system/".into());
    }
    Ok(())
}

/// Checks a customer prefix: `matrixos-sync/<userId>/` for the given user.
pub fn validate_prefix(prefix: &str, user_id: &str) -> Result<(), String> {
    let expected = format!("matrixos-sync/{user_id}/");
    if prefix == expected {
        return Ok(());
    }
    let owner = prefix
        .strip_prefix("matrixos-sync/")
        .and_then(|rest| rest.strip_suffix('/'));
    match owner {
        Some(owner) if valid_user_id(owner) => Err(format!(
            "belongs to another customer; expected {expected} for \
             MATRIX_CLERK_USER_ID"
        )),
        _ => Err(format!(
            "must have the form matrixos-sync/<userId>/, here {expected}"
        )),
    }
}

/// Checks a customer id: 3 to 256 of `A-Z a-z 0-9 _ -`.
pub fn valid_user_id(user_id: &str) -> bool {
    (3..=256).contains(&user_id.len())
        && user_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A snapshot's relative key, `system/db/snapshots/YYYY-MM-DDTHHmmZ.dump`.
///
/// Ordering follows the timestamp, which is also the lexical order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapshotKey {
    taken_at: NaiveDateTime,
}

impl SnapshotKey {
    /// Names the snapshot for the UTC minute that contains `time`.
    pub fn for_minute(time: DateTime<Utc>) -> SnapshotKey {
        let minute = time
            .naive_utc()
            .with_second(0)
            .and_then(|t| t.with_nanosecond(0))
            .expect("zero seconds and nanoseconds are always valid");
        SnapshotKey { taken_at: minute }
    }

    /// Parses a relative key, accepting exactly [`SNAPSHOT_PATTERN`].
    pub fn parse(key: &str) -> Result<SnapshotKey, String> {
        let stamp = key
            .strip_prefix(SNAPSHOTS_DIR)
            .and_then(|rest| rest.strip_suffix(".dump"))
            .ok_or_else(|| format!("does not match {SNAPSHOT_PATTERN}"))?;
        let shape_ok = stamp.len() == 16
            && stamp.bytes().enumerate().all(|(i, b)| match i {
                4 | 7 => b == b'-',
                10 => b == b'T',
                15 => b == b'Z',
                _ => b.is_ascii_digit(),
            });
        if !shape_ok {
            return Err(format!("does not match {SNAPSHOT_PATTERN}"));
        }
        let taken_at = NaiveDateTime::parse_from_str(stamp, SNAPSHOT_TIME_FORMAT)
            .map_err(|_| format!("names an impossible date or time ({stamp})"))?;
        Ok(SnapshotKey { taken_at })
    }

    /// Returns the UTC minute the snapshot was taken in.
    pub fn taken_at(&self) -> DateTime<Utc> {
        self.taken_at.and_utc()
    }

    /// Returns the snapshot of the following minute.
    pub fn next_minute(&self) -> SnapshotKey {
        SnapshotKey {
            taken_at: self.taken_at + chrono::Duration::minutes(1),
        }
    }

    /// Returns the relative key.
    pub fn key(&self) -> String {
        format!(
            "{SNAPSHOTS_DIR}{}.dump",
            self.taken_at.format(SNAPSHOT_TIME_FORMAT)
        )
    }
}

impl fmt::Display for SnapshotKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

/// The content of `system/db/latest`: the snapshot key and a newline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatestPointer {
    pub snapshot: SnapshotKey,
}

impl LatestPointer {
    /// Parses the pointer object's body. Readers trim whitespace; anything
    /// else that is not a valid snapshot key is rejected with the reason.
    pub fn parse(body: &[u8]) -> Result<LatestPointer, String> {
        let text = std::str::from_utf8(body).map_err(|_| "is not UTF-8 text".to_string())?;
        let key = text.trim();
        if key.is_empty() {
            return Err("is empty".into());
        }
        validate_relative(key)?;
        let snapshot = SnapshotKey::parse(key)?;
        Ok(LatestPointer { snapshot })
    }

    /// Returns the pointer object's body.
    pub fn body(&self) -> String {
        format!("{}\n", self.snapshot.key())
    }
}

/// Decides whether the pointer may move from `current` to `new`: only
/// forwards in time, so a clock that went backwards or a slower concurrent
/// run can never hide a newer snapshot.
pub fn pointer_may_advance(current: Option<&SnapshotKey>, new: &SnapshotKey) -> bool {
    match current {
        None => true,
        Some(current) => new > current,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn snapshot_key_names_the_minute() {
        let time = Utc.with_ymd_and_hms(2026, 4, 26, 18, 0, 59).unwrap();
        let key = SnapshotKey::for_minute(time);
        assert_eq!(key.key(), "system/db/snapshots/2026-04-26T1800Z.dump");
        assert_eq!(
            key.next_minute().key(),
            "system/db/snapshots/2026-04-26T1801Z.dump"
        );
    }

    #[test]
    fn snapshot_key_round_trips() {
        let key = SnapshotKey::parse("system/db/snapshots/2026-12-31T2359Z.dump").unwrap();
        assert_eq!(key.key(), "system/db/snapshots/2026-12-31T2359Z.dump");
        assert_eq!(
            key.next_minute().key(),
            "system/db/snapshots/2027-01-01T0000Z.dump"
        );
    }

    #[test]
    fn snapshot_key_rejects_other_shapes() {
        for bad in [
            "system/db/snapshots/2026-04-26T1800Z.dump.tmp",
            "system/db/snapshots/2026-04-26T180000Z.dump",
            "system/db/snapshots/2026-04-26T18:00Z.dump",
            "system/db/snapshots/2026-4-26T1800Z.dump",
            "system/db/snapshots/2026-04-26T1800.dump",
            "system/db/snapshots/2026-02-30T1800Z.dump",
            "system/db/snapshots/2026-04-26T2460Z.dump",
            "system/db/snapshots/２026-04-26T1800Z.dump",
            "system/db/2026-04-26T1800Z.dump",
            "snapshots/2026-04-26T1800Z.dump",
        ] {
            assert!(SnapshotKey::parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn pointer_trims_whitespace() {
        let pointer =
            LatestPointer::parse(b"  system/db/snapshots/2026-04-26T1800Z.dump\r\n").unwrap();
        assert_eq!(
            pointer.body(),
            "system/db/snapshots/2026-04-26T1800Z.dump\n"
        );
    }

    #[test]
    fn pointer_rejects_malformed_bodies() {
        let cases: [&[u8]; 9] = [
            b"",
            b"\n",
            b"/system/db/snapshots/2026-04-26T1800Z.dump",
            b"system/db/snapshots/../2026-04-26T1800Z.dump",
            b"https://example.invalid/system/db/snapshots/2026-04-26T1800Z.dump",
            b"system/db/snapshots/2026-04-26T18\x0700Z.dump",
            b"system/db/snapshots/latest.dump",
            b"other/db/snapshots/2026-04-26T1800Z.dump",
            b"\xff\xfe",
        ];
        for body in cases {
            assert!(
                LatestPointer::parse(body).is_err(),
                "{:?} was accepted",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn relative_keys_stay_under_system() {
        assert!(validate_relative("system/vps-meta.json").is_ok());
        assert!(validate_relative("system/db/../../etc").is_err());
        assert!(validate_relative("/system/db/latest").is_err());
        assert!(validate_relative("s3://bucket/system/db/latest").is_err());
        assert!(validate_relative("system/db/la\ttest").is_err());
        assert!(validate_relative("data/db/latest").is_err());
    }

    #[test]
    fn prefix_must_belong_to_the_user() {
        assert!(validate_prefix("matrixos-sync/user_2abc/", "user_2abc").is_ok());
        let other = validate_prefix("matrixos-sync/user_2xyz/", "user_2abc").unwrap_err();
        assert!(other.contains("another customer"), "{other}");
        assert!(validate_prefix("matrixos-sync/user_2abc", "user_2abc").is_err());
        assert!(validate_prefix("user_2abc/", "user_2abc").is_err());
        assert!(validate_prefix("matrixos-sync/../", "user_2abc").is_err());
    }

    #[test]
    fn pointer_moves_only_forwards() {
        let older = SnapshotKey::parse("system/db/snapshots/2026-04-26T1700Z.dump").unwrap();
        let newer = SnapshotKey::parse("system/db/snapshots/2026-04-26T1800Z.dump").unwrap();
        assert!(pointer_may_advance(None, &older));
        assert!(pointer_may_advance(Some(&older), &newer));
        assert!(!pointer_may_advance(Some(&newer), &older));
        assert!(!pointer_may_advance(Some(&newer), &newer));
    }
}
