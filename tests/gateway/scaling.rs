//! The gateway beyond one Redis (issue 14): a Redis Cluster of 3 masters with sharded
//! pub/sub (`SSUBSCRIBE`/`SPUBLISH` per key on its owner) or classic pub/sub (ws4redis's
//! own `PUBLISH`), a master failover and a live slot move under load, a Sentinel
//! failover under load, and two gateways on one cluster.
//!
//! Sockets spread over every master (`RedisCluster::key_on_each_master`). Every
//! publication a publisher saw acknowledged must reach every socket of its key exactly
//! once, in order; no socket closes. A publication whose attempt failed (a 503 while a
//! slot has no master, an error or a timeout) may still have happened, but then it
//! arrives once, in order too.
//!
//! Tests that kill nodes or move slots start a cluster of their own; the others share
//! one. Every wait is bounded (on a marker message, or polling a bounded number of
//! times); nothing asserts on timings.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::time::{sleep, timeout, Instant};
use tokio_tungstenite::tungstenite::Message;
use wsrelay::history::StreamId;
use wsrelay::publisher::{PublishError, Recipients, RedisPublisher};

use crate::harness::{http, metric, Client, Gateway, ENVELOPE, TOKEN};
use crate::redis_topology::{must, slot_of, Node, RedisCluster, RedisSentinel};

/// `feed/*` keeps history: publications get ids, and a lost pub/sub link is recovered
/// from the stream. Other facilities keep the last message only.
const FACILITIES: &str = r#"
[[facility]]
pattern = "feed/*"
history = 1000
history_ttl = 600
"#;

fn rules() -> Vec<wsrelay::facility::FacilityRule> {
    vec![wsrelay::facility::FacilityRule {
        pattern: "feed/*".into(),
        history: 1000,
        history_ttl: 600,
        slow_consumer: Default::default(),
    }]
}

/// Sockets per key in the tests under load.
const SOCKETS: usize = 3;
/// Publications a second of each publishing loop.
const RATE: u64 = 20;
/// Bound on the attempts of one publishing loop (a minute at [`RATE`]).
const MAX_ATTEMPTS: u64 = 60 * RATE;
/// Bound on one publication attempt.
const ATTEMPT_WAIT: Duration = Duration::from_secs(5);
/// Bound on waits for the gateway or the sockets to catch up after a topology change.
const CATCH_UP: Duration = Duration::from_secs(60);

/// How the gateway and the Rust publisher use pub/sub on a cluster.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Sharded,
    Classic,
}

impl Mode {
    /// The gateway's `redis.pubsub` setting.
    fn setting(self) -> &'static str {
        match self {
            Mode::Sharded => "sharded",
            Mode::Classic => "classic",
        }
    }
}

// ---------------------------------------------------------------------------------------
// The publisher API of the core (issue 14): the only places that name it.

/// The Rust publisher of an application on the cluster of `seeds`, with the gateway's
/// facility rules.
async fn cluster_publisher(
    seeds: &[String],
    prefix: Option<&str>,
    mode: Mode,
) -> Result<RedisPublisher, PublishError> {
    let seeds: Vec<&str> = seeds.iter().map(String::as_str).collect();
    let pubsub = match mode {
        Mode::Sharded => wsrelay::config::PubSub::Sharded,
        Mode::Classic => wsrelay::config::PubSub::Classic,
    };
    let publisher = RedisPublisher::connect_cluster(&seeds, prefix, pubsub).await?;
    Ok(publisher.with_facilities(rules()))
}

/// The Rust publisher of an application on a Sentinel set, with the facility rules.
async fn sentinel_publisher(
    master: &str,
    nodes: &[String],
    prefix: Option<&str>,
) -> Result<RedisPublisher, PublishError> {
    let nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
    let publisher = RedisPublisher::connect_sentinel(master, &nodes, prefix).await?;
    Ok(publisher.with_facilities(rules()))
}

// ---------------------------------------------------------------------------------------
// Gateways, sockets, publications

/// A gateway on `cluster` with [`FACILITIES`]; `mode` `None` leaves `redis.pubsub` at
/// its default. Ready once `/health` says 200.
async fn cluster_gateway(
    cluster: &RedisCluster,
    mode: Option<Mode>,
    settings: &[(&str, &str)],
) -> Gateway {
    let seeds = cluster.seeds();
    let mut all = vec![("redis__cluster", seeds.as_str())];
    if let Some(mode) = mode {
        all.push(("redis__pubsub", mode.setting()));
    }
    all.extend_from_slice(settings);
    let gw = Gateway::start_with_file(FACILITIES, &all);
    gw.wait_health(200).await;
    gw
}

/// A gateway on the Sentinel set, with [`FACILITIES`].
async fn sentinel_gateway(set: &RedisSentinel) -> Gateway {
    let nodes = set.nodes();
    let gw = Gateway::start_with_file(
        FACILITIES,
        &[
            ("redis__sentinel__master", set.master_name()),
            ("redis__sentinel__nodes", &nodes),
        ],
    );
    gw.wait_health(200).await;
    gw
}

