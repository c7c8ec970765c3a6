//! Micro-benchmarks of the hot paths: registry fan-out, key building, request parsing,
//! identity decoding. `cargo bench --bench micro`.

use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tokio::time::Instant;
use wsrelay::channel::{Audience, Flags, KeySpace};
use wsrelay::identity::Identity;
use wsrelay::outbox::{Frame, Outbox, Queued};
use wsrelay::registry::Registry;

/// Fan-out of one 100-byte frame to `n` sockets on one key; every outbox is drained
/// before the clock stops, so the cost of the reader side counts too.
fn dispatch(c: &mut Criterion) {
    let mut group = c.benchmark_group("dispatch");
    for n in [1usize, 100, 10_000] {
        let registry = Registry::new(None, Arc::default());
        let key: Arc<str> = Arc::from("broadcast:chat");
        let outboxes: Vec<Arc<Outbox>> = (0..n).map(|_| Arc::new(Outbox::new(1 << 20))).collect();
        for o in &outboxes {
            registry.register(std::slice::from_ref(&key), o);
        }
        let frame = Frame::from_payload(bytes::Bytes::from(vec![b'x'; 100]));
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(format!("{n} sockets"), |b| {
            let mut batch: VecDeque<Queued> = VecDeque::new();
            b.iter(|| {
                registry.dispatch("broadcast:chat", &frame, Instant::now());
                for o in &outboxes {
                    o.take_into(&mut batch);
                    for q in batch.drain(..) {
                        o.written(q.frame.len());
                    }
                }
            })
        });
    }
    group.finish();
}

fn keys(c: &mut Criterion) {
    let space = KeySpace::new(Some("app"));
    let user = Audience::user("jane.doe@example.com").unwrap();
    c.bench_function("key/user", |b| {
        b.iter(|| space.key(black_box(&user), black_box("chat/room1")))
    });
}

fn parsing(c: &mut Criterion) {
    let query = "subscribe-broadcast&subscribe-user&subscribe-group&publish-broadcast&echo";
    c.bench_function("parse/flags", |b| b.iter(|| Flags::parse(black_box(query))));
    c.bench_function("parse/validate facility", |b| {
        b.iter(|| {
            wsrelay::channel::validate_name(
                wsrelay::channel::NameKind::Facility,
                black_box("chat/room-42"),
            )
        })
    });
    let groups: Vec<String> = (0..10).map(|i| format!("group{i}")).collect();
    c.bench_function("identity/from_names", |b| {
        b.iter_batched(
            || groups.clone(),
            |g| Identity::from_names(Some("k2x8sessionkey".into()), Some("jane".into()), g),
            BatchSize::SmallInput,
        )
    });
}

fn django(c: &mut Criterion) {
    let raw = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/django_sessions.json"
    ))
    .unwrap();
    let fixtures: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let secret = fixtures["secret_key"].as_str().unwrap().to_string();
    let find = |prefix: &str| {
        let case = fixtures["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"].as_str().unwrap().starts_with(prefix))
            .unwrap();
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(case["value_b64"].as_str().unwrap())
            .unwrap()
    };
    let signed = find("redis_sessions/prefix-session/login/");
    let pickled = find("cache/redis-cache-v1/login/");
    let salt = "django.contrib.sessions.SessionStore";
    use wsrelay::identity::django::{fields_from_json, fields_from_pickle, unsign};
    c.bench_function("identity/django signed session", |b| {
        b.iter(|| {
            fields_from_json(
                &unsign(black_box(&signed), salt, &secret).unwrap(),
                "wsrelay:username",
                "ws4redis:memberof",
            )
        })
    });
    c.bench_function("identity/django pickled session", |b| {
        b.iter(|| fields_from_pickle(black_box(&pickled), "wsrelay:username", "ws4redis:memberof"))
    });
}

criterion_group!(benches, dispatch, keys, parsing, django);
criterion_main!(benches);
