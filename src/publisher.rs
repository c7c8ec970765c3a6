//! Publishing from Rust web applications, the counterpart of ws4redis's Python
//! `RedisPublisher`.
//!
//! Any Redis client can publish (the key names in [`crate::channel`] are the whole
//! protocol); this type does it in one atomic round trip per message and validates
//! every name first.
//!
//! ```no_run
//! use wsrelay::publisher::{PublishError, Recipients, RedisPublisher};
//!
//! # async fn example() -> Result<(), PublishError> {
//! let publisher = RedisPublisher::connect("redis://127.0.0.1:6379/0", Some("myapp")).await?;
//!
//! // At login: tell the gateway who owns this session.
//! publisher.set_identity("k2x8sessionkey", Some("jane"), &["staff"], 14 * 86400).await?;
//!
//! // Push to everybody on "chat" and to Jane's other tabs, kept one hour for late joiners.
//! let to = Recipients::new("chat")?.broadcast().user("jane")?;
//! publisher.publish_message(&to, "hello", None).await?;
//!
//! // Read back what a late joiner of the broadcast would receive.
//! let last = publisher.fetch_message("chat", &wsrelay::channel::Audience::Broadcast).await?;
//! assert_eq!(last.as_deref(), Some(&b"hello"[..]));
//! # Ok(())
//! # }
//! ```

use crate::broker::redis::commands::{Commands, SentinelMaster};
use crate::config::{PubSub, SentinelConfig};
use bytes::Bytes;

use crate::channel::{validate_name, Audience, KeySpace, NameError, NameKind, DEFAULT_EXPIRE};
use crate::facility::{Facilities, FacilityRule};
use crate::history::{self, Retention, StreamId};

/// Why a publication failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// A facility and the audiences a message goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipients {
    facility: String,
    audiences: Vec<Audience>,
}

impl Recipients {
    pub fn new(facility: impl Into<String>) -> Result<Self, NameError> {
        let facility = facility.into();
        validate_name(NameKind::Facility, &facility)?;
        Ok(Recipients {
            facility,
            audiences: Vec::new(),
        })
    }

    /// Everybody subscribed to the facility.
    pub fn broadcast(mut self) -> Self {
        self.audiences.push(Audience::Broadcast);
        self
    }

    pub fn user(mut self, name: &str) -> Result<Self, NameError> {
        self.audiences.push(Audience::user(name)?);
        Ok(self)
    }

    pub fn group(mut self, name: &str) -> Result<Self, NameError> {
        self.audiences.push(Audience::group(name)?);
        Ok(self)
    }

    /// A browser session, by its session key.
    pub fn session(mut self, key: &str) -> Result<Self, NameError> {
        self.audiences.push(Audience::session(key)?);
        Ok(self)
    }

    pub fn users<'a>(self, names: impl IntoIterator<Item = &'a str>) -> Result<Self, NameError> {
        names.into_iter().try_fold(self, Recipients::user)
    }

    pub fn groups<'a>(self, names: impl IntoIterator<Item = &'a str>) -> Result<Self, NameError> {
        names.into_iter().try_fold(self, Recipients::group)
    }

    pub fn sessions<'a>(self, keys: impl IntoIterator<Item = &'a str>) -> Result<Self, NameError> {
        keys.into_iter().try_fold(self, Recipients::session)
    }

    /// How many audiences are named.
    pub fn len(&self) -> usize {
        self.audiences.len()
    }

    pub fn is_empty(&self) -> bool {
        self.audiences.is_empty()
    }

    /// The Redis keys these recipients map to.
    pub fn keys(&self, space: &KeySpace) -> Vec<String> {
        self.audiences
            .iter()
            .map(|a| space.key(a, &self.facility))
            .collect()
    }
}

/// Appends a publication to a key's history and publishes it, in one step: `XADD` to
/// the stream, the oldest entries deleted beyond `history` entries or `history_ttl`
/// seconds of age (with `XDEL`, at most 1000 per call, so that the stream remembers
/// the newest id it lost: see [`crate::history::Stream`]), the stream's expiry renewed,
/// the stored last message set (when `expire > 0`), the new id announced on the id
/// channel, then the payload published on the key, byte for byte as ws4redis
/// publishes it. Returns the id.
///
/// KEYS: the key, its stream. ARGV: payload, expire, history, history_ttl, id channel,
/// the publish command (`PUBLISH`, or `SPUBLISH` on a sharded cluster: the stream and
/// the id channel share the key's slot, see [`KeySpace::history`]).
/// The Python package runs the same file's text (its tests check that it is the same).
const PUBLISH_WITH_HISTORY: &str = include_str!("publish_with_history.lua");