/// An envelope socket on `facility`'s broadcast, once its subscription is live (its
/// first message, `subscribed`).
async fn live_socket(gw: &Gateway, facility: &str) -> Client {
    let url = gw.ws_url(&format!("/ws/{facility}?subscribe-broadcast"));
    let (mut client, _) = Client::try_connect(&url, &[ENVELOPE]).await.unwrap();
    let first = client.recv_envelope().await;
    assert_eq!(
        first,
        json!({"type": "subscribed", "keys": ["broadcast"]}),
        "{facility}"
    );
    client
}

/// The data (and id) of the next message of an envelope socket.
async fn next_message(client: &mut Client, facility: &str) -> (String, Option<String>) {
    let m = client.recv_envelope().await;
    assert_eq!(m["type"], "message", "{facility}: {m}");
    (
        m["data"].as_str().unwrap().to_string(),
        m["id"].as_str().map(String::from),
    )
}

/// Reads an envelope socket's messages until `last` and checks they are `want`, in
/// order, each once.
async fn expect_messages(client: &mut Client, facility: &str, want: &[String]) {
    let mut got = Vec::new();
    while got.len() < want.len() {
        let (data, _) = next_message(client, facility).await;
        got.push(data);
    }
    assert_eq!(got, want, "{facility}");
}

/// `POST /api/publish` of `message` to `facility`'s broadcast: the status, and the id
/// on a facility with history. A reply that does not come within [`ATTEMPT_WAIT`] is
/// status 0.
async fn api_publish(addr: SocketAddr, facility: &str, message: &str) -> (u16, Option<String>) {
    let body = json!({"facility": facility, "audiences": {"broadcast": true}, "message": message});
    let auth = format!("Bearer {TOKEN}");
    let headers = [("Authorization", auth.as_str())];
    let body = body.to_string();
    let reply = timeout(
        ATTEMPT_WAIT,
        http(addr, "POST", "/api/publish", &headers, &body),
    )
    .await;
    match reply {
        Ok(reply) => {
            let id = serde_json::from_str::<Value>(&reply.body)
                .ok()
                .and_then(|v| v["ids"][0].as_str().map(String::from));
            (reply.status, id)
        }
        Err(_) => (0, None),
    }
}

/// Publishes through the HTTP API and insists on a 200; returns the id, if any.
async fn api_publish_ok(gw: &Gateway, facility: &str, message: &str) -> Option<String> {
    let (status, id) = api_publish(gw.addr, facility, message).await;
    assert_eq!(status, 200, "{facility}: publishing {message}");
    id
}

/// Publishes through the HTTP API until it succeeds (bounded): a marker after a
/// topology change.
async fn api_publish_eventually(addr: SocketAddr, facility: &str, message: &str) -> Option<String> {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let (status, id) = api_publish(addr, facility, message).await;
        if status == 200 {
            return id;
        }
        assert!(
            Instant::now() < deadline,
            "{facility}: {message} could not be published (last status {status})"
        );
        sleep(Duration::from_millis(200)).await;
    }
}

async fn metrics(gw: &Gateway) -> String {
    http(gw.addr, "GET", "/metrics", &[], "").await.body
}

/// Waits (bounded) until `series` in `/metrics` is above 0; returns it.
async fn wait_metric_positive(gw: &Gateway, series: &str) -> f64 {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let text = metrics(gw).await;
        let value = text
            .lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if value > 0.0 {
            return value;
        }
        assert!(Instant::now() < deadline, "{series} stayed 0:\n{text}");
        sleep(Duration::from_millis(100)).await;
    }
}

/// `/health`'s `redis_nodes`, by node (`127.0.0.1:PORT`).
async fn redis_nodes(gw: &Gateway) -> (u16, BTreeMap<String, Value>) {
    let (status, body) = gw.health().await;
    let nodes = body["redis_nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("/health has no redis_nodes: {body}"))
        .iter()
        .map(|n| (n["node"].as_str().unwrap_or("?").to_string(), n.clone()))
        .collect();
    (status, nodes)
}

/// Waits (bounded) until `/health` is 200 and reports `node` connected with at least
/// `keys` subscribed keys.
async fn wait_node_connected(gw: &Gateway, node: &Node, keys: u64) {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let (status, nodes) = redis_nodes(gw).await;
        let entry = nodes.get(&node.addr());
        if status == 200
            && entry.is_some_and(|n| {
                n["connected"] == true && n["subscribed_keys"].as_u64().unwrap_or(0) >= keys
            })
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "health {status}: {} not connected with {keys} keys: {nodes:?}",
            node.addr()
        );
        sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Under load: sockets that record, publishers that log, and the check

/// What one socket received, in order.
#[derive(Debug, Default)]
struct Seen {
    /// Messages: data and id, in order of arrival.
    messages: Vec<(String, Option<String>)>,
    /// Control messages (`resumed`, `gap`, `reset`…), in order of arrival, each with
    /// the number of messages received before it.
    controls: Vec<(usize, Value)>,
    /// Why the socket ended, if it did.
    ended: Option<String>,
}

impl Seen {
    fn has(&self, data: &str) -> bool {
        self.messages.iter().any(|(d, _)| d == data)
    }
}

/// Records everything `client` receives from here on, until it ends.
fn watch(mut client: Client) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let sink = seen.clone();
    tokio::spawn(async move {
        loop {
            let ended = match client.ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).unwrap_or(json!({"raw": t.as_str()}));
                    let mut seen = sink.lock().unwrap();
                    if v["type"] == "message" {
                        let data = v["data"].as_str().unwrap_or("").to_string();
                        seen.messages
                            .push((data, v["id"].as_str().map(String::from)));
                    } else {
                        let before = seen.messages.len();
                        seen.controls.push((before, v));
                    }
                    continue;
                }
                Some(Ok(Message::Close(frame))) => format!("closed by the gateway: {frame:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => format!("socket error: {e}"),
                None => "socket ended".into(),
            };
            sink.lock().unwrap().ended = Some(ended);
            return;
        }
    });
    seen
}

