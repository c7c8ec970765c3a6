//! A deliberately minimal WebSocket fan-out server: the yardstick of what this machine
//! allows, for the load benchmark (`benches/load.rs`). No features, no limits: one Redis
//! pub/sub channel, every message encoded once as a text frame and sent to every socket.
//!
//! ```text
//! minimal_fanout <listen addr> <redis url> <redis channel>
//! ```
//!
//! Any path is accepted; no pings, no close handshake; what clients send is discarded.
//! A socket that falls more than `CAPACITY` frames behind skips them (counted, and
//! printed on stderr at most once a second).

use std::io::{ErrorKind, IoSlice};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use base64::Engine;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};

const CAPACITY: usize = 16384;
const MAX_HEAD: usize = 8192;
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Frames skipped by lagging sockets.
static LAGGED: AtomicU64 = AtomicU64::new(0);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, url, channel] = &args[..] else {
        eprintln!("usage: minimal_fanout <listen addr> <redis url> <redis channel>");
        std::process::exit(2);
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(serve(listen, url, channel));
}

async fn serve(listen: &str, url: &str, channel: &str) {
    let (tx, _) = broadcast::channel::<Bytes>(CAPACITY);
    let mut pubsub = redis::Client::open(url)
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    pubsub.subscribe(channel).await.unwrap();
    let sender = tx.clone();
    tokio::spawn(async move {
        let mut messages = pubsub.into_on_message();
        while let Some(msg) = messages.next().await {
            // Nobody connected is not an error.
            let _ = sender.send(text_frame(msg.get_payload_bytes()));
        }
        eprintln!("redis subscription ended");
        std::process::exit(1);
    });
    tokio::spawn(async {
        let mut reported = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let lagged = LAGGED.load(Relaxed);
            if lagged != reported {
                eprintln!("minimal_fanout: {lagged} frames skipped by lagging sockets");
                reported = lagged;
            }
        }
    });
    let addr = listen.parse().expect("listen address");
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).unwrap();
    let listener = socket.listen(4096).unwrap();
    println!("listening on {}", listener.local_addr().unwrap());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors, most likely: try again shortly.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let rx = tx.subscribe();
        tokio::spawn(async move {
            let _ = connection(stream, rx).await;
        });
    }
}

/// An unmasked, final text frame: header and payload in one buffer.
fn text_frame(payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(payload.len() + 10);
    frame.put_u8(0x81);
    match payload.len() {
        n if n < 126 => frame.put_u8(n as u8),
        n if n <= 0xffff => {
            frame.put_u8(126);
            frame.put_u16(n as u16);
        }
        n => {
            frame.put_u8(127);
            frame.put_u64(n as u64);
        }
    }
    frame.put_slice(payload);
    frame.freeze()
}

async fn connection(
    mut stream: TcpStream,
    mut rx: broadcast::Receiver<Bytes>,
) -> std::io::Result<()> {
    // Subscribed at accept: frames published during the handshake follow the 101.
    upgrade(&mut stream).await?;
    loop {
        tokio::select! {
            first = rx.recv() => {
                let mut batch = match first {
                    Ok(frame) => vec![frame],
                    Err(RecvError::Lagged(n)) => { LAGGED.fetch_add(n, Relaxed); continue; }
                    Err(RecvError::Closed) => return Ok(()),
                };
                loop {
                    match rx.try_recv() {
                        Ok(frame) => batch.push(frame),
                        Err(TryRecvError::Lagged(n)) => { LAGGED.fetch_add(n, Relaxed); }
                        Err(_) => break,
                    }
                }
                write_all(&stream, batch).await?;
            }
            ready = stream.readable() => {
                ready?;
                // Client bytes are read and dropped; the buffer lives only here.
                let mut discard = [0u8; 4096];
                match stream.try_read(&mut discard) {
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

/// Writes every frame of `batch`, as few vectored writes as the kernel allows.
async fn write_all(stream: &TcpStream, mut batch: Vec<Bytes>) -> std::io::Result<()> {
    let mut first = 0;
    while first < batch.len() {
        stream.writable().await?;
        let written = {
            let mut slices = [IoSlice::new(&[]); 64];
            let count = (batch.len() - first).min(slices.len());
            for (slice, frame) in slices.iter_mut().zip(&batch[first..first + count]) {
                *slice = IoSlice::new(frame);
            }
            match stream.try_write_vectored(&slices[..count]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        let mut left = written;
        while left > 0 {
            let len = batch[first].len();
            if left >= len {
                left -= len;
                first += 1;
            } else {
                batch[first].advance(left);
                left = 0;
            }
        }
    }
    Ok(())
}

/// Reads the request head (at most `MAX_HEAD` bytes) and answers 101.
async fn upgrade(stream: &mut TcpStream) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() >= MAX_HEAD || stream.read_buf(&mut head).await? == 0 {
            return Err(ErrorKind::InvalidData.into());
        }
    }
    let text = String::from_utf8_lossy(&head);
    let key = text.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("sec-websocket-key")
            .then(|| value.trim())
    });
    let Some(key) = key else {
        stream
            .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            .await?;
        return Err(ErrorKind::InvalidData.into());
    };
    let accept = base64::engine::general_purpose::STANDARD
        .encode(Sha1::new().chain_update(key).chain_update(GUID).finalize());
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    stream.write_all(answer.as_bytes()).await
}
