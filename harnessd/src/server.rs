//! Startup and the TLS WebSocket server.
//!
//! Each connection gets a reader loop (parses requests, runs each as its own task) and a
//! writer task fed by two queues: responses/log lines/exec output (bounded; a client that
//! does not read slows only its own requests) and events (bounded; when full the client
//! is marked lagged instead, see `events`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_tungstenite::tungstenite::protocol::WebSocketConfig;
use async_tungstenite::tungstenite::{self, Message};
use futures_rustls::TlsAcceptor;
use futures_util::{SinkExt, StreamExt};
use protocol::events::{EventKind, Lagged};
use protocol::{ErrorCode, Response, MAX_MESSAGE_BYTES};
use registry::{Journal, StateLock, Store};

use crate::core::Core;
use crate::dispatch::{self, Conn};
use crate::events::{EventBus, EventSink, CONNECTION_EVENT_QUEUE};
use crate::persist::{self, Persister};
use crate::pki::{self, PkiPaths};
use crate::{daemon_file_path, DaemonError, DaemonOpts};
use protocol::DaemonFile;

/// Most messages written between two flushes.
const WRITE_BATCH: usize = 64;
/// Responses and streamed output queued per connection.
const CONNECTION_OUT_QUEUE: usize = 256;
/// A connection that neither sends nor answers pings for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
const PING_EVERY: Duration = Duration::from_secs(30);
/// Kernel send buffer per connection (the kernel doubles it for its bookkeeping).
const SOCKET_SEND_BUFFER: usize = 128 << 10;