/// `SOCKETS` live envelope sockets on `facility`, recording.
async fn watched_sockets(gw: &Gateway, facility: &str) -> Vec<Arc<Mutex<Seen>>> {
    let mut sockets = Vec::new();
    for _ in 0..SOCKETS {
        sockets.push(watch(live_socket(gw, facility).await));
    }
    sockets
}

/// Waits (bounded) until every socket has the message `data`.
async fn wait_all_have(sockets: &[Arc<Mutex<Seen>>], data: &str) {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let missing = sockets
            .iter()
            .filter(|s| !s.lock().unwrap().has(data))
            .count();
        if missing == 0 {
            return;
        }
        let ended: Vec<String> = sockets
            .iter()
            .filter_map(|s| s.lock().unwrap().ended.clone())
            .collect();
        assert!(
            Instant::now() < deadline,
            "{missing} sockets never got {data}; ended: {ended:?}"
        );
        sleep(Duration::from_millis(50)).await;
    }
}

/// One publication attempt.
#[derive(Debug, Clone)]
enum Outcome {
    /// Acknowledged, with its id (on a facility with history).
    Acked(Option<String>),
    /// Failed (status or error) or timed out: it may still have happened.
    Failed(String),
}

/// Every attempt so far, by message (`<tag><n>`), and the order of attempts.
#[derive(Debug, Default)]
struct Log {
    attempts: Vec<(String, Outcome)>,
}

impl Log {
    fn acked(&self, tag: &str) -> usize {
        self.attempts
            .iter()
            .filter(|(m, o)| m.starts_with(tag) && matches!(o, Outcome::Acked(_)))
            .count()
    }
}

type SharedLog = Arc<Mutex<Log>>;

/// A publishing loop running in the background until [`Loop::stop`].
struct Loop {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Loop {
    async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        timeout(ATTEMPT_WAIT * 2, self.task)
            .await
            .expect("the publishing loop stops")
            .expect("the publishing loop did not panic");
    }
}

/// Publishes `<tag><n>` (n from `first`) to `facility` through the gateway's HTTP API,
/// [`RATE`] a second, at most [`MAX_ATTEMPTS`] times, logging each outcome. Anything
/// but a 200 is a failure; the statuses seen are logged with it.
fn api_loop(
    addr: SocketAddr,
    facility: &str,
    tag: &'static str,
    first: u64,
    log: SharedLog,
) -> Loop {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let facility = facility.to_string();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        for n in first..first + MAX_ATTEMPTS {
            if flag.load(Ordering::SeqCst) {
                return;
            }
            tick.tick().await;
            let message = format!("{tag}{n}");
            let outcome = match api_publish(addr, &facility, &message).await {
                (200, id) => Outcome::Acked(id),
                (0, _) => Outcome::Failed("timed out".into()),
                (status, _) => Outcome::Failed(format!("status {status}")),
            };
            log.lock().unwrap().attempts.push((message, outcome));
        }
    });
    Loop { stop, task }
}

/// How a publishing loop gets a Rust publisher (again, after an error).
type Connect = Arc<
    dyn Fn() -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<RedisPublisher, PublishError>> + Send>,
        > + Send
        + Sync,
>;

/// Publishes `<tag><n>` to `facility`'s broadcast with a Rust publisher, like
/// [`api_loop`]; after an error it connects again (bounded).
fn publisher_loop(
    connect: Connect,
    facility: &str,
    tag: &'static str,
    first: u64,
    log: SharedLog,
) -> Loop {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let to = Recipients::new(facility).unwrap().broadcast();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut publisher: Option<RedisPublisher> = None;
        let mut n = first;
        for _ in 0..MAX_ATTEMPTS {
            if flag.load(Ordering::SeqCst) {
                return;
            }
            tick.tick().await;
            if publisher.is_none() {
                match timeout(ATTEMPT_WAIT, connect()).await {
                    Ok(Ok(p)) => publisher = Some(p),
                    _ => continue,
                }
            }
            let message = format!("{tag}{n}");
            n += 1;
            let sent = timeout(
                ATTEMPT_WAIT,
                publisher
                    .as_ref()
                    .unwrap()
                    .publish_message(&to, &message, None),
            )
            .await;
            let outcome = match sent {
                Ok(Ok(ids)) => Outcome::Acked(ids[0].map(|id| id.to_string())),
                Ok(Err(e)) => {
                    publisher = None;
                    Outcome::Failed(e.to_string())
                }
                Err(_) => {
                    publisher = None;
                    Outcome::Failed("timed out".into())
                }
            };
            log.lock().unwrap().attempts.push((message, outcome));
        }
    });
    Loop { stop, task }
}