/// In a cluster, a key without history is published by this script, one command that
/// does what ws4redis's transaction does (`SET … EX` when `expire > 0`, then the
/// publish command). KEYS: the key. ARGV: payload, expire, publish command.
const SET_AND_PUBLISH: &str = r"
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
redis.call(ARGV[3], KEYS[1], ARGV[1])
";

/// Publishes `payload` on every key as one MULTI/EXEC transaction (one per slot in a
/// Redis Cluster), so a reader never sees a stored value older than a publication: on
/// a key without history, `SETEX` (when `expire > 0`) and `PUBLISH` (`SPUBLISH` on a
/// sharded cluster), as ws4redis does; on a key whose facility keeps history
/// (`retention`), the script above. Returns each key's id (`None`: no history).
pub async fn publish_keys(
    commands: &Commands,
    retention: &Retention,
    keys: &[&str],
    payload: &[u8],
    expire: u64,
) -> redis::RedisResult<Vec<Option<StreamId>>> {
    let publish = commands.publish_command();
    let cluster = commands.is_cluster();
    let targets: Vec<Option<history::Target>> = keys.iter().map(|k| retention.target(k)).collect();
    let build = |members: &[usize]| {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for &i in members {
            let key = keys[i];
            match &targets[i] {
                // One command per key in a cluster: the script does what the
                // transaction does.
                None if cluster => {
                    pipe.cmd("EVAL")
                        .arg(SET_AND_PUBLISH)
                        .arg(1)
                        .arg(key)
                        .arg(payload)
                        .arg(expire)
                        .arg(publish);
                }
                None => {
                    if expire > 0 {
                        pipe.set_ex(key, payload, expire).ignore();
                    }
                    pipe.cmd(publish).arg(key).arg(payload).ignore();
                }
                Some(h) => {
                    pipe.cmd("EVAL")
                        .arg(PUBLISH_WITH_HISTORY)
                        .arg(2)
                        .arg(key)
                        .arg(&h.stream)
                        .arg(payload)
                        .arg(expire)
                        .arg(h.bounds.len)
                        .arg(h.bounds.ttl)
                        .arg(&h.id_channel)
                        .arg(publish);
                }
            }
        }
        pipe
    };
    // The answers: one per key in a cluster; else the transaction's, which list the ids
    // of the history keys, in order.
    let decode = |members: &[usize], values: Vec<redis::Value>| {
        let mut values = values.into_iter();
        Ok(members
            .iter()
            .map(|&i| {
                let answered = cluster || targets[i].is_some();
                let value = if answered { values.next() } else { None };
                targets[i].as_ref()?;
                redis::from_redis_value::<String>(value?).ok()?.parse().ok()
            })
            .collect())
    };
    commands.batch(keys.len(), build, decode).await
}

/// Publishes to wsrelay (and ws4redis) subscribers through Redis.
#[derive(Clone)]
pub struct RedisPublisher {
    commands: Commands,
    /// The key prefix, and which facilities keep history.
    retention: Retention,
    expire: u64,
}

impl RedisPublisher {
    /// Connects to `url`; `prefix` must match the gateway's `redis.prefix`.
    pub async fn connect(url: &str, prefix: Option<&str>) -> Result<Self, PublishError> {
        let conn = redis::Client::open(url)?.get_connection_manager().await?;
        Ok(Self::with_commands(Commands::Single(conn), prefix))
    }

    /// Connects to a Redis Cluster through any of its nodes (`seeds`); `pubsub` must
    /// match the gateway's `redis.pubsub` (sharded publications are `SPUBLISH`).
    pub async fn connect_cluster(
        seeds: &[&str],
        prefix: Option<&str>,
        pubsub: PubSub,
    ) -> Result<Self, PublishError> {
        let seeds: Vec<String> = seeds.iter().map(|s| s.to_string()).collect();
        let commands = Commands::cluster(&seeds, pubsub)?;
        commands.conn().await?;
        Ok(Self::with_commands(commands, prefix))
    }