/// Starts the daemon and serves until shutdown.
pub async fn serve(ex: Arc<smol::Executor<'static>>, opts: DaemonOpts) -> Result<(), DaemonError> {
    let _lock = StateLock::acquire(&opts.state_dir)?;
    let (store, snapshot, recoveries) = Store::open(&opts.state_dir)?;
    let (journal, journal_recoveries) = Journal::open(&opts.state_dir)?;
    for r in recoveries.iter().chain(&journal_recoveries) {
        tracing::warn!("recovered: {r}");
    }
    let addr = opts.listen.unwrap_or_else(|| {
        let port = if opts.default_state_dir {
            protocol::DEFAULT_PORT
        } else {
            0
        };
        SocketAddr::from(([127, 0, 0, 1], port))
    });
    if !addr.ip().is_loopback() && opts.client_ca.is_none() {
        return Err(DaemonError::Listen {
            addr,
            message: "only loopback is served without mutual TLS: pass --client-ca CA.pem, and clients on other machines then present a certificate that CA signed (with the token, as always)".to_owned(),
        });
    }
    let mut server_names = opts.server_names.clone();
    if !addr.ip().is_loopback() && !addr.ip().is_unspecified() {
        server_names.push(addr.ip().to_string());
    }
    let listener_tls = pki::ListenerTls {
        client_ca: opts.client_ca.clone(),
        server_names,
    };
    let pki = pki::load_or_create(
        &PkiPaths::new(&opts.state_dir),
        &snapshot.instance,
        &listener_tls,
    )?;
    let listener = async_net::TcpListener::bind(addr).await.map_err(|e| DaemonError::Listen {
        addr,
        message: if e.kind() == std::io::ErrorKind::AddrInUse {
            format!("the port is taken ({e}); is another harnessd running? pick another with --listen 127.0.0.1:PORT (0 = any free port)")
        } else {
            e.to_string()
        },
    })?;
    let local = listener.local_addr().map_err(|e| DaemonError::Listen {
        addr,
        message: e.to_string(),
    })?;
    // Local clients connect to loopback, which the certificate names, also when the
    // daemon listens on every address.
    let reachable = match local.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], local.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, local.port()))
        }
        _ => local,
    };
    let url = format!("wss://{reachable}");
    let events = EventBus::new(journal.last_seq());
    let core = Arc::new(Core::new(
        snapshot,
        opts.state_dir.clone(),
        url.clone(),
        opts.shim_exe.clone(),
        ex.clone(),
        events,
        Persister::new(journal),
    ));
    ex.spawn(persist::run(core.clone(), store)).detach();
    let mut fixes: Vec<String> = recoveries
        .iter()
        .chain(&journal_recoveries)
        .map(|r| r.to_string())
        .collect();
    fixes.extend(crate::orchestrator::reconcile(&core).await);
    ex.spawn(crate::mesh::watch_hub(core.clone())).detach();
    write_daemon_file(&opts.state_dir, &url, &core.instance)?;
    tracing::info!(
        "harnessd {} listening on {url} (state {})",
        env!("CARGO_PKG_VERSION"),
        opts.state_dir.display()
    );
    core.events
        .publish(EventKind::DaemonReconciled(protocol::events::Reconciled {
            fixes,
        }));
    let _ = core.commit().await;
    // The listener is bound and daemon.json written: clients can connect now.
    let ready = format!(
        "READY=1\nMAINPID={}\nSTATUS=serving {url}",
        std::process::id()
    );
    if let Err(e) = crate::notify::notify(&ready) {
        tracing::warn!("cannot tell systemd that harnessd is ready: {e}");
    }

    let acceptor = TlsAcceptor::from(pki.server_config.clone());
    let token: Arc<str> = pki.token.into();
    let next_conn = AtomicU64::new(1);
    let shutdown = core.shutdown_requested();
    let accept_loop = async {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    smol::Timer::after(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let conn_id = next_conn.fetch_add(1, Ordering::Relaxed);
            let (core, acceptor, token) = (core.clone(), acceptor.clone(), token.clone());
            ex.spawn(async move {
                if let Err(e) = connection(core, acceptor, token, tcp, peer, conn_id).await {
                    tracing::debug!("connection {conn_id} from {peer}: {e}");
                }
            })
            .detach();
        }
    };
    // SIGTERM (systemd, kill) and SIGINT (Ctrl-C) end the daemon like daemon.shutdown:
    // the state is saved, services keep running for the next daemon.
    let signals = async {
        match async_signal::Signals::new([async_signal::Signal::Term, async_signal::Signal::Int]) {
            Ok(mut s) => {
                if let Some(Ok(sig)) = s.next().await {
                    tracing::info!("received {sig:?}; stopping (services keep running)");
                }
            }
            Err(e) => {
                tracing::warn!("cannot handle signals: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    smol::future::or(accept_loop, smol::future::or(shutdown, signals)).await;
    let _ = crate::notify::notify("STOPPING=1");
    let _ = core.commit().await;
    let _ = std::fs::remove_file(daemon_file_path(&opts.state_dir));
    tracing::info!("harnessd stopped");
    Ok(())
}

fn write_daemon_file(dir: &Path, url: &str, instance: &str) -> Result<(), DaemonError> {
    let paths = PkiPaths::new(dir);
    let info = DaemonFile {
        url: url.to_owned(),
        ca: paths.ca_cert,
        token_file: paths.token,
        pid: std::process::id(),
        instance: instance.to_owned(),
        client_cert: None,
        client_key: None,
    };
    let text = serde_json::to_string_pretty(&info).expect("daemon file serializes");
    pki::write_file(&daemon_file_path(dir), text.as_bytes(), 0o644)
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES))
        .read_buffer_size(16 << 10)
}

async fn connection(
    core: Arc<Core>,
    acceptor: TlsAcceptor,
    token: Arc<str>,
    tcp: async_net::TcpStream,
    peer: SocketAddr,
    id: u64,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let _ = tcp.set_nodelay(true);
    // A fixed send buffer instead of one the kernel grows to megabytes: a client that
    // stops reading then holds a bounded amount of kernel memory too, and it is its
    // queue here that fills, so it is told it lagged (and replays from the journal)
    // rather than being fed a backlog of stale events when it wakes.
    let _ = rustix::net::sockopt::set_socket_send_buffer_size(&tcp, SOCKET_SEND_BUFFER);
    let mut tls = acceptor.accept(tcp).await?;
    // Another machine must have shown a certificate of the client CA (the TLS layer
    // checked any it showed); it is told so at its hello.
    let certificate_missing =
        !peer.ip().is_loopback() && tls.get_ref().1.peer_certificates().is_none();
    let head = smol::future::or(crate::ui::read_head(&mut tls), async {
        smol::Timer::after(IDLE_TIMEOUT).await;
        Err(std::io::ErrorKind::TimedOut.into())
    })
    .await?;
    if !crate::ui::is_websocket(&head) {
        // A browser asking for the dashboard.
        crate::ui::respond(&mut tls, &head).await?;
        return Ok(());
    }
    let tls = crate::ui::Prefixed::new(head, tls);
    let ws = async_tungstenite::accept_async_with_config(tls, Some(ws_config())).await?;
    let (mut ws_tx, mut ws_rx) = ws.split();
    let (out_tx, out_rx) = async_channel::bounded::<String>(CONNECTION_OUT_QUEUE);
    let (ev_tx, ev_rx) = async_channel::bounded::<Arc<str>>(CONNECTION_EVENT_QUEUE);
    let sink = EventSink {
        tx: ev_tx,
        lagged_from: Arc::new(AtomicU64::new(0)),
    };
    let conn = Arc::new(Conn::new(id, out_tx.clone(), sink.clone()));
    core.clients.fetch_add(1, Ordering::Relaxed);

    // Writer: responses first, then events; a lag notice once the event queue is drained.
    let writer = {
        let lagged = sink.lagged_from.clone();
        core.ex.spawn(async move {
            let mut ping = smol::Timer::interval(PING_EVERY);
            loop {
                enum Next {
                    Out(Option<String>),
                    Event(Option<Arc<str>>),
                    Ping,
                }
                let next = smol::future::or(
                    async { Next::Out(out_rx.recv().await.ok()) },
                    smol::future::or(async { Next::Event(ev_rx.recv().await.ok()) }, async {
                        ping.next().await;
                        Next::Ping
                    }),
                )
                .await;
                let first = match next {
                    Next::Out(Some(text)) => Message::text(text),
                    Next::Event(Some(text)) => Message::text(text.to_string()),
                    Next::Ping => Message::Ping(b"harness".to_vec().into()),
                    Next::Out(None) | Next::Event(None) => break,
                };
                // Write whatever else is already queued with it, then flush once: under
                // load that is one TLS record flush for many messages.
                if ws_tx.feed(first).await.is_err() {
                    break;
                }
                let mut failed = false;
                for _ in 0..WRITE_BATCH {
                    let more = match out_rx.try_recv() {
                        Ok(text) => Message::text(text),
                        Err(_) => match ev_rx.try_recv() {
                            Ok(text) => Message::text(text.to_string()),
                            Err(_) => break,
                        },
                    };
                    if ws_tx.feed(more).await.is_err() {
                        failed = true;
                        break;
                    }
                }
                if failed || ws_tx.flush().await.is_err() {
                    break;
                }
                let missed = lagged.load(Ordering::Acquire);
                if missed != 0 && ev_rx.is_empty() {
                    lagged.store(0, Ordering::Release);
                    let notice = protocol::Event {
                        seq: missed - 1,
                        time: crate::core::now(),
                        kind: EventKind::DaemonLagged(Lagged {
                            missed_from_seq: missed,
                        }),
                    };
                    let text = serde_json::to_string(&notice).expect("events serialize");
                    if ws_tx.send(Message::text(text)).await.is_err() {
                        break;
                    }
                }
            }
            let _ = ws_tx.close(None).await;
        })
    };

    let mut authenticated = false;
    loop {
        let next = smol::future::or(async { Some(ws_rx.next().await) }, async {
            smol::Timer::after(IDLE_TIMEOUT).await;
            None
        })
        .await;
        let Some(Some(msg)) = next else { break };
        let text = match msg {
            Ok(Message::Text(t)) => t.to_string(),
            Ok(Message::Binary(_)) => {
                let r = Response::err(
                    None,
                    ErrorCode::InvalidRequest,
                    "binary messages are not accepted: send JSON requests as text messages",
                );
                let _ = out_tx.send(serde_json::to_string(&r)?).await;
                continue;
            }
            Ok(Message::Close(_)) => break,
            Ok(_) => continue,
            Err(tungstenite::Error::Capacity(e)) => {
                let r = Response::err(
                    None,
                    ErrorCode::MessageTooLarge,
                    format!("message too large ({e}); the limit is {MAX_MESSAGE_BYTES} bytes"),
                );
                let _ = out_tx.send(serde_json::to_string(&r)?).await;
                break;
            }
            Err(_) => break,
        };
        match protocol::envelope::parse_request(&text) {
            Err(response) => {
                let _ = out_tx.send(serde_json::to_string(&response)?).await;
            }
            Ok(request) if certificate_missing => {
                let r = Response::err(
                    Some(request.id),
                    ErrorCode::Unauthorized,
                    format!("a client on another machine ({}) must present a client certificate signed by the daemon's --client-ca", peer.ip()),
                );
                let _ = out_tx.send(serde_json::to_string(&r)?).await;
                break;
            }
            Ok(request) if !authenticated => {
                let (response, ok, close) = dispatch::hello(&core, &token, &request);
                authenticated = ok;
                let _ = out_tx.send(serde_json::to_string(&response)?).await;
                if close {
                    break;
                }
            }
            Ok(request) if dispatch::is_quick(&request.method) => {
                // Answered from memory: no task, no extra hop.
                if let Some(response) = dispatch::handle(&core, &conn, request).await {
                    let _ = out_tx.send(serde_json::to_string(&response)?).await;
                }
            }
            Ok(request) => {
                let (core, conn) = (core.clone(), conn.clone());
                core.ex
                    .clone()
                    .spawn(async move {
                        if let Some(response) = dispatch::handle(&core, &conn, request).await {
                            let text =
                                serde_json::to_string(&response).expect("responses serialize");
                            let _ = conn.out.send(text).await;
                        }
                    })
                    .detach();
            }
        }
    }
    core.clients.fetch_sub(1, Ordering::Relaxed);
    core.events.drop_connection(id);
    conn.close();
    drop(out_tx);
    // Let the writer flush what is queued (e.g. the error that ended the connection) and
    // send its close frame.
    let _ = smol::future::or(writer, async {
        smol::Timer::after(Duration::from_secs(2)).await;
    })
    .await;
    // Then read until the client closes too: a socket closed with unread input sends a
    // reset, and a reset can make the client drop the error it has not read yet.
    let _ = smol::future::or(
        async { while let Some(Ok(_)) = ws_rx.next().await {} },
        async {
            smol::Timer::after(Duration::from_secs(1)).await;
        },
    )
    .await;
    Ok(())
}
