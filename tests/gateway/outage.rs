//! Outages under load (issue 12): 2,000 envelope sockets on one history key, 10
//! publications a second straight to Redis, while Redis is killed and restarted from its
//! append-only file, stopped for 20 s, and while the gateway's pub/sub link is frozen by
//! a TCP proxy. Every publication that succeeded must reach every socket once, in id
//! order. Plain ws4redis sockets on a key without history get the newest stored message
//! after the outage, envelope sockets a `gap`.
//!
//! A publication whose attempt failed or timed out is retried later under a new number;
//! Redis may still have run it (a stopped server runs what waits in its sockets when it
//! resumes), so such a message may reach the sockets, but then every socket, once, in
//! id order.
//!
//! Every wait is bounded; nothing asserts on timings. `RUST_LOG=wsrelay=debug` shows
//! the gateway's log (it runs in this process).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::time::{sleep, timeout, Instant};
use tokio_tungstenite::tungstenite::Message;
use wsrelay::history::StreamId;
use wsrelay::publisher::{Recipients, RedisPublisher};

use crate::harness::{metric, Client, FreezingProxy, Gateway, RedisServer, TempDir, ENVELOPE};

const FACILITIES: &str = r#"
[[facility]]
pattern = "feed/*"
history = 100
history_ttl = 600
"#;

/// Opt-in sockets on the one history key.
const SOCKETS: usize = 2_000;
/// Handshakes in flight while the sockets connect.
const CONNECTING: usize = 64;
/// Publications per second.
const RATE: u64 = 10;
/// How long Redis stays stopped (SIGSTOP) in the second phase.
const STOPPED: Duration = Duration::from_secs(20);
/// Bound on every wait for the gateway or the sockets to catch up.
const CATCH_UP: Duration = Duration::from_secs(60);

fn rules() -> Vec<wsrelay::facility::FacilityRule> {
    vec![wsrelay::facility::FacilityRule {
        pattern: "feed/*".into(),
        history: 100,
        history_ttl: 600,
        slow_consumer: Default::default(),
    }]
}

/// Connects a publisher as an application does, with the gateway's facility rules.
async fn publisher(url: &str) -> Option<RedisPublisher> {
    match timeout(Duration::from_secs(2), RedisPublisher::connect(url, None)).await {
        Ok(Ok(p)) => Some(p.with_facilities(rules())),
        _ => None,
    }
}

fn feed() -> Recipients {
    Recipients::new("feed/load").unwrap().broadcast()
}

/// What one socket received, in order.
#[derive(Default)]
struct Seen {
    /// Numbered publications: the number and the id.
    messages: Vec<(u64, StreamId)>,
    /// Markers, in order of arrival, with their ids.
    markers: Vec<(usize, StreamId)>,
    /// Every id received, in order of arrival.
    ids: Vec<StreamId>,
    /// Anything else: control messages, messages without an id.
    other: Vec<String>,
    /// Why the socket ended, if it did.
    ended: Option<String>,
}

fn record(seen: &Mutex<Seen>, text: &str) {
    let mut seen = seen.lock().unwrap();
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        seen.other.push(text.to_string());
        return;
    };
    let id = v["id"].as_str().and_then(|s| s.parse::<StreamId>().ok());
    let data = v["data"].as_str().unwrap_or("");
    // A message published between a socket's handshake and the confirmation of its
    // subscription comes as its stored message (with its id): a delivery like any other.
    match (v["type"].as_str(), id) {
        (Some("message"), Some(id)) => {
            seen.ids.push(id);
            if let Some(n) = data.strip_prefix('p').and_then(|n| n.parse().ok()) {
                seen.messages.push((n, id));
                return;
            }
            if let Some(k) = data.strip_prefix('m').and_then(|k| k.parse().ok()) {
                seen.markers.push((k, id));
                return;
            }
            seen.other.push(text.to_string());
        }
        _ => seen.other.push(text.to_string()),
    }
}

