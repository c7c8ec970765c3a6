//! The shipped nginx site files (`nginx/`) in front of real gateways, with a real
//! `nginx` (Debian package `nginx`).
//!
//! Each test derives its configuration from the shipped file: only the `listen`
//! addresses, the upstream servers, the certificate paths and, where a test says so, the
//! proxy timeouts of a location are replaced; every other line is the operator's. The
//! result is wrapped in a minimal main configuration whose pid, logs and temporary
//! directories live in a directory of the test's own, removed when the test ends.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

use crate::harness::{free_port, http, Client, Event, EventStream, Gateway, RedisServer, WAIT};

const SITE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/nginx/wsrelay.conf");
const TLS_SITE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/nginx/wsrelay-tls.conf");

/// The text of a shipped site file, as the repository holds it now.
fn shipped(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// What a test changes in a shipped site file.
#[derive(Default)]
struct Derive<'a> {
    /// New addresses of the `listen` directives, in the order they appear (their
    /// parameters, such as `ssl`, are kept).
    listen: Vec<SocketAddr>,
    /// The servers of each named upstream block.
    upstreams: Vec<(&'a str, Vec<SocketAddr>)>,
    /// Per location (its path, as in `location /sse/`): a value for its
    /// `proxy_read_timeout` and, where it has one, its `proxy_send_timeout`.
    timeouts: &'a [(&'a str, &'a str)],
    /// Certificate and key files for `ssl_certificate` and `ssl_certificate_key`.
    tls: Option<(&'a Path, &'a Path)>,
}

impl Derive<'_> {
    /// Rewrites `shipped`; fails when a line it should replace is not there, so a change
    /// of the shipped file cannot silently make a test test something else.
    fn apply(&self, shipped: &str) -> String {
        let mut out = Vec::new();
        let mut listens = 0;
        let mut read_timeouts = Vec::new();
        let mut certs = 0;
        let mut upstream: Option<&str> = None;
        let mut location: Option<&str> = None;
        let mut replaced_upstreams = Vec::new();
        for line in shipped.lines() {
            let code = line.split('#').next().unwrap_or("").trim();
            let directive = code.split_whitespace().next().unwrap_or("");
            let indent = &line[..line.len() - line.trim_start().len()];
            if directive == "upstream" {
                upstream = code.split_whitespace().nth(1);
            } else if directive == "location" {
                location = code.split_whitespace().nth(1);
            } else if code == "}" {
                upstream = None;
                location = None;
            }
            let timeout = self
                .timeouts
                .iter()
                .find(|(l, _)| Some(*l) == location)
                .map(|(_, t)| *t);
            match directive {
                "listen" => {
                    let addr = self.listen.get(listens).unwrap_or_else(|| {
                        panic!("more listen lines than the test replaces: {line}")
                    });
                    listens += 1;
                    let params: Vec<&str> = code
                        .trim_end_matches(';')
                        .split_whitespace()
                        .skip(2)
                        .collect();
                    let mut new = format!("{indent}listen {addr}");
                    for p in params {
                        new.push(' ');
                        new.push_str(p);
                    }
                    new.push(';');
                    out.push(new);
                }
                "server" if upstream.is_some() => {
                    let name = upstream.unwrap();
                    let Some((_, servers)) = self.upstreams.iter().find(|(n, _)| *n == name) else {
                        out.push(line.to_string());
                        continue;
                    };
                    // The first server line of the block stands for all of them.
                    if !replaced_upstreams.contains(&name) {
                        replaced_upstreams.push(name);
                        for s in servers {
                            out.push(format!("{indent}server {s};"));
                        }
                    }
                }
                "proxy_read_timeout" | "proxy_send_timeout" if timeout.is_some() => {
                    if directive == "proxy_read_timeout" {
                        read_timeouts.extend(location);
                    }
                    out.push(format!("{indent}{directive} {};", timeout.unwrap()));
                }
                "ssl_certificate" | "ssl_certificate_key" if self.tls.is_some() => {
                    certs += 1;
                    let (cert, key) = self.tls.unwrap();
                    let file = if directive == "ssl_certificate" {
                        cert
                    } else {
                        key
                    };
                    out.push(format!("{indent}{directive} {};", file.display()));
                }
                _ => out.push(line.to_string()),
            }
        }
        assert_eq!(listens, self.listen.len(), "listen lines of the site file");
        for (name, _) in &self.upstreams {
            assert!(
                replaced_upstreams.contains(name),
                "no servers in upstream {name}"
            );
        }
        for (location, _) in self.timeouts {
            assert_eq!(
                read_timeouts.iter().filter(|l| *l == location).count(),
                1,
                "proxy_read_timeout of location {location}"
            );
        }
        if self.tls.is_some() {
            assert_eq!(certs, 2, "ssl_certificate and ssl_certificate_key");
        }
        out.join("\n") + "\n"
    }
}

