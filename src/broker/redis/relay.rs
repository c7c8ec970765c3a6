//! What every pub/sub link shares, whichever topology it serves: pairing a history
//! key's announced id with the publication behind it, the channels that carry a key,
//! and the recovery of what live keys missed while a link (or a node) was away.

use std::sync::Arc;

use bytes::Bytes;
use log::info;

use super::commands::Commands;
use super::history_read::catch_up;
use super::RECOVERY_CHUNK;
use crate::broker::Inlet;
use crate::history::{envelope, CatchUp, Retention, StreamId};
use crate::registry::Registry;

/// The id announced for the next publication on a key, per link: a link delivers a
/// key's id and its publication back to back (one script sends both, and a key's id
/// channel shares its slot, so both come over the same link).
pub type PendingId = Option<(String, StreamId)>;

pub struct Relay {
    pub registry: Arc<Registry>,
    inlet: Arc<Inlet>,
    pub retention: Retention,
}

impl Relay {
    pub fn new(inlet: Arc<Inlet>, retention: Retention) -> Relay {
        Relay {
            registry: inlet.registry().clone(),
            inlet,
            retention,
        }
    }

    /// Relays one message of a link. A publication on a key with history comes right
    /// behind its id, announced on the key's id channel (nothing else can come between
    /// the two on one link); a publication without an announced id (a plain `PUBLISH`)
    /// is relayed without one.
    pub async fn relay(&self, pending: &mut PendingId, channel: &str, payload: &[u8]) {
        if let Some(key) = self.retention.keys().key_of_id_channel(channel) {
            let id = std::str::from_utf8(payload)
                .ok()
                .and_then(|p| p.parse().ok());
            *pending = id.map(|id| (key, id));
            return;
        }
        let id = match pending.take() {
            Some((key, id)) if key == channel => Some(id),
            _ => None,
        };
        self.inlet.deliver(channel, payload, id).await;
    }

    /// The channels that carry `keys`: each key, and before it its id channel when it
    /// keeps history.
    pub fn channels(&self, keys: &[Arc<str>]) -> Vec<Arc<str>> {
        let mut channels = Vec::with_capacity(keys.len());
        for key in keys {
            if self.retention.of(key).is_some() {
                channels.push(Arc::from(self.retention.keys().id_channel(key)));
            }
            channels.push(key.clone());
        }
        channels
    }

    /// After a lost link came back, or keys moved to another node: what each of
    /// `cursors`' keys missed, before anything live. A key with history gets the
    /// entries after the last id relayed on it (or a `reset` and its stored message
    /// when they are not all there); a key without history gets its stored message when
    /// it is not the last one relayed, and its envelope sockets a `gap`. Live
    /// publications that the read already brought are dropped as duplicates by the
    /// registry. A read that fails is an error: the caller tries again, rather than
    /// skipping the recovery. Returns how many entries were replayed.
    pub async fn recover(
        &self,
        commands: &Commands,
        cursors: &[(Arc<str>, Option<StreamId>)],
    ) -> Result<u64, String> {
        let mut replayed = 0u64;
        for chunk in cursors.chunks(RECOVERY_CHUNK) {
            let keys: Vec<Arc<str>> = chunk.iter().map(|(k, _)| k.clone()).collect();
            let after: Vec<Option<StreamId>> = chunk
                .iter()
                .map(|(k, c)| self.retention.of(k).and(*c))
                .collect();
            let caught_up = catch_up(commands, &self.retention, &keys, &after, usize::MAX)
                .await
                .map_err(|e| format!("recovery read: {e}"))?;
            for (key, caught) in keys.iter().zip(caught_up) {
                replayed += self.recover_key(key, caught).await;
            }
        }
        self.registry
            .metrics
            .recovery
            .with_label_values(&["replayed"])
            .inc_by(replayed);
        info!(
            "redis: recovered {} keys, {replayed} missed messages replayed",
            cursors.len()
        );
        Ok(replayed)
    }

    /// Relays what one key missed (see [`Relay::recover`]); returns how many entries
    /// were replayed.
    async fn recover_key(&self, key: &Arc<str>, caught: CatchUp) -> u64 {
        let metrics = &self.registry.metrics;
        let label = self.retention.label(key);
        let history = self.retention.of(key).is_some();
        match caught {
            CatchUp::Resumed { entries, .. } => {
                let replayed = entries.len() as u64;
                for (id, payload) in entries {
                    self.inlet.deliver(key, &payload, Some(id)).await;
                }
                replayed
            }
            // A history key whose position is not known (no socket finished its setup,
            // nothing was relayed) reads as a key without one: its stored message.
            CatchUp::Reset {
                reason,
                stored,
                newest,
            } => {
                self.registry.restart_ids(key, newest);
                self.reset(key, &label, reason, stored).await;
                0
            }
            CatchUp::Stored { stored, .. } if history => {
                self.reset(key, &label, "position unknown", stored).await;
                0
            }
            CatchUp::Stored { stored, .. } => {
                metrics.recovery.with_label_values(&["gap"]).inc();
                let text = envelope::gap(&label, "the link to redis was lost");
                self.registry.dispatch_control(key, &text).await;
                if let Some((payload, _)) = stored {
                    self.registry.dispatch_recovered(key, &payload).await;
                }
                0
            }
        }
    }

    /// What a history key missed cannot be replayed: `reset`, then its stored message
    /// if it is the stream's newest entry (an older stored message, from a publication
    /// not kept, would arrive as if new).
    async fn reset(
        &self,
        key: &Arc<str>,
        label: &str,
        reason: &str,
        stored: Option<(Bytes, Option<StreamId>)>,
    ) {
        self.registry
            .metrics
            .recovery
            .with_label_values(&["reset"])
            .inc();
        self.registry
            .dispatch_control(key, &envelope::reset(label, reason))
            .await;
        if let Some((payload, Some(id))) = stored {
            self.inlet.deliver(key, &payload, Some(id)).await;
        }
    }
}
