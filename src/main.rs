//! The `edgecache` daemon: read `.env` and the environment, start logging, bind, run until
//! SIGTERM/SIGINT. Everything else lives in the library.

use std::process::ExitCode;

use edgecache::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

/// mimalloc rather than glibc malloc: memory from a burst of connections goes back to the OS
/// when they close, and small allocations on the hit path are cheaper.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // `.env` fills in what the real environment does not set; real variables win.
    match dotenvy::dotenv() {
        Ok(_) => {}
        Err(e) if e.not_found() => {}
        Err(e) => {
            eprintln!(
                "edgecache: invalid configuration: .env: {}",
                dotenv_problem(&e)
            );
            return ExitCode::from(2);
        }
    }
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edgecache: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(config.log_format);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edgecache: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        // Before binding: without handlers, SIGTERM would kill the process mid-request
        // instead of draining, so refuse to start rather than run without them.
        let signals = match Signals::install() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot install the SIGTERM/SIGINT handlers");
                eprintln!("edgecache: cannot install the SIGTERM/SIGINT handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        let listener = match tokio::net::TcpListener::bind(config.listen_addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!(
                    "edgecache: invalid configuration: LISTEN_ADDR: cannot listen on {}: {e}",
                    config.listen_addr
                );
                return ExitCode::from(2);
            }
        };
        let ops = match config.ops_listen_addr {
            None => None,
            Some(addr) => match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => Some(l),
                Err(e) => {
                    eprintln!("edgecache: invalid configuration: OPS_LISTEN_ADDR: cannot listen on {addr}: {e}");
                    return ExitCode::from(2);
                }
            },
        };
        let addr = listener
            .local_addr()
            .map_or_else(|_| config.listen_addr.to_string(), |a| a.to_string());
        tracing::info!(
            listen = %addr,
            backends = config.backends.len(),
            upstream = %config.backends.iter().map(|b| b.url.authority.as_str()).collect::<Vec<_>>().join(","),
            default_ttl_secs = config.default_ttl.map_or(0.0, |d| d.as_secs_f64()),
            refresh_window_secs = config.refresh_window.as_secs_f64(),
            admin = config.admin_key.is_some(),
            "edgecache listening"
        );
        edgecache::run(listener, ops, config, shutdown_signal(signals)).await;
        ExitCode::SUCCESS
    })
}

/// What is wrong with `.env`, in one line that never quotes the file: dotenvy's own message
/// for a line it cannot parse includes the line, and the rest of the file after an unclosed
/// quote, secrets and all.
fn dotenv_problem(e: &dotenvy::Error) -> String {
    match e {
        dotenvy::Error::LineParse(line, _) => {
            let name = line
                .split_once('=')
                .map(|(k, _)| k.trim().trim_start_matches("export ").trim())
                .filter(|k| !k.is_empty())
                .filter(|k| k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
            match name {
                Some(name) => format!(
                    "cannot parse the line setting {name} (unclosed quote? the value is not shown)"
                ),
                None => "cannot parse a line (a value with spaces needs quotes; the line is not \
                         shown)"
                    .into(),
            }
        }
        other => other.to_string().replace(['\n', '\r'], " "),
    }
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits at once. The signal handlers
/// are installed once, up front, so a second signal arriving right after the first is not
/// lost.
async fn shutdown_signal(mut signals: Signals) {
    signals.recv().await;
    tokio::spawn(async move {
        signals.recv().await;
        eprintln!("edgecache: second signal, exiting now");
        std::process::exit(130);
    });
}

/// SIGTERM and SIGINT (Ctrl-C elsewhere).
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs both handlers; fails if either cannot be installed.
    fn install() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Signals {})
        }
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => {}
                _ = self.int.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}