/// A directory of the test's own under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("wsrelay-{what}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A real nginx (master and workers) serving one site file, stopped on drop.
struct Nginx {
    /// The first `listen` address of the site.
    addr: SocketAddr,
    child: Child,
    dir: TempDir,
}

impl Nginx {
    /// Starts nginx on `site` and waits until every address of `listen` accepts
    /// connections. The main configuration compresses event streams, as an operator's
    /// may (Debian's turns gzip on), and ignores the gateway's `X-Accel-Buffering: no`:
    /// the site's own lines must keep events from being held back.
    fn start(site: &str, listen: &[SocketAddr]) -> Nginx {
        let dir = TempDir::new("nginx");
        let d = dir.0.display();
        std::fs::write(dir.0.join("site.conf"), site).unwrap();
        let main = format!(
            "daemon off;\n\
             user root;\n\
             worker_processes 1;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\n\
             events {{ worker_connections 512; }}\n\
             http {{\n\
             \x20   access_log {d}/access.log;\n\
             \x20   client_body_temp_path {d}/client_body;\n\
             \x20   proxy_temp_path {d}/proxy;\n\
             \x20   fastcgi_temp_path {d}/fastcgi;\n\
             \x20   uwsgi_temp_path {d}/uwsgi;\n\
             \x20   scgi_temp_path {d}/scgi;\n\
             \x20   gzip on;\n\
             \x20   gzip_types text/event-stream;\n\
             \x20   proxy_ignore_headers X-Accel-Buffering;\n\
             \x20   include {d}/site.conf;\n\
             }}\n"
        );
        let conf = dir.0.join("nginx.conf");
        std::fs::write(&conf, main).unwrap();
        let child = Command::new(nginx_binary())
            .arg("-p")
            .arg(&dir.0)
            .arg("-c")
            .arg(&conf)
            // The log nginx writes to before it has read the configuration.
            .arg("-e")
            .arg(dir.0.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nginx must be installed (apt-get install nginx)");
        let mut nginx = Nginx {
            addr: listen[0],
            child,
            dir,
        };
        let deadline = std::time::Instant::now() + WAIT;
        for addr in listen {
            while std::net::TcpStream::connect_timeout(addr, Duration::from_millis(200)).is_err() {
                if let Some(status) = nginx.child.try_wait().unwrap() {
                    let mut stderr = String::new();
                    if let Some(mut e) = nginx.child.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
                    }
                    panic!(
                        "nginx exited ({status}): {stderr}\n{}\n--- site ---\n{site}",
                        nginx.error_log()
                    );
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "nginx does not listen on {addr}: {}",
                    nginx.error_log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        nginx
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("error.log")).unwrap_or_default()
    }

    fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM makes the master stop its workers before it exits; SIGKILL would leave
        // them running.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + WAIT;
        while matches!(self.child.try_wait(), Ok(None)) {
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if std::thread::panicking() {
            eprintln!("--- nginx error log ---\n{}", self.error_log());
        }
    }
}

/// `nginx` from PATH, or where Debian installs it (/usr/sbin is not on every PATH).
fn nginx_binary() -> &'static str {
    let on_path = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("nginx").is_file()));
    if on_path {
        "nginx"
    } else {
        "/usr/sbin/nginx"
    }
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// nginx on the plain site file, in front of `gateways`, with the proxy timeouts of
/// `timeouts` (per location). The `webapp` upstream points at `webapp`, or at an unused
/// port.
fn plain_nginx(
    gateways: &[&Gateway],
    webapp: Option<SocketAddr>,
    timeouts: &[(&str, &str)],
) -> Nginx {
    let addr = local(free_port());
    let site = Derive {
        listen: vec![addr],
        upstreams: vec![
            ("wsrelay", gateways.iter().map(|g| g.addr).collect()),
            ("webapp", vec![webapp.unwrap_or_else(|| local(free_port()))]),
        ],
        timeouts,
        tls: None,
    }
    .apply(&shipped(SITE));
    Nginx::start(&site, &[addr])
}