/// Waits (bounded) until `tag` has `more` acknowledged publications beyond `since`.
async fn wait_acked(log: &SharedLog, tag: &str, since: usize, more: usize) -> usize {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let acked = log.lock().unwrap().acked(tag);
        if acked >= since + more {
            return acked;
        }
        let last = log.lock().unwrap().attempts.last().cloned();
        assert!(
            Instant::now() < deadline,
            "{tag}: {acked} acknowledged, want {}; last attempt {last:?}",
            since + more
        );
        sleep(Duration::from_millis(50)).await;
    }
}

/// The number in `<tag><n>`, for messages of one of `tags`.
fn numbered<'m>(data: &'m str, tags: &[&str]) -> Option<(&'m str, u64)> {
    tags.iter().find_map(|tag| {
        let n = data.strip_prefix(tag)?.parse().ok()?;
        Some((&data[..tag.len()], n))
    })
}

/// The first and last few of `names`.
fn summary(names: &[&str]) -> String {
    match names.len() {
        0..=12 => names.join(" "),
        n => format!("{} … {}", names[..6].join(" "), names[n - 6..].join(" ")),
    }
}

/// Checks every socket against the log: each acknowledged publication arrived once,
/// with the id it was acknowledged with; a failed one at most once; each publisher's
/// messages in the order it made them; ids rising; the socket open; no gap or reset.
/// After a disruption: both loops (the Rust publisher's, tagged "r", and the API's,
/// "a") get 10 more acknowledgements, stop; an "end" marker reaches every socket; then
/// every acknowledged publication must have arrived once, in order (see [`check`] for
/// `stream`).
async fn settle(
    gw: &Gateway,
    facility: &str,
    sockets: &[Arc<Mutex<Seen>>],
    log: &SharedLog,
    loops: [Loop; 2],
    stream: Option<(u16, String)>,
) {
    let (r, a) = {
        let log = log.lock().unwrap();
        (log.acked("r"), log.acked("a"))
    };
    wait_acked(log, "r", r, 10).await;
    wait_acked(log, "a", a, 10).await;
    for publishing in loops {
        publishing.stop().await;
    }
    api_publish_eventually(gw.addr, facility, "end").await;
    wait_all_have(sockets, "end").await;
    let kept = match stream {
        Some((port, key)) => {
            let entries: Vec<(String, redis::Value)> =
                must(port, redis::cmd("XRANGE").arg(key).arg("-").arg("+")).await;
            Some(entries.into_iter().map(|(id, _)| id).collect())
        }
        None => None,
    };
    check_kept(sockets, &log.lock().unwrap(), &["r", "a"], kept.as_ref());
}

fn check(sockets: &[Arc<Mutex<Seen>>], log: &Log, tags: &[&str]) {
    check_kept(sockets, log, tags, None)
}

/// The check. `kept`, where given, is every id the key's stream holds at the end: a
/// delivered entry missing from it was lost by Redis itself (a write the old master
/// took and never replicated, thrown away when it became a replica). The gateway's
/// recovery then cannot find its position in the history: it sends `reset` ("unknown
/// id") and the stream's newest entry, which the socket already has. That pair, and
/// only after such a loss, is what the recovery contract promises; everything else is
/// checked as strictly as without `kept`.
fn check_kept(
    sockets: &[Arc<Mutex<Seen>>],
    log: &Log,
    tags: &[&str],
    kept: Option<&HashSet<String>>,
) {
    let outcomes: HashMap<&str, &Outcome> =
        log.attempts.iter().map(|(m, o)| (m.as_str(), o)).collect();
    let mut problems = Vec::new();
    for (i, socket) in sockets.iter().enumerate() {
        let seen = socket.lock().unwrap();
        if let Some(ended) = &seen.ended {
            problems.push(format!("socket {i}: {ended}"));
        }
        // The positions of repeats that a reset after a loss by Redis explains.
        let mut explained: HashSet<usize> = HashSet::new();
        for (at, control) in &seen.controls {
            if control["type"] == "reset" && lost_by_redis(&seen.messages, *at, kept) {
                if let Some(repeat) = repeated_newest(&seen.messages, *at, kept) {
                    explained.insert(repeat);
                    continue;
                }
            }
            if control["type"] == "gap" || control["type"] == "reset" {
                problems.push(format!("socket {i}: {control}"));
            }
        }
        let mut count: HashMap<&str, usize> = HashMap::new();
        let mut last_n: HashMap<&str, u64> = HashMap::new();
        let mut last_id: Option<StreamId> = None;
        for (at, (data, id)) in seen.messages.iter().enumerate() {
            if explained.contains(&at) {
                continue;
            }
            *count.entry(data).or_default() += 1;
            if let Some((tag, n)) = numbered(data, tags) {
                if last_n.get(tag).is_some_and(|&before| n <= before) {
                    problems.push(format!("socket {i}: {data} after {tag}{}", last_n[tag]));
                }
                last_n.insert(tag, n);
                match outcomes.get(data.as_str()) {
                    Some(Outcome::Acked(Some(want))) if id.as_ref() != Some(want) => {
                        problems.push(format!(
                            "socket {i}: {data} came with id {id:?}, not {want}"
                        ));
                    }
                    None => problems.push(format!("socket {i}: {data} was never published")),
                    _ => {}
                }
            }
            if let Some(id) = id {
                let id: StreamId = id.parse().unwrap();
                if last_id.is_some_and(|before| id <= before) {
                    problems.push(format!("socket {i}: id {id} after {}", last_id.unwrap()));
                }
                last_id = Some(id);
            }
        }
        let (mut lost, mut repeated) = (Vec::new(), Vec::new());
        for (data, outcome) in &log.attempts {
            let n = count.get(data.as_str()).copied().unwrap_or(0);
            match outcome {
                Outcome::Acked(_) if n == 0 => lost.push(data.as_str()),
                Outcome::Acked(_) if n > 1 => repeated.push(data.as_str()),
                Outcome::Failed(_) if n > 1 => repeated.push(data.as_str()),
                _ => {}
            }
        }
        if !lost.is_empty() {
            problems.push(format!(
                "socket {i}: {} acknowledged publications never arrived: {}",
                lost.len(),
                summary(&lost)
            ));
        }
        if !repeated.is_empty() {
            problems.push(format!(
                "socket {i}: {} publications arrived more than once: {}",
                repeated.len(),
                summary(&repeated)
            ));
        }
    }
    let failed: Vec<String> = log
        .attempts
        .iter()
        .filter_map(|(m, o)| match o {
            Outcome::Failed(why) => Some(format!("{m}: {why}")),
            _ => None,
        })
        .collect();
    eprintln!(
        "{} attempts, {} failed: {:?}",
        log.attempts.len(),
        failed.len(),
        &failed[..failed.len().min(10)]
    );
    problems.truncate(30);
    assert!(problems.is_empty(), "{problems:#?}");
}