/// One opt-in socket: connects (retrying a refused handshake a few times), then records
/// everything until it ends.
async fn socket(
    url: String,
    gate: Arc<tokio::sync::Semaphore>,
    up: Arc<AtomicUsize>,
    seen: Arc<Mutex<Seen>>,
) {
    let permit = gate.acquire_owned().await.unwrap();
    let mut client = None;
    let mut last_error = String::new();
    for _ in 0..5 {
        match Client::try_connect(&url, &[ENVELOPE]).await {
            Ok((c, _)) => {
                client = Some(c);
                break;
            }
            Err(e) => {
                last_error = e.to_string();
                sleep(Duration::from_millis(200)).await;
            }
        }
    }
    drop(permit);
    let Some(mut client) = client else {
        seen.lock().unwrap().ended = Some(format!("never connected: {last_error}"));
        return;
    };
    loop {
        match client.ws.next().await {
            // Live from here on: its subscription is confirmed.
            Some(Ok(Message::Text(t)))
                if t.starts_with(r#"{"keys":["broadcast"],"type":"subscribed"}"#) =>
            {
                up.fetch_add(1, Ordering::SeqCst);
            }
            Some(Ok(Message::Text(t))) => record(&seen, &t),
            Some(Ok(Message::Close(frame))) => {
                seen.lock().unwrap().ended = Some(format!("closed by the gateway: {frame:?}"));
                return;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                seen.lock().unwrap().ended = Some(format!("socket error: {e}"));
                return;
            }
            None => {
                seen.lock().unwrap().ended = Some("socket ended".into());
                return;
            }
        }
    }
}

/// One publication attempt of the publisher task.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    /// Redis answered with the id.
    Published(StreamId),
    /// Failed or timed out: Redis may still have run it (a command waiting in a stopped
    /// server's socket buffer runs when it resumes), so a socket may get it, once.
    Uncertain,
}

/// The publications made so far: number → phase and outcome.
type Log = Arc<Mutex<BTreeMap<u64, (usize, Outcome)>>>;

/// Publishes `p<n>` on the key, `RATE` a second, each attempt a new number, straight to
/// Redis (reconnecting after a failure), until `stop`.
async fn publish_loop(url: String, phase: Arc<AtomicUsize>, stop: Arc<AtomicBool>, log: Log) {
    let mut conn: Option<RedisPublisher> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        if conn.is_none() {
            conn = publisher(&url).await;
            if conn.is_none() {
                continue;
            }
        }
        n += 1;
        let p = conn.as_ref().unwrap();
        let sent = timeout(
            Duration::from_secs(2),
            p.publish_message(&feed(), format!("p{n}"), None),
        )
        .await;
        let outcome = match sent {
            Ok(Ok(ids)) => Outcome::Published(ids[0].expect("an id on a history key")),
            _ => {
                conn = None;
                Outcome::Uncertain
            }
        };
        log.lock()
            .unwrap()
            .insert(n, (phase.load(Ordering::SeqCst), outcome));
    }
}

/// Publishes marker `k` (retrying until Redis answers, bounded).
async fn publish_marker(url: &str, k: usize) -> StreamId {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        if let Some(p) = publisher(url).await {
            if let Ok(Ok(ids)) = timeout(
                Duration::from_secs(2),
                p.publish_message(&feed(), format!("m{k}"), None),
            )
            .await
            {
                return ids[0].unwrap();
            }
        }
        assert!(
            Instant::now() < deadline,
            "marker {k} could not be published"
        );
        sleep(Duration::from_millis(200)).await;
    }
}

/// Waits (bounded) until every socket has marker `k`; returns how many do not.
async fn wait_marker(sockets: &[Arc<Mutex<Seen>>], k: usize) -> usize {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let missing = sockets
            .iter()
            .filter(|s| !s.lock().unwrap().markers.iter().any(|(m, _)| *m == k))
            .count();
        if missing == 0 || Instant::now() > deadline {
            return missing;
        }
        sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (bounded) until the gateway's link is up again after at least `after`
/// reconnects in total.
async fn wait_relinked(gw: &Gateway, after: f64) -> f64 {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let metrics = crate::harness::http(gw.addr, "GET", "/metrics", &[], "").await;
        let reconnects = metric(&metrics.body, "wsrelay_redis_reconnects_total");
        let (status, _) = gw.health().await;
        if reconnects >= after && status == 200 {
            return reconnects;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway did not relink: {reconnects} reconnects, health {status}"
        );
        sleep(Duration::from_millis(100)).await;
    }
}

/// Per-phase counts over every socket.
#[derive(Debug, Default)]
struct Tally {
    published: usize,
    uncertain: usize,
    /// Uncertain publications some socket received.
    uncertain_delivered: usize,
    delivered: usize,
    lost: usize,
    duplicated: usize,
    wrong_id: usize,
    /// A few lost publications: (number, sockets that lack it).
    lost_examples: BTreeMap<u64, usize>,
    dup_examples: BTreeMap<u64, usize>,
}

