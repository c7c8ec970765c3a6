//! The `wsrelay` command: read the configuration, bind, serve until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use wsrelay::config::Config;

const USAGE: &str = "\
usage: wsrelay [--config PATH] [--check-config]

  --config PATH    read settings from a TOML file (environment WSRELAY__* still wins)
  --check-config   validate the configuration, print a summary and exit
  --help           show this help
  --version        show the version

Without a redis.url the gateway runs on its embedded in-memory broker.
Logging: RUST_LOG (default: info).";

struct Args {
    config: Option<PathBuf>,
    check_only: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        config: None,
        check_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--config" => args.config = Some(it.next().ok_or("--config needs a path")?.into()),
            "--check-config" => args.check_only = true,
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--version" | "-V" => {
                println!("wsrelay {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("wsrelay: {e}");
            return ExitCode::from(2);
        }
    };
    let config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wsrelay: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("wsrelay: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.check_only {
        // Building the gateway checks what the settings alone cannot (files, URLs); then
        // the identity source's stores are read and described.
        let found = match runtime.block_on(wsrelay::check(&config)) {
            Ok(found) => found,
            Err(e) => {
                eprintln!("wsrelay: configuration error: {e}");
                return ExitCode::from(2);
            }
        };
        println!("configuration ok: {}", config.summary());
        for line in found {
            println!("{line}");
        }
        return ExitCode::SUCCESS;
    }
    if let Some(limit) = wsrelay::raise_descriptor_limit() {
        log::debug!("open-files limit: {limit}");
    }
    let listener = match wsrelay::bind(config.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("wsrelay: cannot listen on {}: {e}", config.listen);
            return ExitCode::FAILURE;
        }
    };
    let served = runtime.block_on(wsrelay::run(config, listener, wsrelay::shutdown::signal()));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsrelay: {e}");
            ExitCode::FAILURE
        }
    }
}
