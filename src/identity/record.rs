//! The default identity source: a JSON record the web application writes at login.
//!
//! ```text
//! key:   {p}wsrelay:identity:{session_key}
//! value: {"user": "jane", "groups": ["staff", "editors"]}
//! ```
//!
//! The session key is the value of the session cookie (`session.cookie`). No record
//! means an anonymous socket that keeps its session key, so `subscribe-session` works
//! and user/group flags are skipped.

use std::sync::Arc;

use futures_util::future::LocalBoxFuture;
use log::warn;
use serde::Deserialize;

use super::{session_key, Handshake, Identity, IdentityError, IdentityResolver};
use crate::broker::Broker;
use crate::channel::KeySpace;

/// The identity record as the web application writes it.
#[derive(Debug, Deserialize)]
struct IdentityRecord {
    user: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
}

/// Reads `{p}wsrelay:identity:{session_key}` from the broker's store.
pub struct RecordResolver {
    broker: Arc<Broker>,
    keys: KeySpace,
    cookie: String,
}

impl RecordResolver {
    pub fn new(broker: Arc<Broker>, keys: KeySpace, cookie: String) -> Self {
        RecordResolver {
            broker,
            keys,
            cookie,
        }
    }

    async fn lookup(&self, handshake: &Handshake<'_>) -> Result<Identity, IdentityError> {
        let Some(session) = session_key(&handshake.head.headers, &self.cookie)? else {
            return Ok(Identity::default());
        };
        let key: Arc<str> = self.keys.internal(&format!("identity:{session}")).into();
        let stored = self
            .broker
            .fetch(&[key])
            .await
            .map_err(|e| IdentityError::Unavailable(e.to_string()))?;
        let (user, groups) = match stored.into_iter().next().flatten() {
            Some(raw) => match serde_json::from_slice::<IdentityRecord>(&raw) {
                Ok(record) => (record.user, record.groups),
                Err(e) => {
                    warn!("identity record is not valid JSON ({e}); socket is anonymous");
                    (None, Vec::new())
                }
            },
            None => (None, Vec::new()),
        };
        Ok(Identity::from_names(Some(session), user, groups))
    }
}

impl IdentityResolver for RecordResolver {
    fn resolve<'a>(
        &'a self,
        handshake: &'a Handshake<'a>,
    ) -> LocalBoxFuture<'a, Result<Identity, IdentityError>> {
        Box::pin(self.lookup(handshake))
    }
}
