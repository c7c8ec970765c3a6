//! The Python package (`python/`, distribution `wsrelay`) against the real gateway: its
//! pytest suite runs in the Django virtual environment (`target/django-venv`, see
//! `django_site`), with a gateway in this process on a Redis of its own, both with a key
//! prefix, so the Python `RedisPublisher` is checked to write exactly the keys the
//! gateway reads; and with the shared Redis Cluster and a Sentinel set of its own, for
//! the publisher's other topologies.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Gateway, RedisServer, TempDir, TOKEN};
use crate::redis_topology::{RedisCluster, RedisSentinel};

/// The whole pytest run; it takes a few seconds.
const PYTEST_LIMIT: Duration = Duration::from_secs(300);
const PREFIX: &str = "site";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pytest_suite() {
    let python = crate::django_site::python();
    let redis = RedisServer::start().await;
    let url = redis.url();
    // The same history rule as the site's WSRELAY_FACILITIES (python/tests/settings.py).
    let facilities = "[[facility]]\npattern = \"pyfeed/*\"\nhistory = 10\nhistory_ttl = 600\n";
    let mut gw = Gateway::start_with_file(
        facilities,
        &[("redis__url", &url), ("redis__prefix", PREFIX)],
    );
    gw.wait_health(200).await;
    // The publisher's cluster and Sentinel tests (python/tests/test_cluster.py,
    // test_sentinel.py) publish on these and read back with Redis's own pub/sub.
    let cluster = RedisCluster::shared().await;
    let sentinel = RedisSentinel::start().await;

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = TempDir::new("pytest");
    let log = out.join("pytest.log");
    let mut child = Command::new(&python)
        .args([
            "-m",
            "pytest",
            "python/tests",
            "-q",
            "-p",
            "no:cacheprovider",
            "--basetemp",
        ])
        // pytest's own temporary files stay in the test's directory, not in /tmp.
        .arg(out.join("basetemp"))
        .current_dir(root)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("WSRELAY_TEST_REDIS_URL", &url)
        .env("WSRELAY_TEST_GATEWAY", gw.addr.to_string())
        .env("WSRELAY_TEST_TOKEN", TOKEN)
        .env("WSRELAY_TEST_PREFIX", PREFIX)
        .env("WSRELAY_TEST_CLUSTER_SEEDS", cluster.seeds())
        .env("WSRELAY_TEST_SENTINEL_NODES", sentinel.nodes())
        .env("WSRELAY_TEST_SENTINEL_MASTER", sentinel.master_name())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(out.join("stderr.log")).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let deadline = Instant::now() + PYTEST_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let errors = std::fs::read_to_string(out.join("stderr.log")).unwrap_or_default();
    match status {
        Some(s) if s.success() => {
            // Everything ran: a suite that skipped its gateway tests proves nothing.
            assert!(
                !output.contains("skipped"),
                "pytest skipped tests:\n{output}\n{errors}"
            );
        }
        Some(s) => panic!("pytest failed ({s}):\n{output}\n{errors}"),
        None => panic!("pytest took longer than {PYTEST_LIMIT:?}:\n{output}\n{errors}"),
    }
    assert!(gw.stop().success());
}
