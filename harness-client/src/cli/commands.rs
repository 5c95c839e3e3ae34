//! What each command does.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use harness_client::daemon::{connect, ensure_daemon};
use harness_client::{Client, ClientError};
use protocol::config;
use protocol::events::EventKind;
use protocol::methods::{self as m, names};
use protocol::ServerMessage;
use serde_json::json;

use super::config_file::{self, require_stack};
use super::output;
use super::{Cli, Cmd, ConfigCmd, DaemonCmd, GlobalOpts, MeshCmd, NetworkCmd, PackageCmd};

const CLIENT: &str = "harness-cli";

fn state_dir(opts: &GlobalOpts) -> PathBuf {
    opts.state_dir
        .clone()
        .unwrap_or_else(|| protocol::state_dir_from_env(&|k| std::env::var(k).ok()).0)
}

async fn client(opts: &GlobalOpts) -> anyhow::Result<Client> {
    Ok(connect(&state_dir(opts), CLIENT).await?)
}

/// Runs a command; the exit code tells success.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let g = &cli.global;
    match cli.cmd {
        Cmd::Init => init(),
        Cmd::Validate => validate(g),
        Cmd::Ui => ui(g).await,
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut super::Cli::command(), "harness", &mut script);
            match std::io::stdout().write_all(&script) {
                // `harness completions bash | head` is not a failure.
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(ExitCode::SUCCESS),
            }
        }
        Cmd::Man { dir } => {
            use clap::CommandFactory;
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(super::Cli::command(), &dir)
                .with_context(|| format!("cannot write man pages to {}", dir.display()))?;
            eprintln!("wrote man pages to {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Import {
            compose_file,
            output,
        } => import(&compose_file, output.as_deref()),
        Cmd::Up { services } => up(g, Bring::Up(services)).await,
        Cmd::Deploy {
            services,
            hosts,
            max_concurrent,
            dry_run: false,
        } => {
            up(
                g,
                Bring::Deploy {
                    services,
                    hosts,
                    max_concurrent,
                },
            )
            .await
        }
        Cmd::Deploy {
            services, hosts, ..
        } => deploy_dry_run(g, services, hosts).await,
        Cmd::Down { services, purge } => {
            let stack = require_stack(g)?;
            let c = client(g).await?;
            let r: m::ServicesResult = c
                .call(
                    names::SERVICE_REMOVE,
                    m::ServicesParams {
                        stack: stack.clone(),
                        names: services,
                        purge,
                    },
                )
                .await?;
            eprintln!("stopped {} service(s) of {stack}", r.services.len());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Start { services } => {
            services_call(g, names::SERVICE_START, services, "started").await
        }
        Cmd::Stop { services } => services_call(g, names::SERVICE_STOP, services, "stopped").await,
        Cmd::Restart { services } => {
            services_call(g, names::SERVICE_RESTART, services, "restarted").await
        }
        Cmd::Rm { services } => services_call(g, names::SERVICE_REMOVE, services, "removed").await,
        Cmd::Ps => ps(g).await,
        Cmd::Logs {
            service,
            follow,
            tail,
        } => logs(g, service, follow, tail).await,
        Cmd::Exec { service, command } => exec(g, service, command).await,
        Cmd::Health { services } => health(g, services).await,
        Cmd::Events { since, topic } => events(g, since, topic).await,
        Cmd::Config(c) => config_cmd(g, c).await,
        Cmd::Package(PackageCmd::Build { dir, output_dir }) => {
            package_build(g, &dir, output_dir.as_deref()).await
        }
        Cmd::Daemon(d) => daemon_cmd(g, d).await,
        Cmd::Discover(args) => discover(g, *args).await,
        Cmd::Network(n) => network(g, n).await,
        Cmd::Mesh(MeshCmd::Peers) => mesh_peers(g).await,
        Cmd::Mesh(MeshCmd::Revoke { node }) => {
            let stack = require_stack(g)?;
            let c = client(g).await?;
            let r: m::ServicesResult = c
                .call(
                    names::MESH_REVOKE,
                    m::MeshRevokeParams {
                        stack: stack.clone(),
                        node: node.clone(),
                    },
                )
                .await?;
            eprintln!(
                "revoked {node}: its peer is gone; stopped {}",
                r.services.join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn network(g: &GlobalOpts, cmd: NetworkCmd) -> anyhow::Result<ExitCode> {
    let stack = require_stack(g)?;
    let c = client(g).await?;
    let params = m::StackParams { stack };
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
    match cmd {
        NetworkCmd::List => {
            let list: Vec<m::NetworkInfo> = c.call(names::NETWORK_LIST, params).await?;
            if g.json {
                output::json(&list);
                return Ok(ExitCode::SUCCESS);
            }
            let mut t = output::table(&["KIND", "NAME", "DETAIL", "SERVICES"]);
            for n in &list {
                t.add_row(vec![
                    n.kind.clone(),
                    n.name.clone(),
                    n.detail.clone(),
                    n.services.join(", "),
                ]);
            }
            println!("{t}");
        }
        NetworkCmd::Show => {
            let rows: Vec<m::AddressRow> = c.call(names::NETWORK_SHOW, params).await?;
            if g.json {
                output::json(&rows);
                return Ok(ExitCode::SUCCESS);
            }
            let mut t = output::table(&[
                "SERVICE",
                "RUNS ON",
                "FROM HOST",
                "FROM CONTAINER",
                "FROM LAN",
                "FROM MESH",
            ]);
            for r in &rows {
                t.add_row(vec![
                    r.name.clone(),
                    r.runs_on.clone(),
                    dash(&r.from_host),
                    dash(&r.from_container),
                    dash(&r.from_lan),
                    dash(&r.from_mesh),
                ]);
            }
            println!("{t}");
        }
        NetworkCmd::Test => {
            let checks: Vec<m::ReachCheck> = c.call(names::NETWORK_TEST, params).await?;
            let all_ok = checks.iter().all(|r| r.ok);
            if g.json {
                output::json(&checks);
            } else {
                let mut t = output::table(&["FROM", "TO", "ADDRESS", "RESULT"]);
                for r in &checks {
                    let result = if r.ok {
                        "ok".to_owned()
                    } else {
                        format!("FAILED: {}", r.detail)
                    };
                    t.add_row(vec![
                        r.from.clone(),
                        r.to.clone(),
                        r.address.clone(),
                        result,
                    ]);
                }
                println!("{t}");
            }
            if !all_ok {
                return Ok(super::failure());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn mesh_peers(g: &GlobalOpts) -> anyhow::Result<ExitCode> {
    let stack = config_file::current_stack(g)?;
    let c = client(g).await?;
    let peers: Vec<m::MeshPeer> = c.call(names::MESH_PEERS, m::ListParams { stack }).await?;
    if g.json {
        output::json(&peers);
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = output::table(&[
        "NODE",
        "SERVICE",
        "MESH ADDRESS",
        "ENDPOINT",
        "HANDSHAKE",
        "SENT",
        "RECEIVED",
    ]);
    for p in &peers {
        t.add_row(vec![
            p.node.clone(),
            format!("{}/{}", p.stack, p.name),
            p.mesh_ip.clone(),
            p.endpoint.clone().unwrap_or_default(),
            p.handshake_age_secs
                .map_or_else(|| "never".to_owned(), |s| format!("{s} s ago")),
            p.tx_bytes.to_string(),
            p.rx_bytes.to_string(),
        ]);
    }
    if peers.is_empty() {
        eprintln!("no mesh peers (no service with a wireguard target runs)");
    } else {
        println!("{t}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn discover(g: &GlobalOpts, args: super::DiscoverArgs) -> anyhow::Result<ExitCode> {
    let from_flags = config::DiscoveryOptions {
        strategies: args.strategies,
        ranges: args.ranges,
        tcp_ports: args.tcp_ports,
        http_ports: args.http_ports,
        tcp_timeout_ms: args.tcp_timeout_ms,
        http_timeout_ms: args.http_timeout_ms,
        concurrency: args.concurrency,
        probe_all: args.probe_all,
        dns_servers: args.dns_servers,
        srv_names: args.srv_names,
        mdns_interfaces: args.mdns_interfaces,
        mdns_types: args.mdns_types,
        mdns_wait_ms: args.mdns_wait_ms,
    };
    // Flags and DISCOVERY_* variables first, then the config's `discovery:` section.
    let options = match config_file::find(g) {
        Some(_) => from_flags.or(&config_file::load(g)?.config.discovery),
        None => from_flags,
    };
    let c = ensure_daemon(&state_dir(g), CLIENT, |m| eprintln!("{m}")).await?;
    let params = m::DiscoverParams {
        options,
        refresh: args.refresh,
    };
    let found: m::DiscoverResult = c.call(names::DISCOVER, params).await?;
    if let Some(path) = &args.save {
        std::fs::write(path, output::discovered_yaml(&found.services))
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!(
            "saved {} service(s) to {}",
            found.services.len(),
            path.display()
        );
    }
    if g.json {
        output::json(&found);
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = output::table(&["KIND", "ADDRESS", "FOUND BY", "DETAIL"]);
    for s in &found.services {
        t.add_row(vec![
            s.kind.clone(),
            s.address.clone(),
            s.found_by.clone(),
            s.detail.clone().unwrap_or_default(),
        ]);
    }
    if !found.services.is_empty() {
        println!("{t}");
    }
    for note in &found.notes {
        eprintln!("note: {note}");
    }
    eprintln!(
        "{} service(s); {} address(es), {} connect(s) in {} ms{}",
        found.services.len(),
        found.addresses,
        found.probes,
        found.elapsed_ms,
        if found.cached {
            " (cached: --refresh looks again)"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn init() -> anyhow::Result<ExitCode> {
    let path = PathBuf::from("harness.yaml");
    if path.exists() {
        bail!("harness.yaml already exists here; edit it, or remove it first");
    }
    std::fs::write(&path, config_file::TEMPLATE).context("cannot write harness.yaml")?;
    eprintln!("wrote harness.yaml; start it with `harness up`");
    Ok(ExitCode::SUCCESS)
}

async fn ui(g: &GlobalOpts) -> anyhow::Result<ExitCode> {
    let c = client(g).await?;
    let login: m::UiLoginResult = c.call(names::UI_LOGIN, json!({})).await?;
    if g.json {
        output::json(&login);
        return Ok(ExitCode::SUCCESS);
    }
    let ca = harness_client::read_daemon_file(&state_dir(g))
        .map(|d| d.ca.display().to_string())
        .unwrap_or_else(|_| "ca.pem in the daemon's state directory".to_owned());
    println!("{}", login.url);
    eprintln!(
        "Open that link within {} s; it works once (the page keeps a session until harnessd stops).\n\
         Your browser must trust the daemon's own CA, {ca}:\n  \
         Chromium/Chrome on Linux: certutil -d sql:$HOME/.pki/nssdb -A -t C,, -n harness -i {ca}\n  \
         Firefox: Settings > Privacy & Security > Certificates > View Certificates > Authorities > Import",
        login.expires_in_secs
    );
    Ok(ExitCode::SUCCESS)
}

fn import(compose_file: &Path, output: Option<&Path>) -> anyhow::Result<ExitCode> {
    let imported = config_file::import(compose_file)?;
    match output {
        Some(path) => {
            if path.exists() {
                bail!(
                    "{} already exists; remove it or pick another -o",
                    path.display()
                );
            }
            std::fs::write(path, &imported.yaml)
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
        None => print!("{}", imported.yaml),
    }
    Ok(ExitCode::SUCCESS)
}

fn validate(g: &GlobalOpts) -> anyhow::Result<ExitCode> {
    let loaded = config_file::load(g)?;
    let order = config::start_order(&loaded.config);
    if g.json {
        output::json(&json!({"stack": loaded.stack, "file": loaded.path, "start_order": order}));
    } else {
        println!(
            "{}: ok, stack {}, {} services; start order: {}",
            loaded.path.display(),
            loaded.stack,
            order.len(),
            order.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `package build`: the daemon makes the package (it checks it as it would before a
/// deploy), so the CLI stays thin.
async fn package_build(
    g: &GlobalOpts,
    dir: &Path,
    output_dir: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let absolute = |p: &Path| -> anyhow::Result<String> {
        Ok(std::path::absolute(p)
            .with_context(|| format!("{}", p.display()))?
            .display()
            .to_string())
    };
    let params = m::PackageBuildParams {
        dir: absolute(dir)?,
        out_dir: output_dir.map(absolute).transpose()?,
    };
    let c = ensure_daemon(&state_dir(g), CLIENT, |m| eprintln!("{m}")).await?;
    let info: m::PackageInfo = c.call(names::PACKAGE_BUILD, params).await?;
    if g.json {
        output::json(&info);
    } else {
        println!(
            "{} ({} {}, {} bytes, sha256 {})",
            info.path, info.name, info.version, info.bytes, info.sha256
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// What `up` and `deploy` start once the config is applied.
enum Bring {
    /// `up`: these services (all when empty) and their dependencies.
    Up(Vec<String>),
    /// `deploy`: the services on SSH hosts.
    Deploy {
        services: Vec<String>,
        hosts: Vec<String>,
        max_concurrent: Option<usize>,
    },
}

/// `deploy --dry-run`: the plan for the config file as it is; nothing is applied.
async fn deploy_dry_run(
    g: &GlobalOpts,
    services: Vec<String>,
    hosts: Vec<String>,
) -> anyhow::Result<ExitCode> {
    let loaded = config_file::load(g)?;
    let c = ensure_daemon(&state_dir(g), CLIENT, |m| eprintln!("{m}")).await?;
    let r: m::DeployResult = c
        .call(
            names::DEPLOY,
            m::DeployParams {
                stack: loaded.stack.clone(),
                names: services,
                hosts,
                max_concurrent: None,
                dry_run: true,
                config: Some(loaded.config),
            },
        )
        .await?;
    if g.json {
        output::json(&r);
        return Ok(ExitCode::SUCCESS);
    }
    for (i, s) in r.plan.iter().enumerate() {
        println!("{:>3}. {} on {}: {}", i + 1, s.service, s.host, s.step);
        if let Some(cmd) = &s.command {
            for line in cmd.lines() {
                println!("       $ {line}");
            }
        }
    }
    println!("dry run: nothing was run ({} service(s))", r.services.len());
    Ok(ExitCode::SUCCESS)
}

/// `up` (and `deploy`): apply the config, start, show progress, wait for health; on
/// failure print the reason and the last log lines of each failed service.
async fn up(g: &GlobalOpts, bring: Bring) -> anyhow::Result<ExitCode> {
    // The daemon is dialled (TLS, hello) on the executor's thread while this one
    // parses the config: each takes milliseconds. None is started before the config
    // is known to be good.
    let state = state_dir(g);
    let dialling = smol::spawn({
        let state = state.clone();
        async move { connect(&state, CLIENT).await }
    });
    let loaded = config_file::load(g)?;
    let c = match dialling.await {
        Ok(c) => c,
        Err(_) => ensure_daemon(&state, CLIENT, |m| eprintln!("{m}")).await?,
    };
    let stack = loaded.stack.clone();
    let _: m::SubscribeResult = c
        .call(
            names::SUBSCRIBE,
            m::SubscribeParams {
                topics: vec!["service".into(), "deploy".into()],
                stack: Some(stack.clone()),
                since: None,
            },
        )
        .await?;
    let applied: m::ApplyResult = c
        .call(
            names::CONFIG_APPLY,
            m::ApplyParams {
                stack: stack.clone(),
                config: loaded.config,
                source: Some(loaded.path.display().to_string()),
            },
        )
        .await?;
    if !applied.changed.is_empty() || !applied.removed.is_empty() {
        eprintln!(
            "config of {stack}: changed {:?}, removed {:?}",
            applied.changed, applied.removed
        );
    }
    let events = c.events();
    let progress = smol::spawn(async move {
        while let Ok(e) = events.recv().await {
            let line = match e.kind {
                EventKind::ServiceState(s) => {
                    let reason = s.reason.map(|r| format!(" ({r})")).unwrap_or_default();
                    format!("  {:<20} {:?} -> {:?}{reason}\n", s.name, s.from, s.to)
                }
                EventKind::ServiceHealth(h) => {
                    format!("  {:<20} {:?} ({})\n", h.name, h.status, h.check)
                }
                EventKind::ServiceRestarting(r) => format!(
                    "  {:<20} restarting in {} ms (attempt {})\n",
                    r.name, r.backoff_ms, r.attempt
                ),
                EventKind::ServiceProgress(p) => format!("  {:<20} {}\n", p.name, p.message),
                EventKind::DeployStep(d) => {
                    let detail = d.detail.map(|x| format!(": {x}")).unwrap_or_default();
                    format!(
                        "  {:<20} {} {} {}{detail}\n",
                        d.name, d.host, d.step, d.status
                    )
                }
                EventKind::DeployRollback(r) => {
                    format!("  {:<20} ROLLBACK {}\n", r.name, r.reason)
                }
                _ => continue,
            };
            // One write per line: stderr is unbuffered, and `eprintln!` with padding
            // made a write for every piece of it (about 25 per line).
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    });
    let result: Result<Vec<String>, ClientError> = match bring {
        Bring::Up(services) => c
            .call::<m::ServicesResult>(
                names::SERVICE_START,
                m::ServicesParams {
                    stack: stack.clone(),
                    names: services,
                    purge: false,
                },
            )
            .await
            .map(|r| r.services),
        Bring::Deploy {
            services,
            hosts,
            max_concurrent,
        } => c
            .call::<m::DeployResult>(
                names::DEPLOY,
                m::DeployParams {
                    stack: stack.clone(),
                    names: services,
                    hosts,
                    max_concurrent,
                    dry_run: false,
                    config: None,
                },
            )
            .await
            .map(|r| r.services),
    };
    drop(progress);
    match result {
        Ok(services) => {
            eprintln!("{stack}: {} service(s) up", services.len());
            Ok(ExitCode::SUCCESS)
        }
        Err(ClientError::Daemon(e)) => {
            eprintln!("error: {}", e.message);
            let failed: Vec<String> = e
                .data
                .as_ref()
                .and_then(|d| d.get("failed"))
                .and_then(|f| f.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.get("service")?.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            for name in failed {
                let logs: Result<m::LogsResult, _> = c
                    .call(
                        names::SERVICE_LOGS,
                        m::LogsParams {
                            stack: stack.clone(),
                            name: name.clone(),
                            tail: Some(20),
                            since: None,
                            follow: false,
                        },
                    )
                    .await;
                if let Ok(l) = logs {
                    eprintln!("--- last {} log lines of {name} ---", l.lines.len());
                    for line in l.lines {
                        eprintln!("{}", line.line);
                    }
                }
            }
            Ok(super::failure())
        }
        Err(e) => Err(e.into()),
    }
}

async fn services_call(
    g: &GlobalOpts,
    method: &str,
    services: Vec<String>,
    verb: &str,
) -> anyhow::Result<ExitCode> {
    let stack = require_stack(g)?;
    let c = client(g).await?;
    let r: m::ServicesResult = c
        .call(
            method,
            m::ServicesParams {
                stack: stack.clone(),
                names: services,
                purge: false,
            },
        )
        .await?;
    if g.json {
        output::json(&r);
    } else {
        eprintln!("{verb}: {}", r.services.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

async fn ps(g: &GlobalOpts) -> anyhow::Result<ExitCode> {
    let stack = config_file::current_stack(g)?;
    let c = client(g).await?;
    let list: Vec<m::ServiceInfo> = c
        .call(
            names::SERVICE_LIST,
            m::ListParams {
                stack: stack.clone(),
            },
        )
        .await?;
    if g.json {
        output::json(&list);
    } else {
        println!("{}", output::services_table(&list, stack.is_none()));
    }
    Ok(ExitCode::SUCCESS)
}

fn print_line(l: &m::LogLine, json_out: bool) {
    if json_out {
        println!("{}", serde_json::to_string(l).expect("log lines serialize"));
    } else {
        // `!` marks lines the service wrote to stderr.
        let mark = if l.stream == "stderr" { '!' } else { '|' };
        println!("{} {} {mark} {}", l.time, l.service, l.line);
    }
}

async fn logs(
    g: &GlobalOpts,
    service: String,
    follow: bool,
    tail: usize,
) -> anyhow::Result<ExitCode> {
    let stack = require_stack(g)?;
    let mut c = client(g).await?;
    // Where to resume after a reconnect: the offset after the last line printed.
    let mut since = None;
    loop {
        let params = m::LogsParams {
            stack: stack.clone(),
            name: service.clone(),
            tail: Some(tail),
            since,
            follow,
        };
        let mut stream = match c.start_request(names::SERVICE_LOGS, params).await {
            Ok(s) => s,
            Err(e) if follow && matches!(e, ClientError::Closed) => {
                c = reconnect(g).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        loop {
            match stream.next().await {
                Ok(ServerMessage::Response(r)) => {
                    let result: m::LogsResult = harness_client::decode(r)?;
                    for l in &result.lines {
                        print_line(l, g.json);
                    }
                    since = Some(result.next_offset);
                    if !follow {
                        return Ok(ExitCode::SUCCESS);
                    }
                }
                Ok(ServerMessage::Log(l)) => {
                    print_line(&l.log, g.json);
                    since = Some(l.log.offset + 1);
                }
                Ok(_) => {}
                // The daemon went away (e.g. it restarted): follow on from `since`.
                Err(ClientError::Closed) if follow => break,
                Err(e) => return Err(e.into()),
            }
            let _ = std::io::stdout().flush();
        }
        c = reconnect(g).await;
    }
}

/// Connects again after the daemon went away, waiting for it to come back (a follow
/// outlives daemon restarts); says so once on stderr.
async fn reconnect(g: &GlobalOpts) -> Client {
    eprintln!("lost the connection to harnessd; reconnecting");
    loop {
        if let Ok(c) = client(g).await {
            return c;
        }
        smol::Timer::after(std::time::Duration::from_millis(200)).await;
    }
}

async fn exec(g: &GlobalOpts, service: String, command: Vec<String>) -> anyhow::Result<ExitCode> {
    let stack = require_stack(g)?;
    let c = client(g).await?;
    let mut stream = c
        .start_request(
            names::SERVICE_EXEC,
            m::ExecParams {
                stack,
                name: service,
                command,
            },
        )
        .await?;
    loop {
        match stream.next().await? {
            ServerMessage::Output(o) => {
                if o.output.stream == "stderr" {
                    eprint!("{}", o.output.data);
                } else {
                    print!("{}", o.output.data);
                    let _ = std::io::stdout().flush();
                }
            }
            ServerMessage::Response(r) => {
                let result: m::ExecResult = harness_client::decode(r)?;
                let code = result.exit_code.unwrap_or(128 + result.signal.unwrap_or(0));
                return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
            }
            _ => {}
        }
    }
}

async fn health(g: &GlobalOpts, services: Vec<String>) -> anyhow::Result<ExitCode> {
    let stack = require_stack(g)?;
    let c = client(g).await?;
    let names_list = if services.is_empty() {
        let list: Vec<m::ServiceInfo> = c
            .call(
                names::SERVICE_LIST,
                m::ListParams {
                    stack: Some(stack.clone()),
                },
            )
            .await?;
        list.into_iter().map(|s| s.name).collect()
    } else {
        services
    };
    let mut results = Vec::new();
    for name in names_list {
        let r: m::HealthResult = c
            .call(
                names::SERVICE_HEALTH,
                m::ServiceParams {
                    stack: stack.clone(),
                    name,
                },
            )
            .await?;
        results.push(r);
    }
    let all_ok = results.iter().all(|r| r.health != m::Health::Unhealthy);
    if g.json {
        output::json(&results);
    } else {
        let mut t = output::table(&["service", "health", "check", "output"]);
        for r in &results {
            t.add_row(vec![
                r.name.clone(),
                format!("{:?}", r.health).to_lowercase(),
                r.check.clone(),
                r.output.clone(),
            ]);
        }
        println!("{t}");
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        super::failure()
    })
}

async fn events(
    g: &GlobalOpts,
    since: Option<u64>,
    topics: Vec<String>,
) -> anyhow::Result<ExitCode> {
    let stack = config_file::current_stack(g).ok().flatten();
    let mut c = client(g).await?;
    // The next seq to ask for after a reconnect or a lag.
    let mut next = since;
    loop {
        let params = m::SubscribeParams {
            topics: topics.clone(),
            stack: stack.clone(),
            since: next,
        };
        let subscribed: Result<m::SubscribeResult, ClientError> =
            c.call(names::SUBSCRIBE, params).await;
        match subscribed {
            Ok(r) => {
                next.get_or_insert(r.seq + 1);
            }
            Err(ClientError::Closed) => {
                c = reconnect(g).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        let events = c.events();
        while let Ok(e) = events.recv().await {
            if let EventKind::DaemonLagged(lag) = &e.kind {
                // This client fell behind: subscribe again from what it missed.
                next = Some(lag.missed_from_seq);
                break;
            }
            next = Some(e.seq + 1);
            if g.json {
                println!("{}", serde_json::to_string(&e).expect("events serialize"));
            } else {
                let data = serde_json::to_value(&e.kind).expect("events serialize");
                println!(
                    "{:>6} {} {} {}",
                    e.seq,
                    e.time,
                    data["event"].as_str().unwrap_or(""),
                    data["data"]
                );
            }
            let _ = std::io::stdout().flush();
        }
        c = reconnect(g).await;
    }
}

async fn config_cmd(g: &GlobalOpts, cmd: ConfigCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ConfigCmd::Show => {
            let stack = require_stack(g)?;
            let c = client(g).await?;
            let cfg: config::StackConfig =
                c.call(names::CONFIG_GET, m::StackParams { stack }).await?;
            print_config(&cfg, g.json)?;
        }
        ConfigCmd::Resolve => print_config(&config_file::load(g)?.config.masked(), g.json)?,
        ConfigCmd::Env { service } => {
            let stack = require_stack(g)?;
            let c = client(g).await?;
            let r: m::EnvResult = c
                .call(
                    names::CONFIG_ENV,
                    m::ServiceParams {
                        stack,
                        name: service,
                    },
                )
                .await?;
            if g.json {
                output::json(&r.env);
            } else {
                for (k, v) in r.env {
                    println!("{k}={v}");
                }
            }
        }
        ConfigCmd::Deps => {
            let loaded = config_file::load(g)?;
            let order = config::start_order(&loaded.config);
            if g.json {
                let deps: std::collections::BTreeMap<_, Vec<_>> = loaded
                    .config
                    .services
                    .iter()
                    .map(|(n, s)| (n.clone(), s.depends_on.keys().cloned().collect()))
                    .collect();
                output::json(&json!({"start_order": order, "depends_on": deps}));
            } else {
                for n in order {
                    let deps: Vec<&String> = loaded.config.services[&n].depends_on.keys().collect();
                    if deps.is_empty() {
                        println!("{n}");
                    } else {
                        println!(
                            "{n} <- {}",
                            deps.iter()
                                .map(|d| d.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        );
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_config(cfg: &config::StackConfig, json_out: bool) -> anyhow::Result<()> {
    if json_out {
        output::json(cfg);
    } else {
        print!(
            "{}",
            serde_saphyr::to_string(cfg).context("cannot print the config as YAML")?
        );
    }
    Ok(())
}

async fn daemon_cmd(g: &GlobalOpts, cmd: DaemonCmd) -> anyhow::Result<ExitCode> {
    let dir = state_dir(g);
    match cmd {
        DaemonCmd::Start => {
            let c = ensure_daemon(&dir, CLIENT, |m| eprintln!("{m}")).await?;
            let s: m::DaemonStatus = c.call(names::DAEMON_STATUS, json!({})).await?;
            eprintln!(
                "harnessd {} (pid {}) serves {} at {}",
                s.instance, s.pid, s.state_dir, s.url
            );
        }
        DaemonCmd::Stop { stop_services } => {
            let c = client(g).await?;
            let s: m::DaemonStatus = c.call(names::DAEMON_STATUS, json!({})).await?;
            let _: m::Empty = c
                .call(names::DAEMON_SHUTDOWN, m::ShutdownParams { stop_services })
                .await?;
            // Wait until it is gone so a following start does not race it.
            for _ in 0..200 {
                if !PathBuf::from(format!("/proc/{}", s.pid)).exists() {
                    break;
                }
                smol::Timer::after(Duration::from_millis(25)).await;
            }
            eprintln!("harnessd (pid {}) stopped", s.pid);
        }
        DaemonCmd::Status => match client(g).await {
            Ok(c) => {
                let s: m::DaemonStatus = c.call(names::DAEMON_STATUS, json!({})).await?;
                if g.json {
                    output::json(&s);
                } else {
                    println!("harnessd {} pid {} up {} s at {}\nstate {}\n{} stacks, {} services, {} clients, seq {}", s.instance, s.pid, s.uptime_secs, s.url, s.state_dir, s.stacks, s.services, s.clients, s.seq);
                }
            }
            Err(e) => {
                if g.json {
                    output::json(&json!({"running": false, "error": e.to_string()}));
                } else {
                    eprintln!("harnessd is not running for {}: {e}", dir.display());
                }
                return Ok(super::failure());
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}
