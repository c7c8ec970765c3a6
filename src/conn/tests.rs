//! The socket task against one end of an in-memory Unix socket pair, with tokio's clock
//! paused: time moves only when every task waits, so deadlines are exact and the tests
//! take no wall time.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::LocalSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;
use crate::broker::{Broker, Inlet, MemoryBroker};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::policy::SocketLimit;
use crate::registry::{Change, Registry};
use crate::worker::{Relay, SocketConfig};

/// What the socket's process shares, with the embedded broker and `settings` (named as
/// in `WSRELAY__*` variables). With `changes`, subscriptions wait for a broker that
/// the test plays.
fn relay(settings: &[(&str, &str)], changes: Option<mpsc::UnboundedSender<Change>>) -> Arc<Relay> {
    let vars = settings
        .iter()
        .map(|(k, v)| (format!("WSRELAY__{}", k.to_uppercase()), v.to_string()))
        .collect();
    let config = Config::load_from(None, vars).unwrap();
    let metrics = Arc::new(Metrics::new());
    let registry = Arc::new(Registry::new(changes, metrics.clone()));
    let inlet = Arc::new(Inlet::new(
        registry.clone(),
        config.heartbeat.as_deref(),
        config.max_publication_size,
    ));
    Arc::new(Relay {
        config: SocketConfig::new(&config),
        broker: Arc::new(Broker::Memory(MemoryBroker::new(inlet, Default::default()))),
        registry,
        metrics,
        shutdown: CancellationToken::new(),
        tracker: TaskTracker::new(),
    })
}

/// The client's end of a socket.
struct Peer {
    io: UnixStream,
}

impl Peer {
    async fn send(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let raw = frame::encode_masked(fin, opcode, payload, [9, 8, 7, 6]);
        self.io.write_all(&raw).await.unwrap();
    }

    /// Sends a frame if the server still reads (a closed socket refuses it).
    async fn try_send(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let raw = frame::encode_masked(fin, opcode, payload, [9, 8, 7, 6]);
        let _ = self.io.write_all(&raw).await;
    }

    /// The next server frame, `None` at the end of the stream.
    async fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut head = [0u8; 2];
        self.io.read_exact(&mut head).await.ok()?;
        assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
        let len = match head[1] & 0x7F {
            126 => u64::from(self.io.read_u16().await.ok()?),
            127 => self.io.read_u64().await.ok()?,
            n => u64::from(n),
        };
        let mut payload = vec![0; len as usize];
        self.io.read_exact(&mut payload).await.ok()?;
        Some((head[0] & 0x0F, payload))
    }

    /// Reads until the server's close frame: its code and reason.
    async fn close_frame(&mut self) -> (u16, String) {
        self.close_or_reset().await.expect("a close frame")
    }

    /// Reads until the server's close frame (its code and reason), or `None` when the
    /// stream ends first (the server reset it).
    async fn close_or_reset(&mut self) -> Option<(u16, String)> {
        loop {
            let (opcode, payload) = self.frame().await?;
            if opcode == frame::OP_CLOSE {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                return Some((code, String::from_utf8(payload[2..].to_vec()).unwrap()));
            }
        }
    }

    /// Whether the server closed its side (the stream ends).
    async fn ended(&mut self) -> bool {
        let mut rest = Vec::new();
        self.io.read_to_end(&mut rest).await.is_ok()
    }
}

struct Opened {
    peer: Peer,
    task: tokio::task::JoinHandle<()>,
    limit: Arc<SocketLimit>,
}

/// Opens a socket on `worker` listening to `subscribe` and publishing to `publish`.
fn open(worker: &Rc<Worker>, subscribe: &[&str], publish: &[&str], leftover: &[u8]) -> Opened {
    open_as(worker, subscribe, publish, leftover, SlowConsumer::Close)
}

/// [`open`], on a facility whose slow consumers get `slow_consumer`.
fn open_as(
    worker: &Rc<Worker>,
    subscribe: &[&str],
    publish: &[&str],
    leftover: &[u8],
    slow_consumer: SlowConsumer,
) -> Opened {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let limit = SocketLimit::new(10);
    let keys = |names: &[&str]| names.iter().map(|k| Arc::from(*k)).collect();
    let params = SocketParams {
        id: uuid::Uuid::new_v4(),
        peer: None,
        facility: "f".into(),
        user: None,
        subscribe: keys(subscribe),
        publish: keys(publish),
        echo: false,
        slow_consumer,
        form: crate::registry::Form::Plain,
        resume: vec![None; subscribe.len()],
        listening: AudienceKinds {
            broadcast: true,
            ..AudienceKinds::default()
        },
        holds: Holds {
            ip_slot: None,
            permit: limit.try_acquire(),
        },
    };
    let task = tokio::task::spawn_local(serve(
        worker.clone(),
        Stream::Unix(ours),
        params,
        BytesMut::from(leftover),
    ));
    Opened {
        peer: Peer { io: theirs },
        task,
        limit,
    }
}

