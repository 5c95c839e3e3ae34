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

/// Events the stuck subscriber must miss, at least: more than its queue in harnessd
/// (1024) and what the kernel's socket buffers hold for it.
const EVENTS_TO_MISS: u64 = 4000;

fn size(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

type RawConnection = async_tungstenite::WebSocketStream<TlsStream<async_net::TcpStream>>;

/// A connection made by hand, with a small receive buffer so that the kernel holds
/// little for it and harnessd's own bounded queue is what fills once it stops reading.
/// Authenticated and subscribed to every event; returns it and the seq it starts after.
async fn stuck_subscriber(info: &DaemonFile) -> (RawConnection, u64) {
    use rustix::net::{connect, socket, sockopt, AddressFamily, SocketType};
    let authority = info.url.trim_start_matches("wss://").trim_end_matches('/');
    let addr: SocketAddr = authority.parse().expect("daemon address");
    let fd = socket(AddressFamily::INET, SocketType::STREAM, None).expect("socket");
    sockopt::set_socket_recv_buffer_size(&fd, 4096).expect("SO_RCVBUF");
    connect(&fd, &addr).expect("connect");
    let tcp = async_net::TcpStream::try_from(std::net::TcpStream::from(fd)).expect("socket");
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
    raw_call(&mut ws, 1, names::HELLO, hello).await;
    let subscribed = raw_call(&mut ws, 2, names::SUBSCRIBE, m::SubscribeParams::default()).await;
    let seq = subscribed["seq"].as_u64().expect("subscribe seq");
    (ws, seq)
}

async fn raw_call(
    ws: &mut RawConnection,
    id: u64,
    method: &str,
    params: impl serde::Serialize,
) -> serde_json::Value {
    let text = serde_json::to_string(&Request::new(id, method, params)).expect("request");
    ws.send(Message::text(text)).await.expect("send");
    loop {
        if let ServerMessage::Response(r) = raw_next(ws).await {
            if r.id.map(|i| i.0) == Some(id) {
                return harness_client::decode(r).expect(method);
            }
        }
    }
}

async fn raw_next(ws: &mut RawConnection) -> ServerMessage {
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
        let (mut stuck, stuck_after) = stuck_subscriber(&d.info).await;
        // Subscribers: every event, and the chatty service's log, followed.
        let done = Arc::new(AtomicBool::new(false));
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
            let done = done.clone();
            followers.push(smol::spawn(async move {
                let mut seen = Seen::default();
                let events = c.events();
                let mut last_event = Instant::now();
                let mut answered = false;
                // Until the load is over and the last events are in.
                while !done.load(Ordering::Acquire)
                    || last_event.elapsed() < Duration::from_millis(500)
                {
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
        done.store(true, Ordering::Release);
        let latest: m::HelloResult = {
            let c = Client::connect(&d.info, "latest").await.expect("connect");
            c.hello.clone()
        };
        let mut seen_by = Vec::new();
        for f in followers {
            seen_by.push(f.await);
        }
        let rss_peak = peak_rss_mb(pid);

        // Every subscriber that kept reading got every event, in order, and no lag.
        let mut events_delivered = 0;
        let mut log_lines = 0;
        for (from, seen) in &seen_by {
            let expected: Vec<u64> = (from + 1..=latest.seq).collect();
            assert_eq!(seen.lagged, 0, "a subscriber that kept reading lagged");
            assert!(
                seen.seqs == expected,
                "a subscriber missed events: got {} of {} ({}..={})",
                seen.seqs.len(),
                expected.len(),
                from + 1,
                latest.seq
            );
            assert!(seen.log_lines > 0, "a log follower got no lines");
            events_delivered += seen.seqs.len();
            log_lines += seen.log_lines;
        }

        // The stuck subscriber reads again: what was buffered, then a lag notice.
        let mut stuck_seqs = Vec::new();
        let missed_from = loop {
            match raw_next(&mut stuck).await {
                ServerMessage::Event(e) => match e.kind {
                    EventKind::DaemonLagged(l) => break l.missed_from_seq,
                    _ => stuck_seqs.push(e.seq),
                },
                other => panic!("unexpected {other:?}"),
            }
        };
        let expected: Vec<u64> = (stuck_after + 1..missed_from).collect();
        assert_eq!(
            stuck_seqs, expected,
            "what the stuck subscriber got before its lag"
        );
        assert!(
            latest.seq - missed_from > 1024,
            "the stuck subscriber missed only {} events",
            latest.seq - missed_from
        );
        // ... and replays the rest from where it fell behind (a queueful at a time:
        // each lag notice names where to go on from, as `harness events` does).
        let mut replayed = Vec::new();
        let mut rounds = 0;
        while replayed.last() != Some(&latest.seq) {
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
            while replayed.last() != Some(&latest.seq) {
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
        let expected: Vec<u64> = (missed_from..=latest.seq).collect();
        assert_eq!(replayed, expected, "the replay");

        latencies.sort();
        let served = latencies.len();
        assert_eq!(served, clients * requests);
        let p99 = percentile(&latencies, 0.99);
        // Bounded: the stuck connection's backlog is a fixed-size queue of shared events.
        assert!(
            rss_peak < rss_before + 100.0,
            "harnessd grew from {rss_before:.1} MB to a peak of {rss_peak:.1} MB"
        );
        println!(
            "load: {clients} clients x {requests} requests = {served} served in {load_secs:.1} s, 0 errors; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {restarts} restarts alongside; {subscribers} subscribers got all {events_delivered} events (none lagged) and {log_lines} followed log lines; a stuck subscriber lagged at seq {missed_from}, replayed {} events in {rounds} rounds, 0 lost; harnessd peak RSS {rss_peak:.1} MB (before the load {rss_before:.1} MB)",
            percentile(&latencies, 0.5).as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            latencies[served - 1].as_secs_f64() * 1e3,
            replayed.len(),
        );
    });
}
