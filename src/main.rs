//! The `guestd` binary: `run` (the daemon), `emulator` (the Genesys guest chat emulator) and
//! `demo` (scripted chats against the embedded emulator).

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use guestd::config::Config;
use guestd::emulator::{Emulator, EmulatorConfig};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Exit status when guestd stopped with events it could not deliver (EX_TEMPFAIL): the journal
/// keeps every undelivered `ended`, and the next start writes it.
const EXIT_UNDELIVERED: i32 = 75;

#[derive(Parser)]
#[command(
    name = "guestd",
    version,
    about = "Supervises Genesys Cloud guest chat sessions and reports when and why each ends."
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Pretty, env = "GUESTD_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log filter: a level (error, warn, info, debug, trace) or target=level directives
    /// ("info,guestd=debug"). Wins over `[log] level` and RUST_LOG; a word that is neither is
    /// refused.
    #[arg(long, global = true, env = "GUESTD_LOG_LEVEL")]
    log_level: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon: commands on stdin and HTTP, events as JSON lines on stdout.
    Run {
        /// Configuration file (TOML); defaults apply without one. Keys can be overridden with
        /// GUESTD_<SECTION>__<KEY> environment variables.
        #[arg(long, short, env = "GUESTD_CONFIG")]
        config: Option<PathBuf>,
        /// Leave every chat on SIGTERM/SIGINT instead of keeping it for the next start.
        #[arg(long)]
        leave_on_shutdown: bool,
    },
    /// Serve the guest chat emulator (REST + websocket + /emulator admin API).
    Emulator {
        /// Address to listen on; repeat to serve on several (eventStreamUri rotates over them).
        #[arg(long, default_values_t = vec![SocketAddr::from(([127, 0, 0, 1], 8780))])]
        listen: Vec<SocketAddr>,
        /// Emulator settings (TOML, keys of EmulatorConfig; see docs/emulator.md).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run scripted chats against the embedded emulator, one per end reason, and print a summary.
    Demo {
        /// Print every event line, not only the summary.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        events: bool,
    },
    /// Is a conversation still alive? Asks the running guestd's HTTP API (which answers from its
    /// own view, the Platform API or the guest API), else the Platform API or guest API directly.
    /// Prints the status as JSON; exits 0 when it was answered.
    Status {
        /// The conversation id.
        conversation_id: String,
        /// Configuration file (for the HTTP API's address and token, and `[platform]`).
        #[arg(long, short, env = "GUESTD_CONFIG")]
        config: Option<PathBuf>,
        /// Name of an environment variable holding the chat's jwt (never a flag: flags show in
        /// process lists).
        #[arg(long)]
        jwt_env: Option<String>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print guestd's man page (roff) to stdout: `guestd man | man -l -`.
    Man,
    /// Check a configuration file: print the effective configuration (secrets `<redacted>`)
    /// and which commands it can serve.
    CheckConfig {
        /// Configuration file.
        #[arg(long, short, env = "GUESTD_CONFIG")]
        config: Option<PathBuf>,
        /// The file is an emulator configuration (`guestd emulator --config`).
        #[arg(long)]
        emulator: bool,
    },
}

/// Ask a running guestd over its HTTP API; None when none answers at `control.http_listen`.
async fn status_via_daemon(
    cfg: &Config,
    conversation_id: &str,
    jwt: Option<&str>,
) -> anyhow::Result<Option<(bool, String)>> {
    if cfg.control.http_listen.is_empty() {
        return Ok(None);
    }
    let url = format!(
        "http://{}/v1/conversations/{conversation_id}/status",
        cfg.control.http_listen
    );
    let mut req = reqwest::Client::new().get(url);
    if let Some(token) = cfg.control.bearer_token().map_err(anyhow::Error::msg)? {
        req = req.bearer_auth(token.expose());
    }
    if let Some(jwt) = jwt {
        req = req.header("x-guest-chat-jwt", jwt);
    }
    match req.send().await {
        Ok(r) => {
            let ok = r.status().is_success();
            Ok(Some((ok, r.text().await.unwrap_or_default())))
        }
        Err(e) if e.is_connect() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// An emulator configuration file, or the defaults.
fn load_emulator_config(path: Option<PathBuf>) -> anyhow::Result<EmulatorConfig> {
    Ok(match path {
        Some(p) => {
            let text =
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
        }
        None => EmulatorConfig::default(),
    })
}

/// The log filter in force, replaceable on SIGHUP (unless `--log-level` fixed it).
struct Logs {
    handle: tracing_subscriber::reload::Handle<
        tracing_subscriber::EnvFilter,
        tracing_subscriber::Registry,
    >,
    flag: Option<String>,
    spec: String,
}

impl Logs {
    /// Install `configured` (`[log] level`) unless the flag fixes the filter; whether the filter
    /// changed.
    fn set(&mut self, configured: &str) -> Result<bool, String> {
        let rust_log = std::env::var("RUST_LOG").ok();
        let (from, spec) =
            guestd::logging::choose(self.flag.as_deref(), configured, rust_log.as_deref());
        if spec == self.spec {
            return Ok(false);
        }
        let filter = guestd::logging::parse_filter(from, &spec).map_err(|e| e.to_string())?;
        self.handle.reload(filter).map_err(|e| e.to_string())?;
        self.spec = spec;
        Ok(true)
    }
}

fn init_logs(format: LogFormat, flag: Option<String>) -> anyhow::Result<Logs> {
    use tracing_subscriber::prelude::*;
    let rust_log = std::env::var("RUST_LOG").ok();
    let (from, spec) = guestd::logging::choose(flag.as_deref(), "", rust_log.as_deref());
    let filter = guestd::logging::parse_filter(from, &spec)?;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Json => registry.with(fmt.json().with_current_span(true)).init(),
        LogFormat::Pretty => registry.with(fmt.with_ansi(false)).init(),
    }
    Ok(Logs { handle, flag, spec })
}

/// SIGTERM and SIGINT handlers, installed when this is created (before any work starts, so a
/// signal that arrives early is not the default action that kills the process mid-write).
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    /// SIGHUP (`run` only): reload. Elsewhere it keeps its default action.
    #[cfg(unix)]
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install(reload: bool) -> anyhow::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Signals {
                term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
                int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
                hup: if reload {
                    Some(signal(SignalKind::hangup()).context("installing the SIGHUP handler")?)
                } else {
                    None
                },
            })
        }
        #[cfg(not(unix))]
        {
            let _ = reload;
            Ok(Signals {})
        }
    }

    /// The next signal: SIGTERM, SIGINT, or (with `install(true)`) SIGHUP.
    async fn wait(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            let hup = async {
                match self.hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
                _ = hup => "SIGHUP",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        // The error and its causes on one line: never a backtrace, whatever RUST_BACKTRACE
        // says (anyhow's Debug adds one; that is for panics, not for a configuration error).
        eprintln!("guestd: error: {e:#}");
        std::process::exit(1);
    }
}