const PHASES: [&str; 3] = [
    "SIGKILL + restart (appendonly, appendfsync always)",
    "SIGSTOP 20 s, SIGCONT",
    "pub/sub link frozen by a TCP proxy",
];

/// Checks every socket against the log; returns the per-phase tallies and the
/// problems that are not per phase (order, ends, unexpected messages).
fn check(
    sockets: &[Arc<Mutex<Seen>>],
    log: &BTreeMap<u64, (usize, Outcome)>,
) -> (Vec<Tally>, Vec<String>) {
    let mut tallies: Vec<Tally> = PHASES.iter().map(|_| Tally::default()).collect();
    for (phase, outcome) in log.values() {
        match outcome {
            Outcome::Published(_) => tallies[*phase].published += 1,
            Outcome::Uncertain => tallies[*phase].uncertain += 1,
        }
    }
    let mut problems = Vec::new();
    let mut uncertain_seen: HashMap<u64, usize> = HashMap::new();
    for (i, seen) in sockets.iter().enumerate() {
        let seen = seen.lock().unwrap();
        if let Some(end) = &seen.ended {
            problems.push(format!("socket {i}: {end}"));
        }
        if !seen.other.is_empty() && problems.len() < 50 {
            problems.push(format!(
                "socket {i} got unexpected frames: {:?}",
                &seen.other[..seen.other.len().min(5)]
            ));
        }
        // Ids strictly increasing over everything with an id, in arrival order.
        if !seen.ids.windows(2).all(|w| w[0] < w[1]) {
            let bad = seen
                .ids
                .windows(2)
                .filter(|w| w[0] >= w[1])
                .take(5)
                .map(|w| format!("{} then {}", w[0], w[1]))
                .collect::<Vec<_>>();
            problems.push(format!("socket {i}: ids not increasing: {bad:?}"));
        }
        let mut counts: HashMap<u64, (usize, StreamId)> = HashMap::new();
        for (n, id) in &seen.messages {
            let e = counts.entry(*n).or_insert((0, *id));
            e.0 += 1;
        }
        for (n, (phase, outcome)) in log {
            let got = counts.remove(n);
            let t = &mut tallies[*phase];
            match (outcome, got) {
                (Outcome::Published(_), None) => {
                    t.lost += 1;
                    *t.lost_examples.entry(*n).or_default() += 1;
                }
                (Outcome::Published(want), Some((times, id))) => {
                    t.delivered += 1;
                    if times > 1 {
                        t.duplicated += times - 1;
                        *t.dup_examples.entry(*n).or_default() += 1;
                    }
                    if id != *want {
                        t.wrong_id += 1;
                    }
                }
                (Outcome::Uncertain, Some((times, _))) => {
                    *uncertain_seen.entry(*n).or_default() += 1;
                    if times > 1 {
                        t.duplicated += times - 1;
                        *t.dup_examples.entry(*n).or_default() += 1;
                    }
                }
                (Outcome::Uncertain, None) => {}
            }
        }
        if !counts.is_empty() {
            problems.push(format!(
                "socket {i}: {} messages never published: {:?}",
                counts.len(),
                counts.keys().take(5).collect::<Vec<_>>()
            ));
        }
    }
    for (n, sockets_with_it) in uncertain_seen {
        if let Some((phase, _)) = log.get(&n) {
            tallies[*phase].uncertain_delivered += 1;
        }
        if sockets_with_it < sockets.len() {
            problems.push(format!(
                "p{n} (outcome unknown to the publisher) reached {sockets_with_it} of {} sockets",
                sockets.len()
            ));
        }
    }
    for t in &mut tallies {
        // Keep the examples short.
        while t.lost_examples.len() > 10 {
            t.lost_examples.pop_last();
        }
        while t.dup_examples.len() > 10 {
            t.dup_examples.pop_last();
        }
    }
    (tallies, problems)
}

