//! The browser helper (`/wsrelay.js`) and the demo page in a real headless Chromium.
//!
//! The scenarios live in `tests/browser/run.mjs` (Node, playwright-core driving Debian's
//! `chromium`); this test installs its Node packages when they are missing, runs it
//! against the freshly built binary and fails with its output when a scenario fails. The
//! runner starts its own `redis-server` and gateways and stops only those.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Where the runner expects the browser (Debian's `chromium` package).
const CHROMIUM: &str = "/usr/bin/chromium";
/// The longest the whole browser run may take (the runner bounds itself below that).
const RUN_LIMIT: Duration = Duration::from_secs(300);
/// The longest `npm ci` may take.
const INSTALL_LIMIT: Duration = Duration::from_secs(240);

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Runs `cmd` to its end or until `limit`, and returns its status and combined output.
/// On the limit the process gets SIGTERM (the runner then stops what it started), then
/// SIGKILL.
fn run_bounded(mut cmd: Command, what: &str, limit: Duration) -> (ExitStatus, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e} (is Node.js installed?)"));
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    let status = wait_bounded(&mut child, limit);
    let mut output = stdout.join().unwrap();
    let errors = stderr.join().unwrap();
    if !errors.trim().is_empty() {
        output.push_str("\n--- stderr ---\n");
        output.push_str(&errors);
    }
    match status {
        Some(status) => (status, output),
        None => panic!(
            "{what} did not finish within {} s; its output:\n{output}",
            limit.as_secs()
        ),
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let grace = Instant::now() + Duration::from_secs(10);
            while Instant::now() < grace {
                if child.try_wait().unwrap().is_some() {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `npm ci` (or `npm install` without a lock file) when `node_modules` is missing.
fn install_packages(dir: &Path) {
    if dir.join("node_modules/playwright-core").is_dir() {
        return;
    }
    let verb = if dir.join("package-lock.json").is_file() {
        "ci"
    } else {
        "install"
    };
    let mut cmd = Command::new("npm");
    cmd.arg(verb)
        .args(["--no-audit", "--no-fund"])
        .current_dir(dir)
        // playwright-core downloads nothing on install; the browser is Debian's.
        .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1");
    let (status, output) = run_bounded(cmd, &format!("npm {verb}"), INSTALL_LIMIT);
    assert!(
        status.success(),
        "npm {verb} in {} failed ({status}):\n{output}",
        dir.display()
    );
}

#[test]
fn headless_chromium() {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: the browser tests need Debian's Chromium \
         (apt-get install -y chromium); .ci/run installs it"
    );
    let dir = browser_dir();
    install_packages(&dir);

    let mut cmd = Command::new("node");
    cmd.arg(dir.join("run.mjs"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("WSRELAY_BIN", env!("CARGO_BIN_EXE_wsrelay"));
    let (status, output) = run_bounded(cmd, "node tests/browser/run.mjs", RUN_LIMIT);
    println!("{output}");
    assert!(
        status.success(),
        "browser tests failed ({status}):\n{output}"
    );
    assert!(
        output.lines().any(|l| l.ends_with(" passed, 0 failed")),
        "the browser runner did not report its result:\n{output}"
    );
}
