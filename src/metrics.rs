//! Prometheus metrics, served at `/metrics`; `/health` shows a summary of them.
//!
//! Hot-path counters are added once per batch of frames, not once per frame, and the
//! delivery latency (broker receipt → handed to the socket writer) is observed once per
//! batch, for its oldest frame: the worst latency of the batch.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric of one gateway process.
pub struct Metrics {
    registry: Registry,
    /// Open sockets.
    pub sockets: IntGauge,
    /// Connections still speaking HTTP (handshakes in progress included).
    pub http_connections: IntGauge,
    /// Open sockets listening to at least one key of each audience kind.
    pub sockets_by_audience: IntGaugeVec,
    /// Open sockets by transport: `websocket`, `sse`.
    pub sockets_by_transport: IntGaugeVec,
    /// Long-polls waiting or being answered.
    pub polls: IntGauge,
    /// Handshakes, by result: `accepted` or the refusal reason.
    pub handshakes: IntCounterVec,
    /// Identity warnings and failures, by event.
    pub identity_events: IntCounterVec,
    /// Sockets whose query names a flag that does not exist (they still open).
    pub unknown_flags: IntCounter,
    /// Publications received from the broker.
    pub broker_messages: IntCounter,
    /// Publications not relayed, by reason (`too_large`: over `max_publication_size`).
    pub publications_dropped: IntCounterVec,
    /// Frames handed to socket writers.
    pub frames_delivered: IntCounter,
    /// Payload bytes handed to socket writers.
    pub bytes_out: IntCounter,
    /// Sockets closed as slow consumers (close code 4000).
    pub slow_consumer_closes: IntCounter,
    /// Frames dropped from the queues of conflating sockets that fell behind.
    pub conflated: IntCounter,
    /// Redis pub/sub links lost (each is followed by a reconnect).
    pub redis_reconnects: IntCounter,
    /// 1 while the Redis pub/sub link is up (every link, in a sharded cluster).
    pub redis_connected: IntGauge,
    /// Per Redis node the gateway holds a pub/sub link to (label `node`, `host:port`):
    /// 1 while it is up, the keys subscribed there, and its losses.
    pub redis_node_connected: IntGaugeVec,
    pub redis_node_subscribed_keys: IntGaugeVec,
    pub redis_node_reconnects: IntCounterVec,
    /// Keys subscribed again on another node, by reason: `moved` (their slot migrated),
    /// `failover` (their node went away or Sentinel named another master).
    pub redis_resubscribes: IntCounterVec,
    /// What recoveries after a lost link did, by outcome: `replayed` (messages read
    /// back from history), `reset` (history keys whose gap could not be filled), `gap`
    /// (keys without history that may have missed messages).
    pub recovery: IntCounterVec,
    /// Messages replayed to resuming sockets, and resumes that could not be filled
    /// (`replayed`, `reset`).
    pub resume: IntCounterVec,
    /// `POST /api/publish` requests, by HTTP status.
    pub publish_api: IntCounterVec,
    /// Seconds from broker receipt to the socket writer, per batch.
    pub delivery_latency: Histogram,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        // unwrap (all below): names and labels are constants, valid and unique.
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).unwrap();
            registry.register(Box::new(g.clone())).unwrap();
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).unwrap();
            registry.register(Box::new(c.clone())).unwrap();
            c
        };
        let counter_vec = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).unwrap();
            registry.register(Box::new(c.clone())).unwrap();
            c
        };
        let sockets_by_audience = IntGaugeVec::new(
            Opts::new(
                "wsrelay_sockets_by_audience",
                "Open sockets listening to an audience kind",
            ),
            &["audience"],
        )
        .unwrap();
        registry
            .register(Box::new(sockets_by_audience.clone()))
            .unwrap();
        let sockets_by_transport = IntGaugeVec::new(
            Opts::new(
                "wsrelay_sockets_by_transport",
                "Open sockets by transport (websocket, sse)",
            ),
            &["transport"],
        )
        .unwrap();
        registry
            .register(Box::new(sockets_by_transport.clone()))
            .unwrap();
        let gauge_vec = |name: &str, help: &str, label: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &[label]).unwrap();
            registry.register(Box::new(g.clone())).unwrap();
            g
        };
        let redis_node_connected = gauge_vec(
            "wsrelay_redis_node_connected",
            "1 while the pub/sub link to this Redis node is up",
            "node",
        );
        let redis_node_subscribed_keys = gauge_vec(
            "wsrelay_redis_node_subscribed_keys",
            "Keys subscribed on this Redis node",
            "node",
        );
        let polls = IntGauge::new("wsrelay_polls", "Long-polls open").unwrap();
        registry.register(Box::new(polls.clone())).unwrap();
        let buckets = vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
        ];
        let delivery_latency = Histogram::with_opts(
            HistogramOpts::new(
                "wsrelay_delivery_latency_seconds",
                "Broker receipt to socket writer, oldest frame of each batch",
            )
            .buckets(buckets),
        )
        .unwrap();
        registry
            .register(Box::new(delivery_latency.clone()))
            .unwrap();
        Metrics {
            sockets: gauge("wsrelay_sockets", "Open sockets"),
            http_connections: gauge(
                "wsrelay_http_connections",
                "Connections still speaking HTTP, handshakes in progress included",
            ),
            sockets_by_audience,
            sockets_by_transport,
            polls,
            handshakes: counter_vec("wsrelay_handshakes_total", "Handshakes by result", "result"),
            identity_events: counter_vec(
                "wsrelay_identity_events_total",
                "Identity warnings and failures",
                "event",
            ),
            unknown_flags: counter(
                "wsrelay_unknown_flags_total",
                "Sockets whose query names a flag that does not exist",
            ),
            broker_messages: counter(
                "wsrelay_broker_messages_total",
                "Publications received from the broker",
            ),
            publications_dropped: counter_vec(
                "wsrelay_publications_dropped_total",
                "Publications not relayed, by reason",
                "reason",
            ),
            frames_delivered: counter(
                "wsrelay_frames_delivered_total",
                "Frames handed to socket writers",
            ),
            bytes_out: counter(
                "wsrelay_bytes_out_total",
                "Payload bytes handed to socket writers",
            ),
            slow_consumer_closes: counter(
                "wsrelay_slow_consumer_closes_total",
                "Sockets closed as slow consumers",
            ),
            conflated: counter(
                "wsrelay_conflated_total",
                "Frames dropped by conflation from the queues of sockets that fell behind",
            ),
            redis_reconnects: counter(
                "wsrelay_redis_reconnects_total",
                "Redis pub/sub links lost and re-established",
            ),
            recovery: counter_vec(
                "wsrelay_recovery_total",
                "What recoveries after a lost Redis link did, by outcome",
                "outcome",
            ),
            resume: counter_vec(
                "wsrelay_resume_total",
                "Messages replayed to resuming sockets, and resumes that could not be filled",
                "outcome",
            ),
            redis_connected: gauge(
                "wsrelay_redis_connected",
                "1 while the Redis pub/sub link is up",
            ),
            redis_node_connected,
            redis_node_subscribed_keys,
            redis_node_reconnects: counter_vec(
                "wsrelay_redis_node_reconnects_total",
                "Pub/sub links to this Redis node lost",
                "node",
            ),
            redis_resubscribes: counter_vec(
                "wsrelay_redis_resubscribes_total",
                "Keys subscribed again on another Redis node, by reason (moved, failover)",
                "reason",
            ),
            publish_api: counter_vec(
                "wsrelay_publish_api_requests_total",
                "POST /api/publish by status",
                "status",
            ),
            delivery_latency,
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // unwrap: encoding into a Vec cannot fail.
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Refusals by reason and identity events, for `/health`.
    pub fn counters_json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for family in self.registry.gather() {
            let prefix = match family.name() {
                "wsrelay_handshakes_total" => "refused.",
                "wsrelay_identity_events_total" => "identity.",
                _ => continue,
            };
            for metric in family.get_metric() {
                let label = metric.get_label().first().map_or("", |l| l.value());
                if label != "accepted" {
                    map.insert(
                        format!("{prefix}{label}"),
                        (metric.get_counter().get_value() as u64).into(),
                    );
                }
            }
        }
        map.into()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