/// Whether a reset (after `at` messages) says "unknown id" because Redis lost an entry
/// the socket had received: an id before it is not in `kept`.
fn lost_by_redis(
    messages: &[(String, Option<String>)],
    at: usize,
    kept: Option<&HashSet<String>>,
) -> bool {
    let Some(kept) = kept else { return false };
    messages[..at]
        .iter()
        .any(|(_, id)| id.as_ref().is_some_and(|id| !kept.contains(id)))
}

/// The position of the message right after a reset when it is the same entry (data and
/// id, kept in the stream) that the socket received before the reset.
fn repeated_newest(
    messages: &[(String, Option<String>)],
    at: usize,
    kept: Option<&HashSet<String>>,
) -> Option<usize> {
    let (data, id) = messages.get(at)?;
    let id = id
        .as_ref()
        .filter(|id| kept.is_some_and(|k| k.contains(*id)))?;
    let before = messages[..at]
        .iter()
        .any(|(d, i)| d == data && i.as_ref() == Some(id));
    before.then_some(at)
}

// ---------------------------------------------------------------------------------------
// The tests

/// Sharded pub/sub (the default with a cluster): sockets on keys of every master get
/// what the HTTP API, the Rust publisher and a client's publish flag send; a plain
/// `PUBLISH` does not reach them; late joiners get the stored message; a history
/// facility gets ids, its stream on its key's slot; `/health` reports the 3 masters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_cluster_delivers_from_every_publisher() {
    let cluster = RedisCluster::shared().await;
    let gw = cluster_gateway(cluster, None, &[("redis__prefix", "app")]).await;
    let masters = cluster.masters().await;
    assert_eq!(masters.len(), 3);
    let plain: Vec<String> = cluster
        .facilities_on_each_master(Some("app"), "sharded")
        .await;
    let history: Vec<String> = cluster
        .facilities_on_each_master(Some("app"), "feed/sharded")
        .await;
    let publisher = cluster_publisher(&cluster.seed_list(), Some("app"), Mode::Sharded)
        .await
        .expect("a sharded publisher");
    // Sockets stay open to the end: the gateway keeps a subscription while a socket needs it.
    let mut keep = Vec::new();
    for (facility, master) in plain.iter().zip(&masters) {
        let key = format!("app:broadcast:{facility}");
        assert_eq!(&cluster.owner_of(&key).await, master);
        let mut socket = live_socket(&gw, facility).await;
        let mut talker =
            Client::connect(&gw.ws_url(&format!("/ws/{facility}?publish-broadcast"))).await;
        api_publish_ok(&gw, facility, "from the API").await;
        let to = Recipients::new(facility.as_str()).unwrap().broadcast();
        assert_eq!(
            publisher
                .publish_message(&to, "from Rust", None)
                .await
                .unwrap(),
            vec![None]
        );
        talker.send_text("from a client").await;
        let want = ["from the API", "from Rust", "from a client"].map(String::from);
        expect_messages(&mut socket, facility, &want).await;
        // A classic PUBLISH goes nowhere in sharded mode: the marker after it comes next.
        cluster.publish_classic(&key, b"classic", 0).await;
        api_publish_ok(&gw, facility, "end").await;
        expect_messages(&mut socket, facility, &["end".into()]).await;
        assert_eq!(cluster.get(&key).await.as_deref(), Some(&b"end"[..]));
        // A late joiner (a ws4redis client) gets the stored message.
        let path = format!("/ws/{facility}?subscribe-broadcast");
        let mut late = Client::connect(&gw.ws_url(&path)).await;
        assert_eq!(late.recv_text().await, "end", "{facility}");
        talker.close().await;
        keep.extend([socket, late]);
    }
    for (facility, master) in history.iter().zip(&masters) {
        let key = format!("app:broadcast:{facility}");
        assert_eq!(&cluster.owner_of(&key).await, master);
        let mut socket = live_socket(&gw, facility).await;
        let first = api_publish_ok(&gw, facility, "h1").await.expect("an id");
        let to = Recipients::new(facility.as_str()).unwrap().broadcast();
        let ids = publisher.publish_message(&to, "h2", None).await.unwrap();
        let second = ids[0].expect("an id from the Rust publisher").to_string();
        assert_eq!(
            next_message(&mut socket, facility).await,
            ("h1".into(), Some(first.clone()))
        );
        assert_eq!(
            next_message(&mut socket, facility).await,
            ("h2".into(), Some(second.clone()))
        );
        assert!(first.parse::<StreamId>().unwrap() < second.parse::<StreamId>().unwrap());
        // The stream is on the key's master (its hash tag is the whole key).
        let stream = format!("app:wsrelay:history:{{{key}}}");
        assert_eq!(slot_of(&stream), slot_of(&key));
        let len: i64 = must(master.port, redis::cmd("XLEN").arg(&stream)).await;
        assert_eq!(len, 2, "{stream}");
        let mut late = live_socket(&gw, facility).await;
        let m = late.recv_envelope().await;
        assert_eq!(
            (&m["data"], &m["id"], &m["stored"]),
            (&json!("h2"), &json!(second), &json!(true))
        );
        keep.extend([socket, late]);
    }
    // One pub/sub connection per master, each with its keys.
    let (status, nodes) = redis_nodes(&gw).await;
    assert_eq!(status, 200);
    let mut want: Vec<String> = masters.iter().map(Node::addr).collect();
    want.sort();
    assert_eq!(nodes.keys().cloned().collect::<Vec<_>>(), want);
    for (addr, node) in &nodes {
        assert_eq!(node["connected"], true, "{addr}: {node}");
        assert!(
            node["subscribed_keys"].as_u64().unwrap() >= 2,
            "{addr}: {node}"
        );
        assert!(node["reconnects"].is_u64(), "{addr}: {node}");
    }
    let text = metrics(&gw).await;
    for addr in &want {
        assert_eq!(
            metric(
                &text,
                &format!("wsrelay_redis_node_connected{{node=\"{addr}\"}}")
            ),
            1.0
        );
        assert!(
            metric(
                &text,
                &format!("wsrelay_redis_node_subscribed_keys{{node=\"{addr}\"}}")
            ) >= 2.0
        );
        assert_eq!(
            metric(
                &text,
                &format!("wsrelay_redis_node_reconnects_total{{node=\"{addr}\"}}")
            ),
            0.0
        );
    }
}

