//! `matrix-agent prune`: opt-in retention. The policy is a pure function
//! over snapshot names; the command only lists and deletes.

use std::collections::HashSet;
use std::io::Write;

use anyhow::{anyhow, Context};
use chrono::{Datelike, Timelike};

use crate::config::Config;
use crate::fencing;
use crate::keys::{self, LatestPointer, SnapshotKey};
use crate::state::StateDir;
use crate::store;

/// Maximum number of snapshots one run deletes, so that a wrong policy costs at
/// most this many before an operator notices.
pub const MAX_DELETIONS_PER_RUN: usize = 100;

/// How many snapshots to keep: the newest `keep_last`, and the newest in
/// each of the last `keep_hourly` hours, `keep_daily` days, `keep_weekly`
/// ISO weeks and `keep_monthly` months that have snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    pub keep_last: usize,
    pub keep_hourly: usize,
    pub keep_daily: usize,
    pub keep_weekly: usize,
    pub keep_monthly: usize,
}

/// Maps a snapshot to the calendar period it falls in.
type PeriodOf = fn(&SnapshotKey) -> (i32, u32, u32, u32);

/// Chooses the snapshots to delete, oldest first and at most
/// [`MAX_DELETIONS_PER_RUN`]. The newest snapshot and the one `latest`
/// names are always kept, whatever the policy says.
pub fn select_for_deletion(
    snapshots: &[SnapshotKey],
    latest: Option<&SnapshotKey>,
    policy: &RetentionPolicy,
) -> Vec<SnapshotKey> {
    let mut newest_first: Vec<&SnapshotKey> = snapshots.iter().collect();
    newest_first.sort_by(|a, b| b.cmp(a));
    newest_first.dedup();

    let mut kept: HashSet<&SnapshotKey> = newest_first
        .iter()
        .take(policy.keep_last.max(1))
        .copied()
        .collect();
    kept.extend(latest);

    let periods: [(usize, PeriodOf); 4] = [
        (policy.keep_hourly, |s| {
            let t = s.taken_at();
            (t.year(), t.ordinal(), t.hour(), 0)
        }),
        (policy.keep_daily, |s| {
            let t = s.taken_at();
            (t.year(), t.ordinal(), 0, 0)
        }),
        (policy.keep_weekly, |s| {
            let week = s.taken_at().iso_week();
            (week.year(), week.week(), 0, 0)
        }),
        (policy.keep_monthly, |s| {
            let t = s.taken_at();
            (t.year(), t.month(), 0, 0)
        }),
    ];
    for (count, period_of) in periods {
        let mut seen = HashSet::new();
        for snapshot in &newest_first {
            if seen.len() >= count {
                break;
            }
            if seen.insert(period_of(snapshot)) {
                kept.insert(snapshot);
            }
        }
    }

    let mut doomed: Vec<SnapshotKey> = newest_first
        .into_iter()
        .filter(|snapshot| !kept.contains(snapshot))
        .cloned()
        .collect();
    doomed.sort();
    doomed.truncate(MAX_DELETIONS_PER_RUN);
    doomed
}