/// The issue's three outages, one after the other, on the same 2,000 sockets and the
/// same gateway, whose link goes through a [`FreezingProxy`] (which carries it
/// unchanged until the third phase freezes it). Each phase ends with a marker every
/// socket must get before the next starts; the publisher keeps going throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_sockets_lose_nothing_through_three_outages() {
    let dir = TempDir::new("outage-aof");
    let mut redis = RedisServer::start_durable(&dir).await;
    let proxy = FreezingProxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let via_proxy = format!("redis://127.0.0.1:{}/0", proxy.port);
    let gw = Gateway::start_with_file(
        FACILITIES,
        &[
            ("redis__url", &via_proxy),
            ("redis__probe_interval", "0.5"),
            ("redis__reconnect_max", "1"),
            ("policy__max_connections_per_ip", "0"),
        ],
    );
    gw.wait_health(200).await;

    let gate = Arc::new(tokio::sync::Semaphore::new(CONNECTING));
    let up = Arc::new(AtomicUsize::new(0));
    let url = gw.ws_url("/ws/feed/load?subscribe-broadcast");
    let sockets: Vec<Arc<Mutex<Seen>>> = (0..SOCKETS).map(|_| Arc::default()).collect();
    let tasks: Vec<_> = sockets
        .iter()
        .map(|seen| tokio::spawn(socket(url.clone(), gate.clone(), up.clone(), seen.clone())))
        .collect();
    let deadline = Instant::now() + CATCH_UP;
    while up.load(Ordering::SeqCst) < SOCKETS {
        let failed = sockets
            .iter()
            .filter(|s| s.lock().unwrap().ended.is_some())
            .count();
        assert!(
            failed == 0 && Instant::now() < deadline,
            "{} of {SOCKETS} sockets connected, {failed} failed",
            up.load(Ordering::SeqCst)
        );
        sleep(Duration::from_millis(50)).await;
    }
    // Every socket is subscribed once a marker published now reaches all of them.
    let redis_url = redis.url();
    let phase = Arc::new(AtomicUsize::new(0));
    publish_marker(&redis_url, 100).await;
    let missing = wait_marker(&sockets, 100).await;
    let got: Vec<String> = sockets
        .iter()
        .map(|s| s.lock().unwrap())
        .filter(|s| s.markers.is_empty())
        .take(5)
        .map(|s| format!("{:?} {:?} {:?}", s.ids, s.other, s.ended))
        .collect();
    assert_eq!(
        missing, 0,
        "sockets without the first marker; some got: {got:?}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let log: Log = Arc::default();
    let publishing = tokio::spawn(publish_loop(
        redis_url.clone(),
        phase.clone(),
        stop.clone(),
        log.clone(),
    ));
    let mut catch_up_missing = Vec::new();
    let mut reconnects = wait_relinked(&gw, 0.0).await;

    // 1. SIGKILL, 3 s down, restart from the append-only file.
    sleep(Duration::from_secs(2)).await;
    redis.kill();
    sleep(Duration::from_secs(3)).await;
    redis.restart().await;
    reconnects = wait_relinked(&gw, reconnects + 1.0).await;
    sleep(Duration::from_secs(3)).await;
    phase.store(1, Ordering::SeqCst);
    publish_marker(&redis_url, 0).await;
    catch_up_missing.push(wait_marker(&sockets, 0).await);

    // 2. SIGSTOP for 20 s, then SIGCONT.
    sleep(Duration::from_secs(2)).await;
    redis.pause();
    sleep(STOPPED).await;
    redis.resume();
    reconnects = wait_relinked(&gw, reconnects + 1.0).await;
    sleep(Duration::from_secs(3)).await;
    phase.store(2, Ordering::SeqCst);
    publish_marker(&redis_url, 1).await;
    catch_up_missing.push(wait_marker(&sockets, 1).await);

    // 3. The link (pub/sub and commands) frozen by the proxy; the publisher goes on.
    sleep(Duration::from_secs(2)).await;
    proxy.freeze();
    wait_relinked(&gw, reconnects + 1.0).await;
    sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    timeout(CATCH_UP, publishing)
        .await
        .expect("the publisher stops")
        .unwrap();
    publish_marker(&redis_url, 2).await;
    catch_up_missing.push(wait_marker(&sockets, 2).await);

    let metrics = crate::harness::http(gw.addr, "GET", "/metrics", &[], "").await;
    let replayed = metric(
        &metrics.body,
        "wsrelay_recovery_total{outcome=\"replayed\"}",
    );
    let log = log.lock().unwrap().clone();
    let (tallies, problems) = check(&sockets, &log);
    for task in &tasks {
        task.abort();
    }
    let mut report = format!(
        "{SOCKETS} sockets, {} publication attempts, {replayed} messages replayed by the gateway's recoveries\n",
        log.len()
    );
    let mut failed = !problems.is_empty();
    for (i, (name, t)) in PHASES.iter().zip(&tallies).enumerate() {
        report.push_str(&format!(
            "phase {}: {name}: {} published, {} uncertain ({} of them delivered), \
             over all sockets: {} deliveries, lost {}, duplicated {}, wrong id {}, \
             sockets without the phase's marker {}; lost (number: sockets) {:?}; duplicated {:?}\n",
            i + 1,
            t.published,
            t.uncertain,
            t.uncertain_delivered,
            t.delivered,
            t.lost,
            t.duplicated,
            t.wrong_id,
            catch_up_missing[i],
            t.lost_examples,
            t.dup_examples,
        ));
        failed |= t.lost + t.duplicated + t.wrong_id + catch_up_missing[i] > 0;
    }
    for p in problems.iter().take(20) {
        report.push_str(&format!("{p}\n"));
    }
    eprintln!("{report}");
    assert!(!failed, "{report}");
    for t in &tallies {
        assert!(t.published > 0, "each phase published something: {report}");
    }
}