/// Classic pub/sub: ws4redis's own publisher (`SETEX` on the owner, `PUBLISH` on any
/// node) reaches ws4redis sockets on keys of every master, and so do the Rust publisher
/// in classic mode and the HTTP API; late joiners get the stored message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_mode_takes_plain_publish() {
    let cluster = RedisCluster::shared().await;
    let gw = cluster_gateway(cluster, Some(Mode::Classic), &[]).await;
    let facilities: Vec<String> = cluster.facilities_on_each_master(None, "classic").await;
    let publisher = cluster_publisher(&cluster.seed_list(), None, Mode::Classic)
        .await
        .expect("a classic publisher");
    for facility in &facilities {
        let key = format!("broadcast:{facility}");
        // The stored marker comes after the subscription: from here on nothing is missed.
        cluster.publish_classic(&key, b"ready", 60).await;
        let path = format!("/ws/{facility}?subscribe-broadcast");
        let mut socket = Client::connect(&gw.ws_url(&path)).await;
        assert_eq!(socket.recv_text().await, "ready", "{facility}");
        assert!(
            cluster.numsub(&key).await >= 1,
            "{key}: a classic subscription"
        );
        cluster.publish_classic(&key, b"from ws4redis", 3600).await;
        assert_eq!(socket.recv_text().await, "from ws4redis");
        let to = Recipients::new(facility.as_str()).unwrap().broadcast();
        publisher
            .publish_message(&to, "from Rust", None)
            .await
            .unwrap();
        assert_eq!(socket.recv_text().await, "from Rust");
        api_publish_ok(&gw, facility, "from the API").await;
        assert_eq!(socket.recv_text().await, "from the API");
        // Each once: the next message is the marker.
        cluster.publish_classic(&key, b"end", 3600).await;
        assert_eq!(socket.recv_text().await, "end");
        assert_eq!(cluster.get(&key).await.as_deref(), Some(&b"end"[..]));
        let mut late = Client::connect(&gw.ws_url(&path)).await;
        assert_eq!(late.recv_text().await, "end");
    }
    let (status, _) = gw.health().await;
    assert_eq!(status, 200);
}