/// Applies the policy to the bucket, or only reports with `dry_run`.
pub async fn run(config: &Config, policy: &RetentionPolicy, dry_run: bool) -> anyhow::Result<()> {
    let store = store::open(&config.store).await?;
    let state = StateDir::existing(&config.state_dir);
    if !dry_run {
        fencing::require_ownership(store.as_ref(), config, &state, "prune").await?;
    }

    let latest_key = config.object_key(keys::LATEST);
    let latest = match store.get(&latest_key).await? {
        None => None,
        Some(object) => Some(
            LatestPointer::parse(&object.body)
                .map_err(|reason| {
                    anyhow!(
                        "prune refused: {latest_key} {reason}, so the current snapshot is \
                         unknown; repair the pointer first"
                    )
                })?
                .snapshot,
        ),
    };

    let prefix = config.object_key(keys::SNAPSHOTS_DIR);
    let listed = store
        .list_keys(&prefix)
        .await
        .context("cannot list the snapshots")?;
    let mut snapshots = Vec::new();
    let mut foreign = 0;
    for key in &listed {
        match key
            .strip_prefix(&config.prefix)
            .and_then(|relative| SnapshotKey::parse(relative).ok())
        {
            Some(snapshot) => snapshots.push(snapshot),
            None => foreign += 1,
        }
    }
    if foreign > 0 {
        tracing::info!("leaving {foreign} objects under {prefix} whose names are not snapshots");
    }

    let doomed = select_for_deletion(&snapshots, latest.as_ref(), policy);
    let verb = if dry_run { "would delete" } else { "deleting" };
    for snapshot in &doomed {
        tracing::info!("{verb} {snapshot}");
        if !dry_run {
            store
                .delete(&config.object_key(&snapshot.key()))
                .await
                .with_context(|| format!("cannot delete {snapshot}"))?;
        }
    }
    let summary = if dry_run { "would delete" } else { "deleted" };
    // A closed stdout (`| head`) must not turn a finished prune into a panic.
    let _ = writeln!(
        std::io::stdout(),
        "{summary} {} of {} snapshots; {} kept{}",
        doomed.len(),
        snapshots.len(),
        snapshots.len() - doomed.len(),
        if doomed.len() == MAX_DELETIONS_PER_RUN {
            "; the per-run limit was reached, run again for more"
        } else {
            ""
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(stamp: &str) -> SnapshotKey {
        SnapshotKey::parse(&format!("system/db/snapshots/{stamp}.dump")).unwrap()
    }

    fn hourly(days: u32) -> Vec<SnapshotKey> {
        (1..=days)
            .flat_map(|day| (0..24).map(move |hour| key(&format!("2026-03-{day:02}T{hour:02}00Z"))))
            .collect()
    }

    #[test]
    fn keep_last_keeps_the_newest() {
        let snapshots = hourly(1);
        let policy = RetentionPolicy {
            keep_last: 3,
            ..RetentionPolicy::default()
        };
        let doomed = select_for_deletion(&snapshots, None, &policy);
        assert_eq!(doomed.len(), 21);
        assert_eq!(doomed.first(), Some(&key("2026-03-01T0000Z")));
        assert_eq!(doomed.last(), Some(&key("2026-03-01T2000Z")));
    }

    #[test]
    fn daily_keeps_the_newest_of_each_day() {
        let snapshots = hourly(4);
        let policy = RetentionPolicy {
            keep_last: 1,
            keep_daily: 3,
            ..RetentionPolicy::default()
        };
        let doomed = select_for_deletion(&snapshots, None, &policy);
        let kept: Vec<&SnapshotKey> = snapshots.iter().filter(|s| !doomed.contains(s)).collect();
        assert_eq!(
            kept,
            [
                &key("2026-03-02T2300Z"),
                &key("2026-03-03T2300Z"),
                &key("2026-03-04T2300Z")
            ]
        );
    }

    #[test]
    fn latest_is_never_deleted() {
        let snapshots = hourly(1);
        let latest = key("2026-03-01T0500Z");
        let policy = RetentionPolicy {
            keep_last: 1,
            ..RetentionPolicy::default()
        };
        let doomed = select_for_deletion(&snapshots, Some(&latest), &policy);
        assert!(!doomed.contains(&latest));
        assert!(!doomed.contains(&key("2026-03-01T2300Z")));
        assert_eq!(doomed.len(), 22);
    }

    #[test]
    fn empty_policy_still_keeps_the_newest() {
        let snapshots = hourly(1);
        let doomed = select_for_deletion(&snapshots, None, &RetentionPolicy::default());
        assert!(!doomed.contains(&key("2026-03-01T2300Z")));
    }

    #[test]
    fn one_run_deletes_at_most_the_limit() {
        let snapshots = hourly(10);
        let policy = RetentionPolicy {
            keep_last: 1,
            ..RetentionPolicy::default()
        };
        let doomed = select_for_deletion(&snapshots, None, &policy);
        assert_eq!(doomed.len(), MAX_DELETIONS_PER_RUN);
        assert_eq!(doomed[0], key("2026-03-01T0000Z"), "the oldest go first");
    }

    #[test]
    fn weekly_and_monthly_use_calendar_periods() {
        let snapshots = vec![
            key("2026-01-31T1200Z"),
            key("2026-02-01T1200Z"),
            key("2026-02-28T1200Z"),
            key("2026-03-01T1200Z"),
        ];
        let policy = RetentionPolicy {
            keep_last: 1,
            keep_monthly: 3,
            ..RetentionPolicy::default()
        };
        let doomed = select_for_deletion(&snapshots, None, &policy);
        assert_eq!(doomed, [key("2026-02-01T1200Z")]);
    }
}