async fn redis_gateway(redis: &RedisServer, settings: &[(&str, &str)]) -> Gateway {
    let url = redis.url();
    let mut all = settings.to_vec();
    all.push(("redis__url", &url));
    let gw = Gateway::start(&all);
    gw.wait_health(200).await;
    gw
}

/// A stand-in web application answering every request with `200 webapp`.
async fn webapp() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nwebapp",
                    )
                    .await;
            });
        }
    });
    addr
}

/// A TCP connection to `to` from the local address `from`.
async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    tokio::time::timeout(WAIT, socket.connect(to))
        .await
        .expect("connect timed out")
        .unwrap()
}

/// A WebSocket handshake through `nginx` from the local address `from`.
async fn ws_from(from: IpAddr, nginx: &Nginx, path: &str) -> Client {
    let stream = connect_from(from, nginx.addr).await;
    let (ws, _) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::client_async(nginx.ws_url(path), MaybeTlsStream::Plain(stream)),
    )
    .await
    .expect("handshake timed out")
    .unwrap_or_else(|e| panic!("handshake from {from}: {e}"));
    Client { ws }
}

/// A WebSocket handshake request with extra `headers`, sent by hand from `from`;
/// returns the status and, for a refusal, the body (read up to its Content-Length: nginx
/// keeps the connection open after it).
async fn raw_handshake_from(
    from: IpAddr,
    to: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut stream = connect_from(from, to).await;
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {to}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let read = async {
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw[..end]).to_string();
                let status: u16 = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let length = head
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(n, _)| n.trim().eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.trim().parse::<usize>().ok());
                let body = &raw[end + 4..];
                match length {
                    _ if status == 101 => return (status, String::new()),
                    Some(n) if body.len() >= n => {
                        return (status, String::from_utf8_lossy(&body[..n]).to_string())
                    }
                    _ => {}
                }
            }
            let n = stream.read(&mut buf).await.unwrap_or(0);
            assert!(n > 0, "connection ended: {}", String::from_utf8_lossy(&raw));
            raw.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("handshake answer")
}