/// Plain ws4redis sockets on a key without history, through a Redis crash: what was
/// published after the restart and before the gateway could reconnect reaches each of
/// them as the key's newest stored message (only the newest: a key without history
/// has nothing else), and an envelope socket on the key is told of the gap first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_sockets_get_the_newest_stored_message_after_a_redis_kill() {
    let dir = TempDir::new("outage-plain-aof");
    let mut redis = RedisServer::start_durable(&dir).await;
    let proxy = FreezingProxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let via_proxy = format!("redis://127.0.0.1:{}/0", proxy.port);
    let gw = Gateway::start_with_file(FACILITIES, &[("redis__url", &via_proxy)]);
    gw.wait_health(200).await;
    let url = gw.ws_url("/ws/chat?subscribe-broadcast");
    // A stored message first: a socket that has it has finished its setup (a message
    // published before that could arrive twice, live and as the stored one).
    let _: () =
        redis::AsyncCommands::set_ex(&mut redis.conn().await, "broadcast:chat", "init", 3600)
            .await
            .unwrap();
    let mut plain = Vec::new();
    for _ in 0..5 {
        let mut c = Client::connect(&url).await;
        assert_eq!(c.recv_text().await, "init");
        plain.push(c);
    }
    let (mut wrapped, _) = Client::try_connect(&url, &[ENVELOPE]).await.unwrap();
    assert_eq!(wrapped.recv_envelope().await["type"], "subscribed");
    assert_eq!(wrapped.recv_envelope().await["data"], "init");
    redis.publish("broadcast:chat", b"before", 3600).await;
    for c in &mut plain {
        assert_eq!(c.recv_text().await, "before");
    }
    assert_eq!(
        wrapped.recv_envelope().await,
        json!({"type": "message", "key": "broadcast", "data": "before"})
    );

    // Killed; back before the gateway can reach it (the proxy turns it away), and
    // published to meanwhile, as ws4redis publishes: SET with expiry, then PUBLISH.
    proxy.refuse_new(true);
    redis.kill();
    gw.wait_health(503).await;
    redis.restart().await;
    assert_eq!(
        redis.get("broadcast:chat").await.as_deref(),
        Some(&b"before"[..]),
        "the append-only file kept it"
    );
    redis.publish("broadcast:chat", b"during 1", 3600).await;
    redis.publish("broadcast:chat", b"during 2", 3600).await;
    proxy.refuse_new(false);
    gw.wait_health(200).await;

    for (i, c) in plain.iter_mut().enumerate() {
        assert_eq!(
            c.recv_text().await,
            "during 2",
            "plain socket {i}: the newest stored message"
        );
    }
    assert_eq!(
        wrapped.recv_envelope().await,
        json!({"type": "gap", "key": "broadcast", "reason": "the link to redis was lost"})
    );
    assert_eq!(wrapped.recv_envelope().await["data"], "during 2");
    // Nothing else is pending: the next message is the next publication.
    redis.publish("broadcast:chat", b"after", 3600).await;
    for c in &mut plain {
        assert_eq!(
            c.recv_text().await,
            "after",
            "no duplicate of the stored message"
        );
    }
    assert_eq!(wrapped.recv_envelope().await["data"], "after");
}