/// A master dies (SIGKILL) under sockets on a history key of its slots: while the slot
/// has no master the API may answer 503; once the replica is promoted the gateway
/// resubscribes there, the sockets stay open, and every acknowledged publication
/// arrives once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_failover_loses_nothing() {
    let mut cluster = RedisCluster::start().await;
    let gw = cluster_gateway(&cluster, Some(Mode::Sharded), &[]).await;
    let facility = "feed/failover";
    let key = format!("broadcast:{facility}");
    let slot = slot_of(&key);
    let master = cluster.owner_of_slot(slot).await;
    // A key on another master: its socket is not disturbed.
    let others: Vec<String> = cluster.facilities_on_each_master(None, "feed/other").await;
    let masters = cluster.masters().await;
    let (other, _) = others
        .iter()
        .zip(&masters)
        .find(|(_, m)| **m != master)
        .unwrap();
    let sockets = watched_sockets(&gw, facility).await;
    let bystander = watched_sockets(&gw, other).await;
    let log: SharedLog = Default::default();
    for n in 1..=5 {
        let message = format!("a{n}");
        let id = api_publish_ok(&gw, facility, &message).await;
        assert!(id.is_some(), "an id on a history facility");
        log.lock()
            .unwrap()
            .attempts
            .push((message, Outcome::Acked(id)));
    }
    assert_eq!(
        cluster.wait_replicated(&master).await,
        1,
        "the replica has a1..a5"
    );
    let killed_at = Instant::now();
    cluster.kill(&master);
    let publishing = api_loop(gw.addr, facility, "a", 6, log.clone());
    let promoted = cluster.wait_promoted(slot).await;
    eprintln!(
        "slot {slot}: {} took over from {} {:?} after the SIGKILL",
        promoted.addr(),
        master.addr(),
        killed_at.elapsed()
    );
    let acked = log.lock().unwrap().acked("a");
    wait_acked(&log, "a", acked, 10).await;
    publishing.stop().await;
    api_publish_eventually(gw.addr, facility, "end").await;
    api_publish_eventually(gw.addr, other, "end").await;
    wait_all_have(&sockets, "end").await;
    wait_all_have(&bystander, "end").await;
    {
        let log = log.lock().unwrap();
        check(&sockets, &log, &["a"]);
        check(&bystander, &Log::default(), &[]);
        // While the slot had no master, only 503s (or no answer in time).
        for (m, o) in &log.attempts {
            if let Outcome::Failed(why) = o {
                assert!(why == "status 503" || why == "timed out", "{m}: {why}");
            }
        }
    }
    wait_metric_positive(&gw, "wsrelay_redis_resubscribes_total{reason=\"failover\"}").await;
    wait_node_connected(&gw, &promoted, 1).await;
}

/// A live slot move (`CLUSTER SETSLOT`/`MIGRATE`) of a history key's slot while the Rust
/// publisher and the HTTP API publish on it: the gateway resubscribes at the new owner,
/// the sockets stay open, every acknowledged publication arrives once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_loses_nothing() {
    let cluster = RedisCluster::start().await;
    let gw = cluster_gateway(&cluster, Some(Mode::Sharded), &[]).await;
    let facility = "feed/reshard";
    let key = format!("broadcast:{facility}");
    let slot = slot_of(&key);
    let from = cluster.owner_of_slot(slot).await;
    let to = cluster
        .masters()
        .await
        .into_iter()
        .find(|m| *m != from)
        .unwrap();
    let sockets = watched_sockets(&gw, facility).await;
    let log: SharedLog = Default::default();
    let seeds = cluster.seed_list();
    let connect: Connect = Arc::new(move || {
        let seeds = seeds.clone();
        Box::pin(async move { cluster_publisher(&seeds, None, Mode::Sharded).await })
    });
    let rust = publisher_loop(connect, facility, "r", 1, log.clone());
    let api = api_loop(gw.addr, facility, "a", 1, log.clone());
    wait_acked(&log, "r", 0, 5).await;
    wait_acked(&log, "a", 0, 5).await;
    cluster.move_slot(slot, &to).await;
    eprintln!("slot {slot} moved from {} to {}", from.addr(), to.addr());
    settle(&gw, facility, &sockets, &log, [rust, api], None).await;
    wait_metric_positive(&gw, "wsrelay_redis_resubscribes_total{reason=\"moved\"}").await;
    wait_node_connected(&gw, &to, 1).await;
}

