//! The command side of the Redis broker, whatever the topology: one Redis, a Redis
//! Cluster, or the master that Sentinel names.
//!
//! Callers hand a batch of keys; in a cluster the batch is split by slot (a transaction
//! or a pipeline cannot span slots) and the groups run concurrently, so a publication
//! to several keys is atomic per key there, not across keys. With Sentinel, an error
//! that says the master is gone or demoted (a broken link, `READONLY`) makes the next
//! command ask the sentinels again.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::try_join_all;
use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use tokio::sync::OnceCell;
use tokio::time::timeout;

use super::slots::slot;
use super::OP_TIMEOUT;
use crate::config::{PubSub, SentinelConfig};

/// A connection for one group of keys.
#[derive(Clone)]
pub enum Conn {
    Manager(ConnectionManager),
    Direct(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Manager(c) => c.req_packed_command(cmd),
            Conn::Direct(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Manager(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Direct(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Manager(c) => c.get_db(),
            Conn::Direct(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Where commands go. Cheap to clone; every clone shares the connections.
#[derive(Clone)]
pub enum Commands {
    /// One Redis, through a connection that reconnects itself.
    Single(ConnectionManager),
    /// One connection just made (a recovery's reads).
    Direct(MultiplexedConnection),
    /// A Redis Cluster; connected on first use, so the gateway starts while it is down.
    Cluster(Arc<LazyCluster>),
    /// The master that Sentinel names, asked again after a failover.
    Sentinel(Arc<SentinelMaster>),
}

impl Commands {
    /// A lazily connected command side for one Redis.
    pub fn single(client: &redis::Client) -> redis::RedisResult<Commands> {
        Ok(Commands::Single(super::command_connection(client)?))
    }

    pub fn cluster(seeds: &[String], pubsub: PubSub) -> redis::RedisResult<Commands> {
        let client = redis::cluster::ClusterClient::builder(seeds.to_vec())
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(OP_TIMEOUT)
            .retries(3)
            .build()?;
        Ok(Commands::Cluster(Arc::new(LazyCluster {
            client,
            conn: OnceCell::new(),
            pubsub,
        })))
    }

    /// How publications are sent: `SPUBLISH` on a sharded cluster, else `PUBLISH`.
    pub fn publish_command(&self) -> &'static str {
        match self {
            Commands::Cluster(c) if c.pubsub == PubSub::Sharded => "SPUBLISH",
            _ => "PUBLISH",
        }
    }

    /// Indexes of `keys` grouped so that each group can share one transaction or
    /// pipeline: by slot in a cluster, else all together. Order within a group is kept.
    pub fn groups<K: AsRef<[u8]>>(&self, keys: &[K]) -> Vec<Vec<usize>> {
        if !matches!(self, Commands::Cluster(_)) {
            return vec![(0..keys.len()).collect()];
        }
        let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let s = slot(key.as_ref());
            match groups.iter_mut().find(|(g, _)| *g == s) {
                Some((_, members)) => members.push(i),
                None => groups.push((s, vec![i])),
            }
        }
        groups.into_iter().map(|(_, members)| members).collect()
    }

    /// A connection to run commands on.
    pub async fn conn(&self) -> redis::RedisResult<Conn> {
        match self {
            Commands::Single(c) => Ok(Conn::Manager(c.clone())),
            Commands::Direct(c) => Ok(Conn::Direct(c.clone())),
            Commands::Cluster(c) => c.conn().await.map(Conn::Cluster),
            Commands::Sentinel(s) => s.conn().await.map(Conn::Manager),
        }
    }

    /// Runs `op` on a connection; with Sentinel, an answer that says the master moved
    /// makes the next command ask the sentinels, and a refused write (`READONLY`: it
    /// was not applied) is tried once more on the new master.
    pub async fn run<T, F, Fut>(&self, op: F) -> redis::RedisResult<T>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let result = op(self.conn().await?).await;
        let Commands::Sentinel(s) = self else {
            return result;
        };
        match result {
            Err(e) if master_moved(&e) => {
                s.forget();
                if e.code() == Some("READONLY") {
                    return op(self.conn().await?).await;
                }
                Err(e)
            }
            done => done,
        }
    }

    /// Runs `op` on each group of `keys` (see [`Commands::groups`]) concurrently; the
    /// answers come back in the order of `keys`.
    pub async fn per_group<T, F, Fut>(&self, count: usize, keys: &[&[u8]], op: F) -> redis::RedisResult<Vec<T>>
    where
        F: Fn(Conn, Vec<usize>) -> Fut,
        Fut: Future<Output = redis::RedisResult<Vec<T>>>,
    {
        debug_assert_eq!(count, keys.len());
        let groups = self.groups(keys);
        let answers = try_join_all(groups.iter().map(|members| {
            let op = &op;
            let members = members.clone();
            self.run(move |conn| op(conn, members.clone()))
        }))
        .await?;
        let mut ordered: Vec<Option<T>> = (0..count).map(|_| None).collect();
        for (members, answers) in groups.into_iter().zip(answers) {
            if answers.len() != members.len() {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "one answer per key",
                )));
            }
            for (i, answer) in members.into_iter().zip(answers) {
                ordered[i] = Some(answer);
            }
        }
        // Every index is in exactly one group.
        Ok(ordered.into_iter().flatten().collect())
    }
}

