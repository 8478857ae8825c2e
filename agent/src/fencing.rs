//! Fencing: a host writes to the bucket only while the machine metadata
//! is absent or names it, so a replaced host can never overwrite the
//! snapshots of its replacement.

use anyhow::{anyhow, bail, Context};

use crate::config::Config;
use crate::keys;
use crate::state::StateDir;
use crate::store::ObjectStore;
use crate::vps_meta::{self, Ownership, VpsMeta};

/// Refuses a write to the bucket unless `vps-meta.json` is absent or
/// names this machine; `action` names the write in the message.
pub async fn require_ownership(
    store: &dyn ObjectStore,
    config: &Config,
    state: &StateDir,
    action: &str,
) -> anyhow::Result<()> {
    let key = config.object_key(keys::VPS_META);
    let object = store
        .get(&key)
        .await
        .with_context(|| format!("{action} refused: cannot read the machine metadata"))?;
    let meta = match object {
        None => None,
        Some(object) => Some(VpsMeta::parse(&object.body).map_err(|reason| {
            anyhow!("{action} refused: {key} {reason}; the platform must rewrite it")
        })?),
    };
    if let Some(user_id) = meta.as_ref().and_then(VpsMeta::user_id) {
        if user_id != config.user_id {
            bail!(
                "{action} refused: {key} belongs to user {user_id}, not {}; check \
                 MATRIX_R2_PREFIX and MATRIX_CLERK_USER_ID",
                config.user_id
            );
        }
    }
    let registered = state.is_registered(&config.machine_id.to_string());
    match vps_meta::ownership(meta.as_ref(), config.machine_id, registered) {
        Ownership::Ours => Ok(()),
        // Once superseded, a host stays so while the metadata is missing:
        // only the platform naming this machine again lets it write.
        Ownership::Unclaimed => match state.heartbeat().superseded_by {
            Some(other) => bail!(
                "{action} refused: this host is superseded; {key} is missing, and the \
                 heartbeat last saw it name machine {other}, a newer replacement"
            ),
            None => Ok(()),
        },
        Ownership::NotRegisteredYet { other } => bail!(
            "{action} refused: not registered yet; {key} still names machine {other}, not \
             this machine {}; the next run tries again after `matrix-heartbeat` registers",
            config.machine_id
        ),
        Ownership::Superseded { other } => bail!(
            "{action} refused: this host is superseded; {key} names machine {other}, a newer \
             replacement, and this host {} must not write to the bucket again",
            config.machine_id
        ),
    }
}