/// The check-config summary: one comment line per command, so stdout stays valid TOML.
fn readiness_lines(cfg: &Config) -> String {
    guestd::backends::readiness(cfg)
        .into_iter()
        .chain(cfg.readiness())
        .map(|r| {
            format!(
                "# {:<30} {:<9} {}\n",
                r.command,
                if r.ready { "ready" } else { "NOT READY" },
                r.detail
            )
        })
        .collect()
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut logs = init_logs(cli.log_format, cli.log_level.clone())?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    // One socket per session: take the whole hard limit of open files (no call at all when the
    // soft limit is already the hard one, as systemd's LimitNOFILE= sets it: the unit's system
    // call filter refuses setrlimit).
    let below_hard = rlimit::Resource::NOFILE
        .get()
        .map(|(soft, hard)| soft < hard)
        .unwrap_or(true);
    if below_hard && let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "could not raise the open-file limit");
    }
    match cli.cmd {
        Cmd::Run {
            config,
            leave_on_shutdown,
        } => {
            let mut signals = Signals::install(true)?;
            let mut cfg = Config::load(config.as_deref()).context("loading configuration")?;
            cfg.shutdown.leave_on_shutdown |= leave_on_shutdown;
            logs.set(&cfg.log.level)
                .map_err(anyhow::Error::msg)
                .context("log filter")?;
            let (version, revision) = guestd::build_info();
            tracing::info!(
                version,
                git_revision = revision,
                config = %config.as_ref().map_or("(none: defaults)".into(), |p| p.display().to_string()),
                journal = %if cfg.cluster.enabled() {
                    "(cluster: the sessions bucket)".to_string()
                } else if cfg.journal.enabled {
                    cfg.journal.path.display().to_string()
                } else {
                    "(off)".to_string()
                },
                events = %cfg.events.path.as_ref().map_or("stdout".into(), |p| p.display().to_string()),
                stdin = %if cfg.control.stdin { "on" } else { "off" },
                http_listen = %if cfg.control.http_listen.is_empty() { "(off)" } else { cfg.control.http_listen.as_str() },
                log_filter = %logs.spec,
                "guestd starting"
            );
            for r in guestd::backends::readiness(&cfg)
                .into_iter()
                .chain(cfg.readiness())
            {
                if r.ready {
                    tracing::info!(command = r.command, detail = %r.detail, "ready");
                } else {
                    tracing::warn!(command = r.command, detail = %r.detail, "not ready");
                }
            }
            let mut reloader = guestd::reload::Reloader::new(cfg.clone());
            let stdin = cfg.control.stdin.then(tokio::io::stdin);
            let running = match cfg.events.path.clone() {
                Some(path) => {
                    let file = guestd::events::open_events_file(&path)
                        .with_context(|| format!("opening the events file {}", path.display()))?;
                    guestd::daemon::start(cfg, guestd::events::StdSink::new(file), stdin).await
                }
                None => {
                    let sink = guestd::events::StdSink::new(std::io::stdout());
                    guestd::daemon::start(cfg, sink, stdin).await
                }
            }
            .context("starting guestd")?;
            // Listening, journal read back, every kept chat held again: ready (Type=notify).
            guestd::sdnotify::notify_or_log("READY=1");
            // SIGHUP reloads and never ends the process; SIGTERM and SIGINT drain.
            // A reload runs beside the signals: one that waits (new platform credentials wait
            // for a token request under way) never holds a SIGTERM back.
            let sig = 'signals: loop {
                match signals.wait().await {
                    "SIGHUP" => {
                        guestd::sdnotify::notify_or_log("RELOADING=1");
                        let reloading = reload(
                            &mut reloader,
                            &running,
                            config.as_deref(),
                            leave_on_shutdown,
                            &mut logs,
                        );
                        tokio::pin!(reloading);
                        loop {
                            tokio::select! {
                                _ = &mut reloading => break,
                                sig = signals.wait() => match sig {
                                    "SIGHUP" => tracing::info!("SIGHUP during a reload: ignored, the reload under way reads the configuration"),
                                    sig => break 'signals sig,
                                },
                            }
                        }
                        guestd::sdnotify::notify_or_log("READY=1");
                    }
                    sig => break sig,
                }
            };
            tracing::info!(signal = sig, "signal received");
            guestd::sdnotify::notify_or_log("STOPPING=1");
            let report = running.shutdown().await;
            tracing::info!(
                sessions = report.sessions,
                drained = report.drained,
                delivered = report.delivered,
                "stopped"
            );
            // Exit now: the runtime would otherwise wait for the blocking thread that reads
            // stdin, which may never see EOF. 75 (EX_TEMPFAIL) when events could not be
            // delivered: the journal holds them for the next start.
            std::process::exit(if report.delivered {
                0
            } else {
                EXIT_UNDELIVERED
            })
        }
        Cmd::Emulator { listen, config } => {
            let mut signals = Signals::install(false)?;
            let cfg = load_emulator_config(config)?;
            for addr in listen.iter().filter(|a| !a.ip().is_loopback()) {
                // Anyone who can reach it can end chats and inject faults: say so.
                tracing::warn!(
                    %addr,
                    "the emulator listens off loopback; its admin API (/emulator/...) has no \
                     authentication: anyone who can reach this address can end chats and inject faults"
                );
            }
            let emu = Emulator::start_multi(cfg, &listen)
                .await
                .with_context(|| format!("listening on {listen:?}"))?;
            eprintln!(
                "guestd emulator on {} (admin API under /emulator/)",
                emu.base_url()
            );
            let sig = signals.wait().await;
            tracing::info!(signal = sig, "signal received");
            emu.shutdown();
            Ok(())
        }
        Cmd::Demo { events } => {
            let ok = guestd::demo::run(events).await?;
            if !ok {
                anyhow::bail!("the demo did not see the expected end reasons");
            }
            Ok(())
        }
        Cmd::Status {
            conversation_id,
            config,
            jwt_env,
        } => {
            let cfg = Config::load(config.as_deref()).context("loading configuration")?;
            let jwt = jwt_env
                .map(|name| std::env::var(&name).with_context(|| format!("reading ${name}")))
                .transpose()?;
            let answer = status_via_daemon(&cfg, &conversation_id, jwt.as_deref()).await?;
            let (ok, body) = match answer {
                Some(a) => a,
                None if let Some(r) = cfg
                    .journal
                    .enabled
                    .then(|| {
                        guestd::journal::remembered_end(
                            &cfg.journal.path,
                            &cfg.status,
                            &conversation_id,
                        )
                    })
                    .flatten() =>
                {
                    // No guestd running: the end it remembered in its journal.
                    let s = guestd::platform::status::ConversationStatus::remembered(r);
                    (true, serde_json::to_string(&s)?)
                }
                None => {
                    // No guestd running: ask the platform (or the guest API) directly.
                    let roots = cfg.genesys.extra_roots().map_err(anyhow::Error::msg)?;
                    let platform = guestd::daemon::platform_api(&cfg, &roots)?;
                    let backends = guestd::backends::registry(&cfg, &roots, None)?;
                    match guestd::platform::status::status_from(
                        None,
                        platform.as_ref(),
                        &backends,
                        &conversation_id,
                        jwt.map(guestd::secret::Secret::new),
                    )
                    .await
                    {
                        Ok(s) => (true, serde_json::to_string(&s)?),
                        Err(e) => (
                            false,
                            serde_json::json!({"error": e.to_string(), "code": guestd::supervisor::SupervisorError::from(e).code()})
                                .to_string(),
                        ),
                    }
                }
            };
            println!("{body}");
            if ok { Ok(()) } else { std::process::exit(1) }
        }
        Cmd::CheckConfig {
            config,
            emulator: true,
        } => {
            let cfg = load_emulator_config(config)?;
            println!(
                "{}",
                toml::to_string_pretty(&cfg).context("printing configuration")?
            );
            Ok(())
        }
        Cmd::CheckConfig { config, .. } => {
            let cfg = Config::load(config.as_deref()).context("loading configuration")?;
            println!(
                "{}",
                cfg.to_redacted_toml().context("printing configuration")?
            );
            print!(
                "# What this configuration can serve:\n{}",
                readiness_lines(&cfg)
            );
            Ok(())
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "guestd", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Man => {
            clap_mangen::Man::new(Cli::command())
                .render(&mut std::io::stdout())
                .context("writing the man page")?;
            Ok(())
        }
    }
}

/// SIGHUP: load and validate the configuration again, apply what can change in place, name what
/// needs a restart. A configuration that does not load is refused and the running one kept.
async fn reload(
    reloader: &mut guestd::reload::Reloader,
    running: &guestd::daemon::Running,
    path: Option<&std::path::Path>,
    leave_on_shutdown: bool,
    logs: &mut Logs,
) {
    tracing::info!(signal = "SIGHUP", "reloading the configuration");
    let mut new = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "reload refused: the configuration does not load; the running one is kept");
            return;
        }
    };
    new.shutdown.leave_on_shutdown |= leave_on_shutdown;
    match reloader.apply(running, new, |level| logs.set(level)).await {
        Ok(r) => tracing::info!(
            applied = %if r.applied.is_empty() { "nothing changed".into() } else { r.applied.join(", ") },
            needs_restart = %if r.needs_restart.is_empty() { "nothing".into() } else { r.needs_restart.join(", ") },
            "reloaded"
        ),
        Err(e) => tracing::error!(error = %e, "reload refused; the running configuration is kept"),
    }
}
