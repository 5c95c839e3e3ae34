//! Load: concurrent clients send requests while subscribers follow events and logs,
//! restarts keep events coming, and one subscriber stops reading altogether. Nothing
//! may fail, memory stays bounded, the stuck subscriber stalls no one, and once it
//! reads again it is told where it fell behind and replays every event it missed.
//!
//! Sizes: `LOAD_CLIENTS` × `LOAD_REQUESTS` with `LOAD_SUBSCRIBERS` (CI: 20 × 100 with
//! 5; the soak script: 200 × 1000 with 50). The test prints one `load:` line with the
//! figures (the soak script copies it into RELIABILITY.md).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::Message;
use futures_rustls::client::TlsStream;
use futures_rustls::rustls::pki_types::ServerName;
use futures_util::StreamExt;
use harness_client::Client;
use protocol::events::EventKind;
use protocol::methods::{self as m, names};
use protocol::{DaemonFile, Request, ServerMessage};
use tests::TestDaemon;

use crate::support::*;

/// Services that restarts cycle through (their events are the subscribers' traffic).
const SERVICES: usize = 8;

/// Longest any request may take: past it, something stalled.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Events published while the subscriber is stuck, at least: several times its queue in
/// harnessd (1024) and what the socket buffers hold for it, so that its replay takes
/// more than one queueful.
const EVENTS_TO_MISS: u64 = 6000;

fn size(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

type RawConnection = async_tungstenite::WebSocketStream<TlsStream<async_net::TcpStream>>;

/// The stuck subscriber: its connection, its local port, the seq it subscribed after,
/// and the events that came before the answer to its `subscribe`.
struct Stuck {
    ws: RawConnection,
    port: u16,
    after: u64,
    early: Vec<u64>,
}

/// A connection made by hand, with a small receive buffer so that the kernel holds
/// little for it and harnessd's own bounded queue is what fills once it stops reading.
/// Authenticated and subscribed to every event.
async fn stuck_subscriber(info: &DaemonFile) -> Stuck {
    use rustix::net::{connect, socket, sockopt, AddressFamily, SocketType};
    let authority = info.url.trim_start_matches("wss://").trim_end_matches('/');
    let addr: SocketAddr = authority.parse().expect("daemon address");
    let fd = socket(AddressFamily::INET, SocketType::STREAM, None).expect("socket");
    sockopt::set_socket_recv_buffer_size(&fd, 4096).expect("SO_RCVBUF");
    connect(&fd, &addr).expect("connect");
    let tcp = std::net::TcpStream::from(fd);
    let port = tcp.local_addr().expect("local address").port();
    let tcp = async_net::TcpStream::try_from(tcp).expect("socket");
    let ca = std::fs::read(&info.ca).expect("CA");
    let tls = harness_client::pinned_tls(&ca, None).expect("TLS config");
    let name = ServerName::from(addr.ip());
    let stream = futures_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .expect("TLS");
    let (mut ws, _) = async_tungstenite::client_async(format!("{}/", info.url), stream)
        .await
        .expect("WebSocket");
    let token = std::fs::read_to_string(&info.token_file).expect("token");
    let hello = m::HelloParams {
        token: token.trim().to_owned(),
        protocol: protocol::PROTOCOL_VERSION,
        client: Some("stuck".into()),
    };
    let mut early = Vec::new();
    raw_call(&mut ws, 1, names::HELLO, hello, &mut early).await;
    let subscribe = m::SubscribeParams::default();
    let subscribed = raw_call(&mut ws, 2, names::SUBSCRIBE, subscribe, &mut early).await;
    let after = subscribed["seq"].as_u64().expect("subscribe seq");
    Stuck {
        ws,
        port,
        after,
        early,
    }
}

/// Calls `method` and returns its result; the seqs of events that come first go to
/// `events`.
async fn raw_call(
    ws: &mut RawConnection,
    id: u64,
    method: &str,
    params: impl serde::Serialize,
    events: &mut Vec<u64>,
) -> serde_json::Value {
    let text = serde_json::to_string(&Request::new(id, method, params)).expect("request");
    ws.send(Message::text(text)).await.expect("send");
    loop {
        match raw_next(ws).await {
            ServerMessage::Response(r) if r.id.map(|i| i.0) == Some(id) => {
                return harness_client::decode(r).expect(method)
            }
            ServerMessage::Event(e) => events.push(e.seq),
            _ => {}
        }
    }
}

/// How many bytes harnessd's side of the connection to local port `port` holds
/// unacknowledged in the kernel (`tx_queue` of /proc/net/tcp).
fn kernel_send_queue(daemon_port: u16, port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let port_of = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
    table
        .lines()
        .skip(1)
        .find_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, queues) = (f.get(1)?, f.get(2)?, f.get(4)?);
            (port_of(local)? == daemon_port && port_of(remote)? == port)
                .then(|| u64::from_str_radix(queues.split(':').next()?, 16).ok())?
        })
        .expect("harnessd's side of the stuck connection")
}

