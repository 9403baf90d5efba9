//! The `edgecache` daemon: read `.env`, the environment and the command line, start logging,
//! bind, run until SIGTERM/SIGINT. Everything else lives in the library.

use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};
use edgecache::config::{Config, LogFormat, SETTINGS};
use tracing_subscriber::EnvFilter;

/// mimalloc rather than glibc malloc: memory from a burst of connections goes back to the OS
/// when they close, and small allocations on the hit path are cheaper (see `edgecache::alloc`).
#[global_allocator]
static GLOBAL: edgecache::alloc::Allocator = edgecache::alloc::Allocator;

fn main() -> ExitCode {
    edgecache::alloc::tune();
    // `.env` fills in what the real environment does not set; real variables win. It is read
    // before the command line, whose settings fall back to the environment; a broken `.env`
    // is reported after the command line is parsed, so `--help` and `--version` still work.
    let dotenv = match dotenvy::dotenv() {
        Ok(_) => Ok(()),
        Err(e) if e.not_found() => Ok(()),
        Err(e) => Err(e),
    };
    // `--help`, `--version` and usage errors (unknown flags: exit 2) end here.
    let args = command().get_matches();
    if let Err(e) = dotenv {
        eprintln!(
            "edgecache: invalid configuration: .env: {}",
            dotenv_problem(&e)
        );
        return ExitCode::from(2);
    }
    // A flag's value, else the environment's (clap reads it), else unset: validated alike.
    // Names outside the table (the old `ADMIN_LISTEN_ADDR`) come from the environment only.
    let lookup = |name: &str| {
        if SETTINGS.iter().any(|s| s.name == name) {
            setting_value(&args, name)
        } else {
            std::env::var(name).ok()
        }
    };
    let config = match Config::from_lookup(lookup) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edgecache: {e}");
            return ExitCode::from(2);
        }
    };
    // ROUTES_FILE: read and checked here, before anything starts (and by --check); its
    // `${VAR}`s come from the environment, as on a SIGHUP reload.
    let routes = match &config.routes_file {
        None => None,
        Some(path) => match edgecache::routes::Routes::load(path, lookup) {
            Ok(routes) => Some(routes),
            Err(e) => {
                eprintln!("edgecache: invalid configuration: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let log_filter = lookup("RUST_LOG").filter(|v| !v.trim().is_empty());
    if args.get_flag("check") {
        for (name, value) in config.effective() {
            println!("{name}={value}");
            if name == "LOG_FORMAT" {
                println!("RUST_LOG={}", log_filter.as_deref().unwrap_or("info"));
            }
        }
        println!("configuration ok");
        return ExitCode::SUCCESS;
    }
    init_logging(config.log_format, log_filter.as_deref());

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
        // mimalloc returns freed pages to the OS only when called: keep calling it while idle.
        tokio::spawn(edgecache::alloc::collect_periodically(
            edgecache::alloc::COLLECT_EVERY,
        ));
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
        // The bound addresses, with the real port when the setting asked for port 0.
        let addr = listener
            .local_addr()
            .map_or_else(|_| config.listen_addr.to_string(), |a| a.to_string());
        let ops_listen = match (&ops, config.ops_listen_addr) {
            (Some(l), Some(configured)) => l
                .local_addr()
                .map_or_else(|_| configured.to_string(), |a| a.to_string()),
            _ => "off".to_owned(),
        };
        tracing::info!(
            listen = %addr,
            ops_listen = %ops_listen,
            backends = config.backends.len(),
            upstream = %config.backends.iter().map(|b| b.url.authority.as_str()).collect::<Vec<_>>().join(","),
            default_ttl_secs = config.default_ttl.map_or(0.0, |d| d.as_secs_f64()),
            refresh_window_secs = config.refresh_window.as_secs_f64(),
            admin = config.admin_key.is_some(),
            "edgecache listening"
        );
        // The same on stdout, in one fixed line whatever RUST_LOG and LOG_FORMAT say, for
        // whoever started the daemon with port 0 (the tests, a supervisor script), as
        // mock-origin does.
        announce(&addr, &ops_listen);
        match edgecache::run(listener, ops, config, routes, shutdown_signal(signals)).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("edgecache: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Prints `edgecache listening on http://ADDR (operator: http://ADDR)` (`operator: off` when
/// `OPS_LISTEN_ADDR=off`) and flushes it. A closed stdout is no reason to stop.
fn announce(addr: &str, ops_listen: &str) {
    use std::io::Write as _;
    let operator = if ops_listen == "off" {
        "off".to_owned()
    } else {
        format!("http://{ops_listen}")
    };
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(
        stdout,
        "edgecache listening on http://{addr} (operator: {operator})"
    )
    .and_then(|()| stdout.flush());
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

/// The command line: `--check`, and one flag per setting of [`SETTINGS`], the lower-kebab
/// form of its variable (`--req-timeout` for `REQ_TIMEOUT`), falling back to the variable.
fn command() -> Command {
    let mut cmd = Command::new("edgecache")
        .version(env!("CARGO_PKG_VERSION"))
        .about("A caching reverse proxy: single-flight misses, background refresh of hot keys, edge ETag/304, password-guarded purge.")
        .after_help(
            "Every setting is a flag and an environment variable of the name shown; `.env` in \
             the working directory fills in variables the environment does not set. A flag wins \
             over both. An invalid value stops the daemon with one line naming the variable \
             (exit 2). The README's settings table has the details.",
        )
        .arg(
            Arg::new("check")
                .long("check")
                .action(ArgAction::SetTrue)
                .help("Validate the configuration, print the effective settings (secrets redacted) and exit: 0 if it is valid, 2 with the error"),
        );
    for setting in SETTINGS {
        let mut arg = Arg::new(setting.name)
            .long(setting.flag())
            .value_name("VALUE")
            // `--req-timeout -1` reaches the validation (and its error naming REQ_TIMEOUT).
            .allow_hyphen_values(true)
            .env(setting.name)
            // `--help` must not print the environment's values: CLEAR_CACHE_KEY is a secret.
            .hide_env_values(true)
            .help(setting.help);
        if !setting.default.is_empty() {
            arg = arg.default_value(setting.default);
        }
        cmd = cmd.arg(arg);
    }
    cmd
}

/// A setting's value from the command line or the environment; `None` when only clap's
/// default (shown in `--help`) applies, so that [`Config::from_lookup`] applies its own.
fn setting_value(args: &ArgMatches, name: &str) -> Option<String> {
    match args.value_source(name) {
        Some(ValueSource::CommandLine | ValueSource::EnvVariable) => {
            args.get_one::<String>(name).cloned()
        }
        _ => None,
    }
}

/// `filter` is `RUST_LOG` (flag or environment); unset or invalid, `info`.
fn init_logging(format: LogFormat, filter: Option<&str>) {
    let filter = filter
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}
