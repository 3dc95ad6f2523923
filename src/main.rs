//! The `hubbub` binary: parse arguments, set up logging, call the library.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use hubbub::config::{Cli, Command, Config, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // clap prints its own message and exits with 2 on a bad flag.
    let cli = Cli::parse();
    let env: HashMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("HUBBUB_"))
        .collect();
    // The health check only needs to find the HTTP listener; see `resolve_keys`.
    let resolve = match cli.command {
        Some(Command::Healthcheck) => Config::resolve_keys,
        None => Config::resolve,
    };
    let config = match resolve(&cli.settings, &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hubbub: configuration error: {e}");
            return ExitCode::from(2);
        }
    };

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Workers going idle hand back what the allocator cached for them
        // when rooms have ended (see `hubbub::memory`).
        .on_thread_park(hubbub::memory::on_park)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hubbub: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };

    if let Some(Command::Healthcheck) = cli.command {
        return match runtime.block_on(hubbub::healthcheck::check(&config, Duration::from_secs(3))) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("hubbub healthcheck: {e}");
                ExitCode::FAILURE
            }
        };
    }

    init_logging(config.log_format);
    runtime.block_on(async {
        let server = match hubbub::Server::bind(config).await {
            Ok(s) => s,
            // A certificate or key that cannot be used is a configuration
            // error like any other.
            Err(e @ hubbub::Error::Tls(_)) => {
                eprintln!("hubbub: configuration error: {e}");
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!("hubbub: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(tls) = server.tls() {
            hubbub::shutdown::reload_on_sighup(tls);
        }
        let shutdown = hubbub::shutdown::Signals::install().shutdown();
        match server.run(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("hubbub: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Logs go to stdout; `RUST_LOG` picks the level (default `info`).
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