/// Runs `test` on a local set (the worker and socket tasks are thread-bound).
async fn local<F: Future<Output = ()>>(test: F) {
    LocalSet::new().run_until(test).await
}

#[tokio::test(start_paused = true)]
async fn pings_go_out_and_a_silent_peer_is_closed_after_the_ping_timeout() {
    local(async {
        let worker = Worker::start(relay(
            &[("ping_interval", "1"), ("ping_timeout", "2")],
            None,
        ));
        let mut s = open(&worker, &["k"], &[], b"");
        let start = Instant::now();
        assert_eq!(s.peer.frame().await, Some((frame::OP_PING, vec![])));
        let pinged = start.elapsed();
        assert!(pinged >= Duration::from_secs(1) && pinged < Duration::from_millis(1100));
        assert_eq!(s.peer.close_frame().await, (1001, "ping timeout".into()));
        let closed = start.elapsed();
        assert!(closed >= Duration::from_secs(3) && closed < Duration::from_millis(3100));
        assert!(s.peer.ended().await);
        s.task.await.unwrap();
        assert!(s.limit.try_acquire().is_some());
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn any_frame_from_the_peer_proves_it_alive() {
    local(async {
        let worker = Worker::start(relay(
            &[("ping_interval", "1"), ("ping_timeout", "2")],
            None,
        ));
        let mut s = open(&worker, &["k"], &[], b"");
        for _ in 0..5 {
            assert_eq!(s.peer.frame().await, Some((frame::OP_PING, vec![])));
            s.peer.send(true, frame::OP_PONG, b"").await;
        }
        // Five pings answered: well past the ping timeout, still open.
        assert!(!s.task.is_finished());
        s.peer
            .send(true, frame::OP_CLOSE, &1000u16.to_be_bytes())
            .await;
        assert_eq!(s.peer.close_frame().await.0, 1000);
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn heartbeats_go_to_idle_sockets_and_are_answered() {
    local(async {
        let settings = [
            ("heartbeat", "--hb--"),
            ("heartbeat_interval", "4"),
            ("ping_interval", "0"),
        ];
        let worker = Worker::start(relay(&settings, None));
        let mut s = open(&worker, &["k"], &[], b"");
        let start = Instant::now();
        assert_eq!(
            s.peer.frame().await,
            Some((frame::OP_TEXT, b"--hb--".to_vec()))
        );
        assert!(start.elapsed() >= Duration::from_secs(4));
        s.peer.send(true, frame::OP_TEXT, b"--hb--").await;
        let answered = Instant::now();
        assert_eq!(
            s.peer.frame().await,
            Some((frame::OP_TEXT, b"--hb--".to_vec()))
        );
        assert!(
            answered.elapsed() < Duration::from_millis(50),
            "answered at once"
        );
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn close_and_ping_are_answered_while_setup_waits_for_the_broker() {
    local(async {
        // The broker never confirms the subscription: setup waits (up to 10 s).
        let (changes, _unserved) = mpsc::unbounded_channel();
        let worker = Worker::start(relay(&[("ping_interval", "0")], Some(changes)));
        let mut s = open(&worker, &["k"], &[], b"");
        let start = Instant::now();
        s.peer.send(true, frame::OP_PING, b"p").await;
        assert_eq!(s.peer.frame().await, Some((frame::OP_PONG, b"p".to_vec())));
        s.peer
            .send(true, frame::OP_CLOSE, &[0x03, 0xE8, b'b', b'y', b'e'])
            .await;
        assert_eq!(s.peer.close_frame().await, (1000, String::new()));
        assert!(
            start.elapsed() < Duration::from_millis(50),
            "not after setup"
        );
        assert!(s.peer.ended().await);
        s.task.await.unwrap();
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn client_messages_are_published_after_setup_and_stored_messages_come_first() {
    local(async {
        let (changes, mut broker_side) = mpsc::unbounded_channel();
        let relay = relay(&[("ping_interval", "0")], Some(changes));
        let worker = Worker::start(relay.clone());
        let key: Arc<str> = Arc::from("k");
        relay
            .broker
            .publish(
                std::slice::from_ref(&key),
                &Bytes::from_static(b"stored"),
                60,
            )
            .await
            .unwrap();
        // Sent in the same packets as the handshake, before setup is done.
        let early = frame::encode_masked(true, frame::OP_TEXT, b"mine", [1, 2, 3, 4]);
        let mut s = open(&worker, &["k"], &["other"], &early);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let other: Arc<str> = Arc::from("other");
        let before = relay
            .broker
            .fetch(std::slice::from_ref(&other))
            .await
            .unwrap();
        assert_eq!(before, [None], "nothing published before setup");
        // Play the broker: confirm the subscription.
        loop {
            match broker_side.recv().await.unwrap() {
                Change::Barrier(done) => {
                    done.send(true).unwrap();
                    break;
                }
                Change::Subscribe(_) | Change::Unsubscribe(_) => {}
            }
        }
        assert_eq!(
            s.peer.frame().await,
            Some((frame::OP_TEXT, b"stored".to_vec()))
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after = relay
            .broker
            .fetch(std::slice::from_ref(&other))
            .await
            .unwrap();
        assert_eq!(after, [Some(Bytes::from_static(b"mine"))]);
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_stops_reading_is_closed_and_its_descriptor_released() {
    local(async {
        let settings = [
            ("ping_interval", "0"),
            ("max_message_size", "65536"),
            ("queue_bytes", "131072"),
            ("close_timeout", "2"),
        ];
        let relay = relay(&settings, None);
        let worker = Worker::start(relay.clone());
        let s = open(&worker, &["k"], &[], b"");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let key: Arc<str> = Arc::from("k");
        let big = Bytes::from(vec![b'x'; 60_000]);
        let start = Instant::now();
        // Far more than the kernel buffers and the queue hold; the peer never reads.
        for _ in 0..40 {
            relay
                .broker
                .publish(std::slice::from_ref(&key), &big, 0)
                .await
                .unwrap();
            tokio::task::yield_now().await;
        }
        s.task.await.unwrap();
        assert!(
            start.elapsed() <= Duration::from_millis(2100),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(relay.metrics.slow_consumer_closes.get(), 1);
        assert!(s.limit.try_acquire().is_some(), "the place is free again");
        assert!(worker.is_empty());
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn a_write_stuck_past_the_ping_timeout_is_a_slow_consumer() {
    local(async {
        let settings = [
            ("ping_interval", "0"),
            ("ping_timeout", "3"),
            ("queue_bytes", "16777216"),
        ];
        let relay = relay(&settings, None);
        let worker = Worker::start(relay.clone());
        let mut s = open(&worker, &["k"], &[], b"");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let key: Arc<str> = Arc::from("k");
        let big = Bytes::from(vec![b'x'; 60_000]);
        for _ in 0..20 {
            relay
                .broker
                .publish(std::slice::from_ref(&key), &big, 0)
                .await
                .unwrap();
        }
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(relay.metrics.slow_consumer_closes.get(), 1);
        // Reading now: whatever the kernel held, then the connection ends.
        let (code, reason) = s.peer.close_or_reset().await.unwrap_or((0, "reset".into()));
        assert!(
            (code, reason.as_str()) == (4000, "slow consumer: nothing could be written")
                || code == 0,
            "{code} {reason}"
        );
        s.task.await.unwrap();
        assert!(start.elapsed() >= Duration::from_secs(3));
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn a_conflating_socket_falls_behind_without_a_close_but_a_stuck_write_still_closes() {
    local(async {
        let settings = [
            ("ping_interval", "0"),
            ("ping_timeout", "3"),
            ("queue_bytes", "131072"),
        ];
        let relay = relay(&settings, None);
        let worker = Worker::start(relay.clone());
        let mut s = open_as(&worker, &["k"], &[], b"", SlowConsumer::Conflate);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let key: Arc<str> = Arc::from("k");
        let big = Bytes::from(vec![b'x'; 60_000]);
        // Far more than the kernel buffers and the queue hold; the peer never reads.
        for _ in 0..40 {
            relay
                .broker
                .publish(std::slice::from_ref(&key), &big, 0)
                .await
                .unwrap();
            tokio::task::yield_now().await;
        }
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!s.task.is_finished(), "a conflating socket stays open");
        assert!(relay.metrics.conflated.get() > 0);
        assert_eq!(relay.metrics.slow_consumer_closes.get(), 0);
        // Nothing at all could be written for `ping_timeout`: a dead reader is closed.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(relay.metrics.slow_consumer_closes.get(), 1);
        let (code, reason) = s.peer.close_or_reset().await.unwrap_or((0, "reset".into()));
        assert!(
            (code, reason.as_str()) == (4000, "slow consumer: nothing could be written")
                || code == 0,
            "{code} {reason}"
        );
        s.task.await.unwrap();
        assert!(start.elapsed() >= Duration::from_secs(3));
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn a_drain_closes_each_socket_within_the_window() {
    local(async {
        let relay = relay(&[("ping_interval", "0"), ("drain_window", "3")], None);
        let worker = Worker::start(relay.clone());
        let sockets: Vec<Opened> = (0..5).map(|_| open(&worker, &["k"], &[], b"")).collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let start = Instant::now();
        relay.shutdown.cancel();
        // Each client answers its close at once, as a browser does.
        let clients: Vec<_> = sockets
            .into_iter()
            .map(|mut s| {
                tokio::task::spawn_local(async move {
                    let close = s.peer.close_frame().await;
                    let at = start.elapsed();
                    s.peer
                        .try_send(true, frame::OP_CLOSE, &1001u16.to_be_bytes())
                        .await;
                    s.task.await.unwrap();
                    (close, at, start.elapsed())
                })
            })
            .collect();
        for client in clients {
            let (close, at, ended) = client.await.unwrap();
            assert_eq!(close, (1001, "server shutting down".into()));
            assert!(at <= Duration::from_millis(3010), "closed at {at:?}");
            assert!(ended <= Duration::from_millis(3050), "ended at {ended:?}");
        }
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn the_client_close_is_echoed_except_1010_and_leftover_bytes_are_read() {
    local(async {
        let worker = Worker::start(relay(&[("ping_interval", "0")], None));
        let leftover = frame::encode_masked(true, frame::OP_PING, b"early", [5, 5, 5, 5]);
        let mut s = open(&worker, &["k"], &[], &leftover);
        assert_eq!(
            s.peer.frame().await,
            Some((frame::OP_PONG, b"early".to_vec()))
        );
        s.peer
            .send(true, frame::OP_CLOSE, &4321u16.to_be_bytes())
            .await;
        assert_eq!(s.peer.close_frame().await.0, 4321);
        assert!(s.peer.ended().await);
        let mut s = open(&worker, &["k"], &[], b"");
        s.peer
            .send(true, frame::OP_CLOSE, &1010u16.to_be_bytes())
            .await;
        assert_eq!(s.peer.close_frame().await.0, 1000);
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn the_socket_task_stays_small() {
    local(async {
        let worker = Worker::start(relay(&[], None));
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let params = SocketParams {
            id: uuid::Uuid::new_v4(),
            peer: None,
            facility: "".into(),
            user: None,
            subscribe: Arc::from([]),
            publish: Arc::from([]),
            echo: false,
            slow_consumer: SlowConsumer::Close,
            form: crate::registry::Form::Plain,
            resume: Vec::new(),
            listening: AudienceKinds::default(),
            holds: Holds::default(),
        };
        let task = serve(worker, Stream::Unix(ours), params, BytesMut::new());
        let size = std::mem::size_of_val(&task);
        eprintln!(
            "socket task future: {size} bytes; Socket: {} bytes",
            std::mem::size_of::<Socket>()
        );
        assert!(size <= MAX_TASK_SIZE, "socket task future: {size} bytes");
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn a_client_that_pings_and_never_reads_fills_its_own_queue_only() {
    local(async {
        let settings = [
            ("ping_interval", "0"),
            ("max_message_size", "1024"),
            ("queue_bytes", "4096"),
        ];
        let relay = relay(&settings, None);
        let worker = Worker::start(relay.clone());
        let s = open(&worker, &["k"], &[], b"");
        // Pings until the gateway stops taking them: far more pong bytes than the
        // kernel buffers and the queue hold, never read.
        let (_, mut writer) = s.peer.io.into_split();
        let ping = frame::encode_masked(true, frame::OP_PING, &[7; 125], [1, 2, 3, 4]);
        for _ in 0..20_000 {
            if writer.write_all(&ping).await.is_err() {
                break;
            }
            if s.task.is_finished() {
                break;
            }
        }
        tokio::time::timeout(Duration::from_secs(60), s.task)
            .await
            .expect("closed as a slow consumer")
            .unwrap();
        assert_eq!(relay.metrics.slow_consumer_closes.get(), 1);
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn during_setup_an_empty_queue_also_takes_one_large_publication() {
    local(async {
        let (changes, mut broker_side) = mpsc::unbounded_channel();
        let settings = [
            ("ping_interval", "0"),
            ("max_message_size", "1024"),
            ("queue_bytes", "4096"),
        ];
        let relay = relay(&settings, Some(changes));
        let worker = Worker::start(relay.clone());
        let mut s = open(&worker, &["k"], &[], b"");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let key: Arc<str> = Arc::from("k");
        let large = Bytes::from(vec![b'z'; 10_000]);
        relay
            .broker
            .publish(std::slice::from_ref(&key), &large, 0)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        loop {
            if let Change::Barrier(done) = broker_side.recv().await.unwrap() {
                done.send(true).unwrap();
                break;
            }
        }
        assert_eq!(s.peer.frame().await, Some((frame::OP_TEXT, large.to_vec())));
        assert_eq!(relay.metrics.slow_consumer_closes.get(), 0);
    })
    .await
}