/// Keeps reading from `client` for `idle`, answering pings (tungstenite queues the pong
/// and sends it while the stream is polled); fails on anything but a ping or pong.
async fn stay_idle(client: &mut Client, idle: Duration) {
    let until = tokio::time::Instant::now() + idle;
    loop {
        match tokio::time::timeout_at(until, client.ws.next()).await {
            Err(_) => return,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(other) => panic!("the idle socket got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_through_nginx_receives_a_redis_publication() {
    let redis = RedisServer::start().await;
    let gw = redis_gateway(&redis, &[]).await;
    let app = webapp().await;
    let nginx = plain_nginx(&[&gw], Some(app), &[]);

    // A stored message proves the subscription is live before the publication.
    redis.publish("broadcast:chat", b"ready", 60).await;
    let mut c = Client::connect(&nginx.ws_url("/ws/chat?subscribe-broadcast")).await;
    assert_eq!(c.recv_text().await, "ready");
    redis.publish("broadcast:chat", b"hello via nginx", 0).await;
    assert_eq!(c.recv_text().await, "hello via nginx");

    // A page served through nginx may open a socket: the Host the gateway sees carries
    // nginx's port, as the page's Origin does. Another origin is refused.
    let origin = format!("http://{}", nginx.addr);
    let (_page, _) = Client::try_connect(
        &nginx.ws_url("/ws/chat?subscribe-broadcast"),
        &[("Origin", &origin)],
    )
    .await
    .unwrap_or_else(|e| panic!("socket from the page's own origin: {e}"));
    let localhost = IpAddr::from([127, 0, 0, 1]);
    let (status, body) = raw_handshake_from(
        localhost,
        nginx.addr,
        "/ws/chat",
        &[("Origin", "http://evil.example")],
    )
    .await;
    assert_eq!(status, 403, "{body}");

    // Without an upgrade, /ws/ still reaches the gateway, which refuses the request;
    // every other path is the web application's.
    let plain = http(nginx.addr, "GET", "/ws/chat", &[], "").await;
    assert_eq!(
        (plain.status, plain.body.as_str()),
        (400, "Client does not wish to upgrade to a websocket")
    );
    let page = http(nginx.addr, "GET", "/accounts/login/", &[], "").await;
    assert_eq!((page.status, page.body.as_str()), (200, "webapp"));
    // The browser helper comes from the gateway, not from the web application.
    for path in ["/wsrelay.js", "/wsrelay.mjs", "/wsrelay.d.ts"] {
        let helper = http(nginx.addr, "GET", path, &[], "").await;
        assert_eq!(helper.status, 200, "{path}");
        assert!(helper.body.contains("WS4Redis"), "{path}: {}", helper.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_sees_the_client_address_nginx_forwards() {
    // A process of its own: the test reads its log.
    let gw = Gateway::start_process(
        &[
            ("policy__trusted_proxies", "127.0.0.1"),
            ("policy__max_connections_per_ip", "1"),
        ],
        &[],
    );
    let nginx = plain_nginx(&[&gw], None, &[]);
    let (two, three): (IpAddr, IpAddr) = ([127, 0, 0, 2].into(), [127, 0, 0, 3].into());

    // Every connection reaches the gateway from nginx's 127.0.0.1; the limit of one per
    // address holds per browser only if the forwarded address counts.
    let first = ws_from(two, &nginx, "/ws/chat?subscribe-broadcast").await;
    let second = ws_from(three, &nginx, "/ws/chat?subscribe-broadcast").await;
    let (status, body) = raw_handshake_from(two, nginx.addr, "/ws/chat", &[]).await;
    assert_eq!(
        (status, body.as_str()),
        (429, "too many connections from 127.0.0.2")
    );

    let deadline = tokio::time::Instant::now() + WAIT;
    while !gw.log().iter().any(|l| l.contains("client=127.0.0.3")) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no connection logged from 127.0.0.3: {:?}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.close().await;
    second.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_pings_keep_a_socket_open_past_nginx_read_timeout() {
    let redis = RedisServer::start().await;
    let gw = redis_gateway(&redis, &[("ping_interval", "0.3")]).await;
    let nginx = plain_nginx(&[&gw], None, &[("/ws/", "1s")]);

    redis.publish("broadcast:quiet", b"ready", 60).await;
    let mut c = Client::connect(&nginx.ws_url("/ws/quiet?subscribe-broadcast")).await;
    assert_eq!(c.recv_text().await, "ready");
    stay_idle(&mut c, Duration::from_millis(2500)).await;
    redis.publish("broadcast:quiet", b"still here", 0).await;
    assert_eq!(c.recv_text().await, "still here");
}

/// The counterpart of the test above: without pings, nginx does close the idle socket,
/// so the timeout of the derived configuration is really in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pings_nginx_closes_an_idle_socket() {
    let gw = Gateway::start(&[("ping_interval", "0")]);
    let nginx = plain_nginx(&[&gw], None, &[("/ws/", "1s")]);

    let mut c = Client::connect(&nginx.ws_url("/ws/quiet?subscribe-broadcast")).await;
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match c.ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(other)) => panic!("the idle socket got {other:?}"),
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "nginx kept the idle socket open");
    assert!(
        nginx.error_log().contains("upstream timed out"),
        "{}",
        nginx.error_log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_spreads_sockets_over_two_gateways_on_one_redis() {
    let redis = RedisServer::start().await;
    let a = redis_gateway(&redis, &[]).await;
    let b = redis_gateway(&redis, &[]).await;
    let nginx = plain_nginx(&[&a, &b], None, &[]);

    redis.publish("broadcast:crowd", b"ready", 60).await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut c = Client::connect(&nginx.ws_url("/ws/crowd?subscribe-broadcast")).await;
        assert_eq!(c.recv_text().await, "ready");
        clients.push(c);
    }

    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let held_a = a.health().await.1["sockets"].as_u64().unwrap_or(0);
        let held_b = b.health().await.1["sockets"].as_u64().unwrap_or(0);
        if held_a + held_b == 20 && held_a > 0 && held_b > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sockets per gateway: {held_a} and {held_b}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    redis.publish("broadcast:crowd", b"to everybody", 0).await;
    for c in &mut clients {
        assert_eq!(c.recv_text().await, "to everybody");
    }
}

/// A self-signed certificate for `localhost` and 127.0.0.1, made by `openssl`.
fn certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .arg("ec_paramgen_curve:prime256v1")
        .args(["-nodes", "-days", "2", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl must be installed");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// Opens `wss://localhost:{port}{path}` (trusting only `cert`), waits for one text
/// message and returns it. Blocking: run it off the async workers.
fn wss_first_text(port: u16, path: &str, cert: &Path) -> String {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use std::sync::Arc;

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(cert).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = std::net::TcpStream::connect_timeout(&local(port), WAIT).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    tcp.set_write_timeout(Some(WAIT)).unwrap();
    let tls = rustls::StreamOwned::new(conn, tcp);
    let url = format!("wss://localhost:{port}{path}");
    let (mut ws, _) = tokio_tungstenite::tungstenite::client(url.as_str(), tls)
        .unwrap_or_else(|e| panic!("wss handshake: {e}"));
    loop {
        match ws.read().expect("wss message") {
            Message::Text(t) => return t.to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_site_carries_wss_and_redirects_plain_http() {
    let redis = RedisServer::start().await;
    let gw = redis_gateway(&redis, &[]).await;
    let certs = TempDir::new("nginx-cert");
    let (cert, key) = certificate(&certs.0);
    let (http_addr, https_addr) = (local(free_port()), local(free_port()));
    let site = Derive {
        listen: vec![http_addr, https_addr],
        upstreams: vec![
            ("wsrelay", vec![gw.addr]),
            ("webapp", vec![local(free_port())]),
        ],
        timeouts: &[],
        tls: Some((&cert, &key)),
    }
    .apply(&shipped(TLS_SITE));
    let _nginx = Nginx::start(&site, &[http_addr, https_addr]);

    let redirect = http(http_addr, "GET", "/ws/chat?subscribe-broadcast", &[], "").await;
    assert_eq!(redirect.status, 301, "{}", redirect.head);
    assert!(
        redirect
            .head
            .lines()
            .any(|l| l.to_ascii_lowercase().starts_with("location: https://")
                && l.ends_with("/ws/chat?subscribe-broadcast")),
        "{}",
        redirect.head
    );

    redis.publish("broadcast:secure", b"over tls", 60).await;
    let port = https_addr.port();
    let text = tokio::task::spawn_blocking(move || {
        wss_first_text(port, "/ws/secure?subscribe-broadcast", &cert)
    })
    .await
    .unwrap();
    assert_eq!(text, "over tls");
}

/// Facilities under `feed/` keep a history, so their messages have ids.
const HISTORY: &str = "[[facility]]\npattern = \"feed/*\"\nhistory = 5\nhistory_ttl = 600\n";

/// A gateway with the history rules above, on `redis`.
async fn history_gateway(redis: &RedisServer, settings: &[(&str, &str)]) -> Gateway {
    let url = redis.url();
    let mut all = settings.to_vec();
    all.push(("redis__url", &url));
    let gw = Gateway::start_with_file(HISTORY, &all);
    gw.wait_health(200).await;
    gw
}

/// `POST path` with `message` as the body; checks the 200 and returns the id of the
/// message on its first key (`None` on a key without history).
async fn pub_message(
    to: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    message: &str,
) -> Option<String> {
    let reply = http(to, "POST", path, headers, message).await;
    assert_eq!(reply.status, 200, "{}\r\n\r\n{}", reply.head, reply.body);
    let body: Value = serde_json::from_str(&reply.body).unwrap();
    body["ids"][0].as_str().map(String::from)
}

/// A long-poll's answer to `GET path`: checks the 200 and its head, returns the array.
async fn poll(to: SocketAddr, path: &str) -> Vec<Value> {
    let reply = http(to, "GET", path, &[], "").await;
    let whole = format!("{}\r\n\r\n{}", reply.head, reply.body);
    assert_eq!(reply.status, 200, "{whole}");
    let head = reply.head.to_ascii_lowercase();
    assert!(head.contains("content-type: application/json"), "{whole}");
    assert!(head.contains("cache-control: no-store"), "{whole}");
    serde_json::from_str::<Value>(&reply.body)
        .unwrap_or_else(|e| panic!("{e}: {whole}"))
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {whole}"))
        .clone()
}

/// The `(data, id)` of the message elements of a poll's answer.
fn poll_messages(elements: &[Value]) -> Vec<(String, String)> {
    elements
        .iter()
        .filter(|e| e["type"] == "message")
        .map(|e| {
            let field = |name: &str| e[name].as_str().unwrap_or_default().to_string();
            (field("data"), field("id"))
        })
        .collect()
}

/// Waits until `key` has `count` subscribers in Redis (gateways subscribe to a key
/// while one of their sockets or polls listens to it).
async fn until_subscribers(redis: &RedisServer, key: &str, count: i64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let n = redis.numsub(key).await;
        if n == count {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key} has {n} subscribers, expected {count}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the gateways hold `counts` sockets (event streams count; waiting polls
/// do not).
async fn until_sockets(gateways: &[&Gateway], counts: &[u64]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut held = Vec::new();
        for gw in gateways {
            held.push(gw.health().await.1["sockets"].as_u64().unwrap_or(0));
        }
        if held == counts {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sockets per gateway: {held:?}, expected {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_stream_through_nginx_gets_messages_and_heartbeats() {
    let redis = RedisServer::start().await;
    let gw = redis_gateway(&redis, &[("heartbeat_interval", "0.3")]).await;
    // nginx ends a stream silent for 1 s: only the heartbeats keep this one open.
    let nginx = plain_nginx(&[&gw], None, &[("/sse/", "1s")]);

    // A page served through nginx opens it, as EventSource does (gzip accepted; the
    // main configuration would compress event streams).
    let origin = format!("http://{}", nginx.addr);
    let headers = [("Origin", origin.as_str()), ("Accept-Encoding", "gzip")];
    let mut s = EventStream::open(nginx.addr, "/sse/chat?subscribe-broadcast", &headers).await;
    assert_eq!(s.status, 200, "{}", s.head);
    assert_eq!(
        s.header("content-type").as_deref(),
        Some("text/event-stream")
    );
    assert_eq!(s.header("cache-control").as_deref(), Some("no-cache"));
    // The gateway's own stream: neither compressed nor re-framed in chunks.
    assert_eq!(s.header("content-encoding"), None, "{}", s.head);
    assert_eq!(s.header("transfer-encoding"), None, "{}", s.head);
    s.subscribed().await;
    redis.publish("broadcast:chat", b"hello via nginx", 0).await;
    assert_eq!(
        s.next_message().await.data.as_deref(),
        Some("hello via nginx")
    );

    // Heartbeats come when nothing was written for 0.3 s: eight of them in a row
    // outlast nginx's read timeout, and the stream still carries messages after them.
    let heartbeat = Event {
        comment: true,
        ..Event::default()
    };
    for _ in 0..8 {
        let event = s.next().await.expect("nginx ended the stream");
        assert_eq!(event, heartbeat);
    }
    redis.publish("broadcast:chat", b"still here", 0).await;
    assert_eq!(s.next_message().await.data.as_deref(), Some("still here"));

    // Another site's page may not open one: the gateway compares the Origin with the
    // Host nginx passes on. (nginx would keep the connection open after the refusal.)
    let mut foreign = EventStream::open(
        nginx.addr,
        "/sse/chat?subscribe-broadcast",
        &[("Origin", "http://evil.example"), ("Connection", "close")],
    )
    .await;
    assert_eq!(foreign.status, 403, "{}", foreign.head);
    let reason = foreign.body().await;
    assert!(reason.contains("evil.example"), "{reason}");
}

/// The counterpart of the test above: heartbeats rarer than nginx's read timeout do not
/// keep a stream open, so the derived timeout is really the /sse/ location's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_ends_an_event_stream_silent_past_its_read_timeout() {
    // No heartbeat before nginx's 1 s have passed.
    let gw = Gateway::start(&[("heartbeat_interval", "8")]);
    let nginx = plain_nginx(&[&gw], None, &[("/sse/", "1s")]);

    let mut s = EventStream::open(nginx.addr, "/sse/quiet?subscribe-broadcast", &[]).await;
    assert_eq!(s.status, 200, "{}", s.head);
    s.subscribed().await;
    assert_eq!(s.next().await, None, "the silent stream was kept open");
    assert!(
        nginx.error_log().contains("upstream timed out"),
        "{}",
        nginx.error_log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_through_nginx_answers_when_a_message_is_published() {
    let redis = RedisServer::start().await;
    // Longer than any wait below, shorter than the harness's.
    let gw = redis_gateway(&redis, &[("poll_timeout", "8")]).await;
    let nginx = plain_nginx(&[&gw], None, &[]);
    let key = "broadcast:news";

    pub_message(nginx.addr, "/pub/news?publish-broadcast", &[], "first").await;
    // Without `since`, the stored message answers at once; its id names it.
    let answer = poll(nginx.addr, "/poll/news?subscribe-broadcast").await;
    let messages = poll_messages(&answer);
    assert_eq!(messages.len(), 1, "{answer:?}");
    let (data, seen) = &messages[0];
    assert_eq!(data, "first");

    // A poll that has seen it waits for the next publication; the gateway subscribing
    // to the key in Redis says the poll is there.
    until_subscribers(&redis, key, 0).await;
    let path = format!("/poll/news?subscribe-broadcast&since=broadcast:{seen}");
    let addr = nginx.addr;
    let waiting = tokio::spawn(async move { poll(addr, &path).await });
    until_subscribers(&redis, key, 1).await;
    pub_message(nginx.addr, "/pub/news?publish-broadcast", &[], "second").await;
    let answer = waiting.await.unwrap();
    let messages = poll_messages(&answer);
    assert_eq!(messages.len(), 1, "{answer:?}");
    assert_eq!(messages[0].0, "second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_through_nginx_answers_empty_after_poll_timeout() {
    let gw = Gateway::start(&[("poll_timeout", "0.5")]);
    let nginx = plain_nginx(&[&gw], None, &[]);

    let answer = poll(nginx.addr, "/poll/quiet?subscribe-broadcast").await;
    assert!(answer.is_empty(), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publications_through_nginx_reach_streams_and_polls_on_both_gateways() {
    let redis = RedisServer::start().await;
    let a = history_gateway(&redis, &[]).await;
    let b = history_gateway(&redis, &[]).await;
    let nginx = plain_nginx(&[&a, &b], None, &[]);

    // least_conn sends the second stream to the gateway that holds none.
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut s = EventStream::open(nginx.addr, "/sse/feed/crowd?subscribe-broadcast", &[]).await;
        assert_eq!(s.status, 200, "{}", s.head);
        s.subscribed().await;
        streams.push(s);
    }
    until_sockets(&[&a, &b], &[1, 1]).await;

    // A page served through nginx publishes: its Origin names the Host nginx passes on.
    let origin = format!("http://{}", nginx.addr);
    let page = [("Origin", origin.as_str())];
    let path = "/pub/feed/crowd?publish-broadcast";
    let id = pub_message(nginx.addr, path, &page, "to both")
        .await
        .expect("an id on a history key");
    for s in &mut streams {
        let event = s.next_message().await;
        assert_eq!(event.data.as_deref(), Some("to both"));
        assert_eq!(event.id, Some(format!("broadcast:{id}")));
    }
    let foreign = http(
        nginx.addr,
        "POST",
        path,
        &[("Origin", "http://evil.example")],
        "forged",
    )
    .await;
    assert_eq!(foreign.status, 403, "{}", foreign.body);

    // Any gateway answers any poll: published on B, polled on A and through nginx.
    let from_b = pub_message(b.addr, path, &[], "from b").await.unwrap();
    let since = format!("/poll/feed/crowd?subscribe-broadcast&since=broadcast:{id}");
    let expected = [("from b".to_string(), from_b)];
    assert_eq!(poll_messages(&poll(a.addr, &since).await), expected);
    assert_eq!(poll_messages(&poll(nginx.addr, &since).await), expected);
    for s in &mut streams {
        assert_eq!(s.next_message().await.data.as_deref(), Some("from b"));
    }
}

/// nginx takes a publication as large as the gateway's default `max_message_size`: the
/// site's `client_max_body_size` is not below it (a new default must be written there
/// too). One byte more is refused, by nginx or the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_takes_a_publication_of_max_message_size() {
    let gw = Gateway::start(&[]);
    let nginx = plain_nginx(&[&gw], None, &[]);
    let max = wsrelay::config::DEFAULT_MAX_MESSAGE_SIZE;

    let path = "/pub/big?publish-broadcast";
    let largest = http(nginx.addr, "POST", path, &[], &"x".repeat(max)).await;
    assert_eq!(largest.status, 200, "{}", largest.body);
    let over = http(nginx.addr, "POST", path, &[], &"x".repeat(max + 1)).await;
    assert_eq!(over.status, 413, "{}", over.body);
}
