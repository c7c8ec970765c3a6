//! Micro-benchmarks of the hot paths: registry fan-out, key building, request parsing,
//! identity decoding. `cargo bench --bench micro`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tokio::time::Instant;
use wsrelay::channel::{Audience, Flags, KeySpace};
use wsrelay::identity::Identity;
use wsrelay::outbox::Outbox;
use wsrelay::registry::Publication;
use wsrelay::ws::reader::{Input, Reader};

/// The per-socket part of a fan-out: one shared 100-byte frame queued in `n` socket
/// queues (a reference count each) and taken out again as a write would.
fn fan_out(c: &mut Criterion) {
    let mut group = c.benchmark_group("fan-out");
    let publication = Publication::new(
        Arc::from("broadcast:chat"),
        &[b'x'; 100],
        None,
        Instant::now(),
    );
    let frame = std::rc::Rc::new(publication.frame.clone());
    for n in [1usize, 100, 10_000] {
        let mut outboxes: Vec<Outbox> = (0..n).map(|_| Outbox::default()).collect();
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(format!("{n} sockets"), |b| {
            b.iter(|| {
                for o in &mut outboxes {
                    o.push(&frame, 0, 1 << 20).unwrap();
                    let mut slices = [std::io::IoSlice::new(&[]); 4];
                    let n = o.slices(&mut slices);
                    let len: usize = slices[..n].iter().map(|s| s.len()).sum();
                    o.advance(len);
                }
            })
        });
    }
    group.finish();
}

/// Encoding a publication once, and reading a client's masked message.
fn framing(c: &mut Criterion) {
    let payload = [b'x'; 100];
    c.bench_function("frame/encode 100 B publication", |b| {
        b.iter(|| Publication::new(Arc::from("k"), black_box(&payload), None, Instant::now()))
    });
    let raw = wsrelay::ws::frame::encode_masked(true, 1, &payload, [1, 2, 3, 4]);
    c.bench_function("frame/read 100 B client message", |b| {
        b.iter_batched(
            || raw.clone(),
            |mut raw| {
                let mut reader = Reader::default();
                let mut input = Input::new(&mut raw);
                reader.next(&mut input, 65536).unwrap()
            },
            BatchSize::SmallInput,
        )
    });
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
    use wsrelay::identity::django::session::{fields_from_json, fields_from_pickle};
    use wsrelay::identity::django::signing::unsign;
    let keys = [secret.to_string()];
    c.bench_function("identity/django signed session", |b| {
        b.iter(|| {
            fields_from_json(
                &unsign(black_box(&signed), salt, &keys, None).unwrap(),
                "wsrelay:username",
                "ws4redis:memberof",
            )
        })
    });
    c.bench_function("identity/django pickled session", |b| {
        b.iter(|| fields_from_pickle(black_box(&pickled), "wsrelay:username", "ws4redis:memberof"))
    });
}

criterion_group!(benches, fan_out, framing, keys, parsing, django);
criterion_main!(benches);
