//! Conflation (`slow_consumer = "conflate"` in a `[[facility]]` rule): sockets that
//! read slowly are never closed, each ends with the newest message of every key it
//! listens to, and the gateway's memory stays bounded by `queue_bytes` per socket.
//!
//! The gateway runs as a process of its own, whose memory is measured; the clients are
//! raw TCP sockets in the test.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::harness::{metric, rss_kib, Gateway, WAIT};
use crate::operations::metrics;

const SOCKETS: usize = 100;
const QUEUE_BYTES: usize = 64 * 1024;
/// Payload of each publication.
const MESSAGE: usize = 4 * 1024;
/// Publications per key: 8 MiB per socket in all, more than its kernel buffers (a few
/// MiB on loopback) and its queue take while it reads slowly.
const MESSAGES: usize = 1000;
/// What the gateway's memory may grow by besides `queue_bytes` per socket: the
/// workers' inboxes (up to 1024 publications each, 2 workers, 4 KiB each: 8 MiB), the
/// publish requests in flight, and the allocator's per-thread arenas.
const SLACK_KIB: u64 = 16 * 1024;
/// The first bytes of a payload a reader keeps: its key letter and number.
const PREFIX: usize = 8;

/// A raw handshake on `path` with the shared session; the socket's receive buffer is
/// small, so the kernel takes little before the gateway must queue.
async fn connect(gw: &Gateway, path: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut tcp = socket.connect(gw.addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Cookie: sessionid=shared\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = tokio::time::timeout(WAIT, tcp.read_u8())
            .await
            .expect("answer in time")
            .expect("an answer");
        head.push(byte);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tcp
}

/// Server frames cut out of a byte stream, keeping only the first [`PREFIX`] bytes of
/// each payload (payloads are skipped, not copied).
struct Frames {
    header: Vec<u8>,
    in_payload: bool,
    opcode: u8,
    remaining: u64,
    prefix: Vec<u8>,
}

impl Frames {
    fn new() -> Frames {
        Frames {
            header: Vec::with_capacity(16),
            in_payload: false,
            opcode: 0,
            remaining: 0,
            prefix: Vec::with_capacity(PREFIX),
        }
    }

    /// Feeds `data`; calls `frame(opcode, prefix)` for each frame completed.
    fn feed(&mut self, mut data: &[u8], frame: &mut impl FnMut(u8, &[u8])) {
        while !data.is_empty() {
            if !self.in_payload {
                self.header.push(data[0]);
                data = &data[1..];
                let h = &self.header;
                let extended = match h.get(1).map(|b| b & 0x7F) {
                    None => continue,
                    Some(126) => 2,
                    Some(127) => 8,
                    Some(_) => 0,
                };
                if h.len() < 2 + extended {
                    continue;
                }
                self.remaining = match extended {
                    0 => u64::from(h[1] & 0x7F),
                    n => h[2..2 + n]
                        .iter()
                        .fold(0, |len, b| len << 8 | u64::from(*b)),
                };
                self.opcode = h[0] & 0x0F;
                self.header.clear();
                self.prefix.clear();
                self.in_payload = true;
            }
            let take = self.remaining.min(data.len() as u64) as usize;
            let keep = (PREFIX - self.prefix.len()).min(take);
            self.prefix.extend_from_slice(&data[..keep]);
            self.remaining -= take as u64;
            data = &data[take..];
            if self.remaining == 0 {
                self.in_payload = false;
                frame(self.opcode, &self.prefix);
            }
        }
    }
}

/// What one reader saw of one key.
#[derive(Default, Clone, Copy)]
struct Key {
    /// The number of the last message, when one came.
    last: Option<u32>,
    ended: bool,
    messages: u64,
}

/// Reads `tcp` a little at a time (a slow phone) while `fast` is off, then as fast as
/// it can, until the final marker of both keys (`b` and `s`) came. Checks that no
/// close frame comes, that each key's messages come in order, and that nothing comes
/// after a key's marker. Returns the connection, still open.
async fn read_slowly(
    mut tcp: TcpStream,
    mut buf: Vec<u8>,
    fast: Arc<AtomicBool>,
) -> Result<([Key; 2], TcpStream), String> {
    let mut frames = Frames::new();
    let mut keys = [Key::default(); 2];
    let mut error = None;
    while !(keys[0].ended && keys[1].ended) {
        let fast = fast.load(Ordering::Relaxed);
        let chunk = if fast { buf.len() } else { 2048 };
        let n = tcp
            .read(&mut buf[..chunk])
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the gateway closed the connection".into());
        }
        frames.feed(&buf[..n], &mut |opcode, prefix| {
            if error.is_some() {
                return;
            }
            error = check(&mut keys, opcode, prefix).err();
        });
        if let Some(e) = error.take() {
            return Err(e);
        }
        if !fast {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok((keys, tcp))
}

fn check(keys: &mut [Key; 2], opcode: u8, prefix: &[u8]) -> Result<(), String> {
    match opcode {
        1 | 2 => {}
        8 => return Err(format!("closed: {:?}", String::from_utf8_lossy(prefix))),
        _ => return Ok(()),
    }
    let key = match prefix.first() {
        Some(b'b') => &mut keys[0],
        Some(b's') => &mut keys[1],
        _ => return Err(format!("unexpected message {prefix:?}")),
    };
    if key.ended {
        return Err("a message after the final marker".into());
    }
    key.messages += 1;
    if prefix[1..].starts_with(b"END") {
        key.ended = true;
        return Ok(());
    }
    let number: u32 = std::str::from_utf8(&prefix[1..7])
        .ok()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("bad message {prefix:?}"))?;
    if key.last.is_some_and(|last| last >= number) {
        return Err(format!("message {number} after {:?}", key.last));
    }
    key.last = Some(number);
    Ok(())
}

/// Publishes messages `numbers` (then the final marker, with `end`) to one key of the
/// `prices` facility, in order.
async fn publish(
    gw: &Gateway,
    audiences: serde_json::Value,
    letter: char,
    numbers: std::ops::Range<usize>,
    end: bool,
) {
    let padding = "x".repeat(MESSAGE - 7);
    for n in numbers {
        let message = format!("{letter}{n:06}{padding}");
        let body = serde_json::json!({"facility": "prices", "audiences": audiences, "message": message, "expire": 0});
        assert_eq!(gw.api_publish(body).await.status, 200);
    }
    if end {
        let body = serde_json::json!({"facility": "prices", "audiences": audiences, "message": format!("{letter}END"), "expire": 0});
        assert_eq!(gw.api_publish(body).await.status, 200);
    }
}

/// Both keys' publications, one publisher per key (each key's order is kept).
async fn publish_both(gw: &Gateway, numbers: std::ops::Range<usize>, end: bool) {
    let broadcast = serde_json::json!({"broadcast": true});
    let session = serde_json::json!({"sessions": ["shared"]});
    tokio::join!(
        publish(gw, broadcast, 'b', numbers.clone(), end),
        publish(gw, session, 's', numbers, end),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_on_a_conflating_facility_stay_open_and_end_with_the_newest_messages() {
    let toml = "[[facility]]\npattern = \"prices\"\nslow_consumer = \"conflate\"\n";
    let queue_bytes = QUEUE_BYTES.to_string();
    // A process of its own, so that its memory is the gateway's alone (the other
    // tests of this binary run beside it).
    let gw = Arc::new(Gateway::start_process_with_file(
        toml,
        &[("queue_bytes", &queue_bytes), ("ping_interval", "0")],
    ));
    let mut sockets = Vec::new();
    for _ in 0..SOCKETS {
        sockets.push(connect(&gw, "/ws/prices?subscribe-broadcast&subscribe-session").await);
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while metric(&metrics(&gw).await, "wsrelay_sockets") < SOCKETS as f64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sockets never registered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fast = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|tcp| {
            // Touched now, so that the readers' buffers are in the baseline.
            let buf = vec![0xAA; 16 * 1024];
            tokio::spawn(read_slowly(tcp, buf, fast.clone()))
        })
        .collect();
    // Warm the publish path, then take the baseline.
    publish_both(&gw, 0..20, false).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = gw.pid();
    let baseline = rss_kib(pid);
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    publish_both(&gw, 20..MESSAGES, true).await;
    // Every message is out: the phones catch up, and each must end with both markers.
    fast.store(true, Ordering::Relaxed);
    let (mut received, mut open) = (0, Vec::new());
    for reader in readers {
        let (keys, tcp) = tokio::time::timeout(WAIT, reader)
            .await
            .expect("a reader did not get the final markers in time")
            .unwrap()
            .unwrap_or_else(|e| panic!("a slow reader: {e}"));
        for key in keys {
            assert!(key.ended);
            received += key.messages;
        }
        open.push(tcp);
    }
    sampling.store(false, Ordering::Relaxed);
    sampler.await.unwrap();

    let text = metrics(&gw).await;
    let conflated = metric(&text, "wsrelay_conflated_total");
    assert!(conflated > 0.0, "nothing was conflated");
    assert_eq!(metric(&text, "wsrelay_slow_consumer_closes_total"), 0.0);
    assert_eq!(metric(&text, "wsrelay_sockets"), SOCKETS as f64);
    let published = (SOCKETS * 2 * (MESSAGES + 1)) as u64;
    assert!(received < published, "{received} of {published} received");
    let grown = peak.load(Ordering::Relaxed).saturating_sub(baseline);
    let bound = (SOCKETS * QUEUE_BYTES / 1024) as u64 + SLACK_KIB;
    eprintln!(
        "conflation: {received} of {published} messages received, {conflated} frames \
         conflated, RSS grew by {grown} KiB (bound {bound} KiB)"
    );
    assert!(
        grown < bound,
        "gateway RSS grew by {grown} KiB, more than {bound} KiB"
    );
    drop(open);
}