async fn raw_next<S>(ws: &mut S) -> ServerMessage
where
    S: futures_util::Stream<Item = Result<Message, async_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let next = smol::future::or(async { Some(ws.next().await) }, async {
            smol::Timer::after(Duration::from_secs(20)).await;
            None
        });
        match next.await.expect("nothing from harnessd for 20 s") {
            Some(Ok(Message::Text(text))) => {
                return serde_json::from_str(&text).expect("server message")
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("the connection ended: {other:?}"),
        }
    }
}

/// What one subscriber saw: event seqs in order, lag notices, log lines followed.
#[derive(Default)]
struct Seen {
    seqs: Vec<u64>,
    lagged: usize,
    log_lines: u64,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// harnessd's peak resident memory so far (VmHWM), in MB.
fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM");
    kb / 1024.0
}

#[test]
fn clients_and_subscribers_under_load_get_every_answer_and_event_and_a_stuck_one_stalls_no_one() {
    let (clients, requests, subscribers) = (
        size("LOAD_CLIENTS", 20),
        size("LOAD_REQUESTS", 100),
        size("LOAD_SUBSCRIBERS", 5),
    );
    let d = TestDaemon::start_with_log("info");
    let dir = d.workdir("load");
    let mut yaml = String::from(
        "name: load\nservices:\n  chatty:\n    target: { process: { binary: /bin/sh, args: [-c, 'i=0; while :; do echo line $i; i=$((i+1)); sleep 0.005; done'] } }\n",
    );
    for i in 0..SERVICES {
        yaml.push_str(&format!(
            "  s{i}:\n    target: {{ process: {{ binary: DEMO, args: [--name, s{i}, --port, \"${{self.port}}\"] }} }}\n    port: auto\n    health_check: {{ type: tcp }}\n"
        ));
    }
    write_config(&dir, &yaml);
    assert_ok(&d, &d.cli(&dir, &["up"]), "harness up");
    let pid = d.info.pid;
    let rss_before = peak_rss_mb(pid);

    smol::block_on(async {
        let stuck = stuck_subscriber(&d.info).await;
        let stuck_after = stuck.after;
        let (mut stuck_tx, mut stuck_rx) = stuck.ws.split();
        // It sends a pong now and then (writing needs no reading): harnessd drops a
        // connection silent for 90 s, and this one must outlive a long load.
        let keepalive = smol::spawn(async move {
            loop {
                smol::Timer::after(Duration::from_secs(20)).await;
                if stuck_tx
                    .send(Message::Pong(Vec::new().into()))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        // Subscribers: every event, and the chatty service's log, followed.
        // The last seq of the load, once it is over (0 until then).
        let settled = Arc::new(AtomicU64::new(0));
        let mut followers = Vec::new();
        for _ in 0..subscribers {
            let c = Client::connect(&d.info, "subscriber")
                .await
                .expect("connect");
            let r: m::SubscribeResult = c
                .call(names::SUBSCRIBE, m::SubscribeParams::default())
                .await
                .expect("subscribe");
            let mut logs = c
                .start_request(
                    names::SERVICE_LOGS,
                    m::LogsParams {
                        stack: "load".into(),
                        name: "chatty".into(),
                        tail: Some(0),
                        since: None,
                        follow: true,
                    },
                )
                .await
                .expect("follow logs");
            let settled = settled.clone();
            followers.push(smol::spawn(async move {
                let mut seen = Seen::default();
                let events = c.events();
                let mut answered = false;
                let mut last_event = Instant::now();
                // Until the load is over and its last event is in (or 20 s passed
                // without one: the assertions below tell what was missed).
                loop {
                    let last = settled.load(Ordering::Acquire);
                    if last != 0
                        && (seen.seqs.last().is_some_and(|&s| s >= last)
                            || last_event.elapsed() > Duration::from_secs(20))
                    {
                        break;
                    }
                    let next = smol::future::or(
                        async { Some(Ok(events.recv().await.expect("events"))) },
                        smol::future::or(async { Some(Err(logs.next().await)) }, async {
                            smol::Timer::after(Duration::from_millis(100)).await;
                            None
                        }),
                    );
                    match next.await {
                        Some(Ok(e)) => {
                            last_event = Instant::now();
                            if matches!(e.kind, EventKind::DaemonLagged(_)) {
                                seen.lagged += 1;
                            } else {
                                seen.seqs.push(e.seq);
                            }
                        }
                        Some(Err(Ok(ServerMessage::Log(_)))) => seen.log_lines += 1,
                        // The answer to the (empty) tail; the lines follow it.
                        Some(Err(Ok(ServerMessage::Response(r))))
                            if !answered && r.id.map(|i| i.0) == Some(logs.id) =>
                        {
                            answered = true
                        }
                        Some(Err(other)) => panic!("log follow ended: {other:?}"),
                        None => {}
                    }
                }
                (r.seq, seen)
            }));
        }
        // Restarts, one loop per service, until the load is over and the stuck
        // subscriber has missed enough.
        let probe = Arc::new(Client::connect(&d.info, "probe").await.expect("connect"));
        let published = Arc::new(AtomicU64::new(stuck_after));
        let clients_done = Arc::new(AtomicBool::new(false));
        let restarters: Vec<_> = (0..SERVICES)
            .map(|i| {
                let (c, published, clients_done) =
                    (probe.clone(), published.clone(), clients_done.clone());
                smol::spawn(async move {
                    let mut restarts = 0u64;
                    while !clients_done.load(Ordering::Acquire)
                        || published.load(Ordering::Acquire) < stuck_after + EVENTS_TO_MISS
                    {
                        let _: serde_json::Value = c
                            .call(
                                names::SERVICE_RESTART,
                                m::ServicesParams {
                                    stack: "load".into(),
                                    names: vec![format!("s{i}")],
                                    purge: false,
                                },
                            )
                            .await
                            .unwrap_or_else(|e| panic!("restart s{i}: {e}"));
                        restarts += 1;
                        let status: serde_json::Value = c
                            .call(names::DAEMON_STATUS, serde_json::json!({}))
                            .await
                            .expect("daemon.status");
                        published.fetch_max(status["seq"].as_u64().unwrap_or(0), Ordering::AcqRel);
                    }
                    restarts
                })
            })
            .collect();
        // The clients: reads of every kind, each waiting for its answer.
        let started = Instant::now();
        let workers: Vec<_> = (0..clients)
            .map(|k| {
                let info = d.info.clone();
                smol::spawn(async move {
                    let c = Client::connect(&info, "load").await.expect("connect");
                    let mut took = Vec::with_capacity(requests);
                    for r in 0..requests {
                        let name = format!("s{}", (k + r) % SERVICES);
                        let t = Instant::now();
                        let request = async {
                            let answer: Result<serde_json::Value, _> = match r % 10 {
                                0 => c.call(names::SERVICE_LIST, m::ListParams::default()).await,
                                1 => c.call(names::DAEMON_STATUS, serde_json::json!({})).await,
                                2 => {
                                    let p = m::LogsParams {
                                        stack: "load".into(),
                                        name: "chatty".into(),
                                        tail: Some(20),
                                        since: None,
                                        follow: false,
                                    };
                                    c.call(names::SERVICE_LOGS, p).await
                                }
                                3 => {
                                    let p = m::StackParams {
                                        stack: "load".into(),
                                    };
                                    c.call(names::CONFIG_GET, p).await
                                }
                                _ => {
                                    let p = m::ServiceParams {
                                        stack: "load".into(),
                                        name,
                                    };
                                    c.call(names::SERVICE_GET, p).await
                                }
                            };
                            Some(answer)
                        };
                        // A stall shows as a request that does not come back.
                        let answer = smol::future::or(request, async {
                            smol::Timer::after(REQUEST_TIMEOUT).await;
                            None
                        })
                        .await
                        .unwrap_or_else(|| {
                            panic!("client {k}, request {r}: no answer in {REQUEST_TIMEOUT:?}")
                        });
                        took.push(t.elapsed());
                        if let Err(e) = answer {
                            panic!("client {k}, request {r}: {e}");
                        }
                    }
                    took
                })
            })
            .collect();
        let mut latencies = Vec::new();
        for w in workers {
            latencies.extend(w.await);
        }
        let load_secs = started.elapsed().as_secs_f64();
        clients_done.store(true, Ordering::Release);
        let mut restarts = 0;
        for r in restarters {
            restarts += r.await;
        }
        let status: m::DaemonStatus = probe
            .call(names::DAEMON_STATUS, serde_json::json!({}))
            .await
            .expect("daemon.status");
        let last = status.seq;
        settled.store(last, Ordering::Release);
        let mut seen_by = Vec::new();
        for f in followers {
            seen_by.push(f.await);
        }
        let rss_peak = peak_rss_mb(pid);

        // Every subscriber that kept reading got every event, in order, and no lag.
        let mut events_delivered = 0;
        let mut log_lines = 0;
        for (from, seen) in &seen_by {
            assert_eq!(seen.lagged, 0, "a subscriber that kept reading lagged");
            let got_to = seen.seqs.last().copied().unwrap_or(*from);
            assert!(
                got_to >= last && seen.seqs == (from + 1..=got_to).collect::<Vec<_>>(),
                "a subscriber missed events: got {} from {} to {got_to}, the load ended at {last}",
                seen.seqs.len(),
                from + 1,
            );
            assert!(seen.log_lines > 0, "a log follower got no lines");
            events_delivered += seen.seqs.len();
            log_lines += seen.log_lines;
        }

        // Bounded: what harnessd's kernel holds for the stuck connection is its fixed
        // send buffer (128 KiB, doubled by the kernel), not megabytes.
        let daemon_port: u16 = d
            .info
            .url
            .rsplit(':')
            .next()
            .unwrap()
            .trim_end_matches('/')
            .parse()
            .unwrap();
        let backlog = kernel_send_queue(daemon_port, stuck.port);
        assert!(
            backlog <= 512 << 10,
            "{backlog} bytes queued in the kernel for the stuck client"
        );

        // The stuck subscriber reads again: what was buffered, then a lag notice.
        let mut stuck_seqs = stuck.early;
        let missed_from = loop {
            match raw_next(&mut stuck_rx).await {
                ServerMessage::Event(e) => match e.kind {
                    EventKind::DaemonLagged(l) => break l.missed_from_seq,
                    _ => stuck_seqs.push(e.seq),
                },
                other => panic!("unexpected {other:?}"),
            }
        };
        drop(keepalive);
        let expected: Vec<u64> = (stuck_after + 1..missed_from).collect();
        assert_eq!(
            stuck_seqs, expected,
            "what the stuck subscriber got before its lag"
        );
        assert!(
            missed_from + 1024 < last,
            "the stuck subscriber missed only the events from {missed_from} to {last}"
        );
        // ... and replays the rest from where it fell behind (a queueful at a time:
        // each lag notice names where to go on from, as `harness events` does).
        let mut replayed: Vec<u64> = Vec::new();
        let mut rounds = 0;
        while replayed.last().is_none_or(|&s| s < last) {
            rounds += 1;
            let from = replayed.last().map_or(missed_from, |s| s + 1);
            let c = Client::connect(&d.info, "replay").await.expect("connect");
            let _: m::SubscribeResult = c
                .call(
                    names::SUBSCRIBE,
                    m::SubscribeParams {
                        since: Some(from),
                        ..Default::default()
                    },
                )
                .await
                .expect("subscribe since");
            let events = c.events();
            while replayed.last().is_none_or(|&s| s < last) {
                let e = smol::future::or(async { events.recv().await.ok() }, async {
                    smol::Timer::after(Duration::from_secs(20)).await;
                    None
                })
                .await
                .unwrap_or_else(|| panic!("replay stopped after {} events", replayed.len()));
                match e.kind {
                    EventKind::DaemonLagged(l) => {
                        assert_eq!(Some(l.missed_from_seq), replayed.last().map(|s| s + 1));
                        break;
                    }
                    _ => replayed.push(e.seq),
                }
            }
        }
        let replayed_to = *replayed.last().unwrap();
        assert_eq!(
            replayed,
            (missed_from..=replayed_to).collect::<Vec<_>>(),
            "the replay"
        );
        assert!(
            rounds >= 2,
            "the replay fitted in one queueful: the test missed too little"
        );

        latencies.sort();
        let served = latencies.len();
        let p99 = percentile(&latencies, 0.99);
        assert!(
            rss_peak < rss_before + 100.0,
            "harnessd grew from {rss_before:.1} MB to a peak of {rss_peak:.1} MB"
        );
        println!(
            "load: {clients} clients x {requests} requests = {served} served in {load_secs:.1} s, 0 errors; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {restarts} restarts alongside; {subscribers} subscribers got all {events_delivered} events (none lagged) and {log_lines} followed log lines; a stuck subscriber ({backlog} bytes in harnessd's kernel send queue for it) lagged at seq {missed_from}, replayed {} events in {rounds} rounds, 0 lost; harnessd peak RSS {rss_peak:.1} MB (before the load {rss_before:.1} MB)",
            percentile(&latencies, 0.5).as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            latencies[served - 1].as_secs_f64() * 1e3,
            replayed.len(),
        );
    });
}