/// `SENTINEL FAILOVER` while the HTTP API and the Rust publisher (following the
/// sentinels) publish on a history key: the sockets stay open, every acknowledged
/// publication arrives once, in order; `/health` is 200 afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_loses_nothing() {
    let set = RedisSentinel::start().await;
    let gw = sentinel_gateway(&set).await;
    let facility = "feed/sentinel";
    let sockets = watched_sockets(&gw, facility).await;
    let log: SharedLog = Default::default();
    let (master, nodes) = (set.master_name(), set.node_list());
    let connect: Connect = Arc::new(move || {
        let nodes = nodes.clone();
        Box::pin(async move { sentinel_publisher(master, &nodes, None).await })
    });
    let rust = publisher_loop(connect, facility, "r", 1, log.clone());
    let api = api_loop(gw.addr, facility, "a", 1, log.clone());
    wait_acked(&log, "r", 0, 5).await;
    wait_acked(&log, "a", 0, 5).await;
    let asked = Instant::now();
    let old = set.master().await;
    let new = set.failover().await;
    eprintln!(
        "sentinel: {} replaced {} {:?} after SENTINEL FAILOVER",
        new.addr(),
        old.addr(),
        asked.elapsed()
    );
    // Until a sentinel converts it, the old master still takes writes: go on until then.
    set.wait_settled().await;
    let stream = format!("wsrelay:history:{{broadcast:{facility}}}");
    let master = set.master().await;
    settle(
        &gw,
        facility,
        &sockets,
        &log,
        [rust, api],
        Some((master.port, stream)),
    )
    .await;
    gw.wait_health(200).await;
}

/// Two gateways on one cluster, sockets on each for keys of every master: every socket
/// gets every message of its key once, whichever gateway or publisher sent it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_a_cluster() {
    let cluster = RedisCluster::shared().await;
    let gateways = [
        cluster_gateway(cluster, Some(Mode::Sharded), &[]).await,
        cluster_gateway(cluster, Some(Mode::Sharded), &[]).await,
    ];
    let facilities: Vec<String> = cluster.facilities_on_each_master(None, "pair").await;
    let publisher = cluster_publisher(&cluster.seed_list(), None, Mode::Sharded)
        .await
        .expect("a sharded publisher");
    let mut sockets = Vec::new();
    for facility in &facilities {
        for gw in &gateways {
            for _ in 0..2 {
                sockets.push((facility.clone(), live_socket(gw, facility).await));
            }
        }
    }
    let mut sent: HashMap<String, Vec<String>> = HashMap::new();
    for k in 0..3 {
        for facility in &facilities {
            let mut publish = Vec::new();
            for (g, gw) in gateways.iter().enumerate() {
                let message = format!("gw{g}-{k}");
                api_publish_ok(gw, facility, &message).await;
                publish.push(message);
            }
            let to = Recipients::new(facility.as_str()).unwrap().broadcast();
            let message = format!("rust-{k}");
            publisher
                .publish_message(&to, &message, None)
                .await
                .unwrap();
            publish.push(message);
            sent.entry(facility.clone()).or_default().extend(publish);
        }
    }
    for facility in &facilities {
        api_publish_ok(&gateways[1], facility, "end").await;
        sent.get_mut(facility).unwrap().push("end".into());
    }
    for (facility, socket) in &mut sockets {
        expect_messages(socket, facility, &sent[facility.as_str()]).await;
    }
    // Each gateway subscribes once per key, on the key's master.
    for facility in &facilities {
        let key = format!("broadcast:{facility}");
        assert_eq!(cluster.shard_numsub(&key).await, 2, "{key}");
    }
    for gw in &gateways {
        let (status, nodes) = redis_nodes(gw).await;
        assert_eq!((status, nodes.len()), (200, 3), "{nodes:?}");
    }
}

/// The check's allowance for entries Redis lost, on the sequence seen in a failing run:
/// `a9` was delivered live (id …319) and then lost by the old master; the recovery sent
/// `reset` and the stream's newest entry `a8` again.
#[test]
fn a_reset_is_explained_only_by_an_entry_redis_lost() {
    let seen = |controls_at: usize| {
        let messages = [
            ("a7", "1-0"),
            ("a8", "2-0"),
            ("a9", "3-0"),
            ("a8", "2-0"),
            ("a10", "4-0"),
        ]
        .iter()
        .map(|(d, id)| (d.to_string(), Some(id.to_string())))
        .collect();
        let reset = json!({"type": "reset", "key": "broadcast", "reason": "unknown id"});
        Arc::new(Mutex::new(Seen {
            messages,
            controls: vec![(controls_at, reset)],
            ended: None,
        }))
    };
    let mut log = Log::default();
    for (m, id) in [("a7", "1-0"), ("a8", "2-0"), ("a10", "4-0")] {
        log.attempts
            .push((m.into(), Outcome::Acked(Some(id.into()))));
    }
    log.attempts
        .push(("a9".into(), Outcome::Failed("status 503".into())));
    let kept = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<HashSet<_>>();
    // Redis lost 3-0: the reset and the repeat of 2-0 are what recovery promises.
    check_kept(
        &[seen(3)],
        &log,
        &["a"],
        Some(&kept(&["1-0", "2-0", "4-0"])),
    );
    // Redis kept everything: the same reset and repeat are failures.
    let strict = std::panic::catch_unwind(|| {
        check_kept(
            &[seen(3)],
            &log,
            &["a"],
            Some(&kept(&["1-0", "2-0", "3-0", "4-0"])),
        )
    });
    assert!(strict.is_err());
    // And without `kept`, as in every other test.
    assert!(std::panic::catch_unwind(|| check(&[seen(3)], &log, &["a"])).is_err());
}