    /// Publishes to the master that the sentinels at `nodes` name `master`, and
    /// follows it through failovers.
    pub async fn connect_sentinel(
        master: &str,
        nodes: &[&str],
        prefix: Option<&str>,
    ) -> Result<Self, PublishError> {
        let config = SentinelConfig {
            master: master.to_string(),
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            db: 0,
            password: None,
        };
        let commands = Commands::Sentinel(std::sync::Arc::new(SentinelMaster::new(&config)?));
        commands.conn().await?;
        Ok(Self::with_commands(commands, prefix))
    }

    fn with_commands(commands: Commands, prefix: Option<&str>) -> Self {
        RedisPublisher {
            commands,
            retention: Retention::new(Default::default(), KeySpace::new(prefix)),
            expire: DEFAULT_EXPIRE,
        }
    }

    /// The gateway's `[[facility]]` rules: publications on a facility with history are
    /// appended to it and get ids, as the gateway's own publications do.
    pub fn with_facilities(mut self, rules: Vec<FacilityRule>) -> Self {
        let keys = self.retention.keys().clone();
        self.retention = Retention::new(Facilities::new(rules).into(), keys);
        self
    }

    /// The default expiry of stored messages, in seconds (3600 unless changed).
    pub fn with_expire(mut self, seconds: u64) -> Self {
        self.expire = seconds;
        self
    }

    /// Publishes `message` to every recipient in one round trip. `expire`: seconds to
    /// keep it for late joiners (`None`: the default; `Some(0)`: not kept). Returns
    /// each recipient's message id, in order (`None` where its facility keeps no
    /// history; see [`RedisPublisher::with_facilities`]).
    pub async fn publish_message(
        &self,
        to: &Recipients,
        message: impl AsRef<[u8]>,
        expire: Option<u64>,
    ) -> Result<Vec<Option<StreamId>>, PublishError> {
        let keys = to.keys(self.retention.keys());
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let expire = expire.unwrap_or(self.expire);
        let ids = publish_keys(
            &self.commands,
            &self.retention,
            &keys,
            message.as_ref(),
            expire,
        );
        Ok(ids.await?)
    }

    /// The stored message of one audience of `facility`, if it has not expired.
    pub async fn fetch_message(
        &self,
        facility: &str,
        audience: &Audience,
    ) -> Result<Option<Bytes>, PublishError> {
        validate_name(NameKind::Facility, facility)?;
        let key = self.retention.keys().key(audience, facility);
        let get = redis::cmd("GET").arg(key).clone();
        let value: Option<Vec<u8>> = self.query(&get).await?;
        Ok(value.map(Bytes::from))
    }

    /// Writes the identity record the gateway reads for `session_key` (see
    /// [`crate::identity`]), kept `ttl` seconds; call it at login.
    pub async fn set_identity(
        &self,
        session_key: &str,
        user: Option<&str>,
        groups: &[&str],
        ttl: u64,
    ) -> Result<(), PublishError> {
        validate_name(NameKind::Session, session_key)?;
        if let Some(user) = user {
            validate_name(NameKind::User, user)?;
        }
        for group in groups {
            validate_name(NameKind::Group, group)?;
        }
        let record = serde_json::json!({ "user": user, "groups": groups }).to_string();
        let key = self
            .retention
            .keys()
            .internal(&format!("identity:{session_key}"));
        let set = redis::cmd("SET")
            .arg(key)
            .arg(record)
            .arg("EX")
            .arg(ttl.max(1))
            .clone();
        self.query::<()>(&set).await?;
        Ok(())
    }

    /// Removes the identity record of `session_key`; call it at logout.
    pub async fn clear_identity(&self, session_key: &str) -> Result<(), PublishError> {
        validate_name(NameKind::Session, session_key)?;
        let key = self
            .retention
            .keys()
            .internal(&format!("identity:{session_key}"));
        self.query::<()>(redis::cmd("DEL").arg(key)).await?;
        Ok(())
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        self.commands
            .run(|mut conn| async move { cmd.query_async(&mut conn).await })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipients_map_to_every_audience_key() {
        let to = Recipients::new("chat")
            .unwrap()
            .broadcast()
            .users(["a", "b"])
            .unwrap()
            .group("g")
            .unwrap()
            .session("s")
            .unwrap();
        assert_eq!(
            to.keys(&KeySpace::new(Some("p"))),
            [
                "p:broadcast:chat",
                "p:user:a:chat",
                "p:user:b:chat",
                "p:group:g:chat",
                "p:session:s:chat"
            ]
        );
        assert!(Recipients::new("a:b").is_err());
        assert!(Recipients::new("chat").unwrap().user("x y").is_err());
    }
}