/// A cluster connection made on first use, and made again while it cannot be made.
pub struct LazyCluster {
    client: redis::cluster::ClusterClient,
    conn: OnceCell<ClusterConnection>,
    pubsub: PubSub,
}

impl LazyCluster {
    async fn conn(&self) -> redis::RedisResult<ClusterConnection> {
        let made = self
            .conn
            .get_or_try_init(|| async {
                match timeout(OP_TIMEOUT, self.client.get_async_connection()).await {
                    Ok(made) => made,
                    Err(_) => Err(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "cluster connect timed out",
                    ))),
                }
            })
            .await?;
        Ok(made.clone())
    }
}

/// The master Sentinel names, and a connection to it. Invariant: `current`, when set,
/// is a connection to the address the sentinels last named.
pub struct SentinelMaster {
    sentinels: Vec<redis::Client>,
    config: SentinelConfig,
    current: Mutex<Option<(String, ConnectionManager)>>,
}

impl SentinelMaster {
    pub fn new(config: &SentinelConfig) -> redis::RedisResult<SentinelMaster> {
        let sentinels = config
            .nodes
            .iter()
            .map(|url| redis::Client::open(url.as_str()))
            .collect::<redis::RedisResult<_>>()?;
        Ok(SentinelMaster {
            sentinels,
            config: config.clone(),
            current: Mutex::new(None),
        })
    }

    /// The master's address as the sentinels say now, and a client for it: the first
    /// sentinel that answers is believed, and the node must say it is a master (during
    /// a failover the sentinels may still name the old one).
    pub async fn resolve(&self) -> redis::RedisResult<(String, redis::Client)> {
        let mut last = None;
        for sentinel in &self.sentinels {
            match self.ask(sentinel).await {
                Ok(found) => return Ok(found),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::Client, "no sentinel configured"))
        }))
    }

    async fn ask(&self, sentinel: &redis::Client) -> redis::RedisResult<(String, redis::Client)> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)));
        let mut conn = sentinel.get_multiplexed_async_connection_with_config(&config).await?;
        let (host, port): (String, u16) = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.config.master)
            .query_async(&mut conn)
            .await?;
        let addr = format!("{host}:{port}");
        let url = format!("redis://{host}:{port}/{}", self.config.db);
        let mut info = redis::IntoConnectionInfo::into_connection_info(url.as_str())?;
        if let Some(password) = &self.config.password {
            let settings = info.redis_settings().clone().set_password(password.expose());
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info)?;
        let mut master = client.get_multiplexed_async_connection_with_config(&config).await?;
        let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut master).await?;
        match role.first() {
            Some(redis::Value::BulkString(r)) if r == b"master" => Ok((addr, client)),
            _ => Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "the node the sentinels name is not a master (yet)",
            ))),
        }
    }

    /// The address of the current master, if one is known.
    pub fn current_addr(&self) -> Option<String> {
        // unwrap: nothing panics while `current` is locked.
        self.current.lock().unwrap().as_ref().map(|(a, _)| a.clone())
    }

    /// Forgets the master: the next command asks the sentinels.
    pub fn forget(&self) {
        // unwrap: see `current_addr`.
        *self.current.lock().unwrap() = None;
    }

    /// Takes `addr` as the master (the subscriber found it), unless it is already.
    pub fn adopt(&self, addr: &str, client: &redis::Client) -> redis::RedisResult<()> {
        if self.current_addr().as_deref() == Some(addr) {
            return Ok(());
        }
        let conn = super::command_connection(client)?;
        // unwrap: see `current_addr`.
        *self.current.lock().unwrap() = Some((addr.to_string(), conn));
        Ok(())
    }

    async fn conn(&self) -> redis::RedisResult<ConnectionManager> {
        // unwrap: see `current_addr`. The lock is not held across the await below.
        if let Some((_, conn)) = self.current.lock().unwrap().as_ref() {
            return Ok(conn.clone());
        }
        let (addr, client) = self.resolve().await?;
        self.adopt(&addr, &client)?;
        let current = self.current.lock().unwrap();
        current.as_ref().map(|(_, c)| c.clone()).ok_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::Io, "the master changed meanwhile"))
        })
    }
}

/// An error after which the master should be asked for again.
fn master_moved(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.code() == Some("READONLY")
}
