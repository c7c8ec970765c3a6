//! The command side of the Redis broker, whatever the topology: one Redis, a Redis
//! Cluster, or the master that Sentinel names.
//!
//! Callers hand a batch of keys; outside a cluster it is one pipeline (a transaction
//! for a publication), in a cluster one command per key, concurrently (a transaction
//! cannot span slots, and the cluster connection only follows `MOVED` for single
//! commands), so a publication to several keys is atomic per key there, not across
//! keys. With Sentinel, an error
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
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
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

    pub fn is_cluster(&self) -> bool {
        matches!(self, Commands::Cluster(_))
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
    /// makes the next command ask the sentinels, and a refused write (`READONLY`, or
    /// `NOREPLICAS` from a master fenced by `min-replicas-to-write`: it was not applied)
    /// is tried once more on the master the sentinels name then.
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
                if matches!(e.code(), Some("READONLY" | "NOREPLICAS")) {
                    return op(self.conn().await?).await;
                }
                Err(e)
            }
            done => done,
        }
    }

    /// Runs a batch over `count` keys: outside a cluster, `build(all indexes)` as one
    /// pipeline (one round trip; atomic if the pipeline says so); in a cluster, each key
    /// on its own, concurrently, `build(&[i])` holding exactly one command (the cluster
    /// connection follows `MOVED`/`ASK` and learns the new slot map only for single
    /// commands). `decode` turns each pipeline's answers into one `T` per key.
    pub async fn batch<T, B, D>(
        &self,
        count: usize,
        build: B,
        decode: D,
    ) -> redis::RedisResult<Vec<T>>
    where
        B: Fn(&[usize]) -> redis::Pipeline,
        D: Fn(&[usize], Vec<redis::Value>) -> redis::RedisResult<Vec<T>>,
    {
        let groups: Vec<Vec<usize>> = if self.is_cluster() {
            (0..count).map(|i| vec![i]).collect()
        } else {
            vec![(0..count).collect()]
        };
        let cluster = self.is_cluster();
        let answers = try_join_all(groups.iter().map(|members| {
            let pipe = build(members);
            self.run(move |mut conn| {
                let pipe = pipe.clone();
                async move {
                    match pipe.cmd_iter().next() {
                        Some(cmd) if cluster => {
                            let value: redis::Value = cmd.query_async(&mut conn).await?;
                            Ok(vec![value])
                        }
                        _ => pipe.query_async::<Vec<redis::Value>>(&mut conn).await,
                    }
                }
            })
        }))
        .await?;
        let mut all = Vec::with_capacity(count);
        for (members, values) in groups.iter().zip(answers) {
            all.extend(decode(members, values)?);
        }
        // Groups are in key order (one group, or one per key in order).
        if all.len() != count {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "one answer per key",
            )));
        }
        Ok(all)
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
    /// When the sentinels were last asked (see [`SentinelMaster::conn`]).
    asked: Mutex<Option<tokio::time::Instant>>,
}

/// How often a busy command side asks the sentinels whether the master changed: a
/// failover that demotes the old master gracefully gives no error to notice.
const RECHECK: Duration = Duration::from_secs(1);

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
            asked: Mutex::new(None),
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
        let mut conn = sentinel
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let (host, port): (String, u16) = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.config.master)
            .query_async(&mut conn)
            .await?;
        let addr = format!("{host}:{port}");
        let url = format!("redis://{host}:{port}/{}", self.config.db);
        let mut info = redis::IntoConnectionInfo::into_connection_info(url.as_str())?;
        if let Some(password) = &self.config.password {
            let settings = info
                .redis_settings()
                .clone()
                .set_password(password.expose());
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info)?;
        let mut master = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
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
        self.current
            .lock()
            .unwrap()
            .as_ref()
            .map(|(a, _)| a.clone())
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

    async fn conn(self: &Arc<Self>) -> redis::RedisResult<ConnectionManager> {
        self.recheck();
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

impl SentinelMaster {
    /// At most every [`RECHECK`], asks the sentinels aside and follows a new master.
    fn recheck(self: &Arc<Self>) {
        let now = tokio::time::Instant::now();
        {
            // unwrap: nothing panics while `asked` is locked.
            let mut asked = self.asked.lock().unwrap();
            if asked.is_some_and(|at| now.duration_since(at) < RECHECK) {
                return;
            }
            *asked = Some(now);
        }
        let master = self.clone();
        tokio::spawn(async move {
            if let Ok((addr, client)) = master.resolve().await {
                let _ = master.adopt(&addr, &client);
            }
        });
    }
}

/// An error after which the master should be asked for again.
fn master_moved(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(e.code(), Some("READONLY" | "NOREPLICAS"))
}
