//! A tiny HTTP service for the quickstart and the end-to-end tests.
//!
//! `demo-service --name api --port 8080 [--upstream db=127.0.0.1:5432]... [--crash-after-ms N]`
//! listens on `--bind` (default 0.0.0.0), answers `GET /health` with 200 once every
//! upstream answered a TCP connect at start-up, and `GET /` with a JSON line naming its
//! upstreams. It logs each request and a heartbeat, so logs have something to follow.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

struct Opts {
    name: String,
    bind: String,
    port: u16,
    upstreams: Vec<(String, String)>,
    crash_after: Option<Duration>,
    heartbeat: Duration,
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        name: "demo".into(),
        bind: "0.0.0.0".into(),
        port: 0,
        upstreams: Vec::new(),
        crash_after: None,
        heartbeat: Duration::from_secs(5),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--name" => o.name = value()?,
            "--bind" => o.bind = value()?,
            "--port" => o.port = value()?.parse().map_err(|e| format!("--port: {e}"))?,
            "--upstream" => {
                let v = value()?;
                let (n, addr) = v.split_once('=').ok_or("--upstream takes NAME=HOST:PORT")?;
                o.upstreams.push((n.to_owned(), addr.to_owned()));
            }
            "--crash-after-ms" => {
                let ms: u64 = value()?
                    .parse()
                    .map_err(|e| format!("--crash-after-ms: {e}"))?;
                o.crash_after = Some(Duration::from_millis(ms));
            }
            "--heartbeat-ms" => {
                let ms: u64 = value()?
                    .parse()
                    .map_err(|e| format!("--heartbeat-ms: {e}"))?;
                o.heartbeat = Duration::from_millis(ms);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("demo-service: {e}");
            std::process::exit(2);
        }
    };
    // Connect to every upstream first: this is what proves the injected address works.
    for (name, addr) in &opts.upstreams {
        match TcpStream::connect(addr) {
            Ok(_) => println!("{}: connected to {name} at {addr}", opts.name),
            Err(e) => {
                eprintln!("{}: cannot connect to {name} at {addr}: {e}", opts.name);
                std::process::exit(1);
            }
        }
    }
    let listener = match TcpListener::bind((opts.bind.as_str(), opts.port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "{}: cannot listen on {}:{}: {e}",
                opts.name, opts.bind, opts.port
            );
            std::process::exit(1);
        }
    };
    println!(
        "{}: listening on {}",
        opts.name,
        listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    );
    let started = Instant::now();
    {
        let (name, every, crash) = (opts.name.clone(), opts.heartbeat, opts.crash_after);
        std::thread::spawn(move || loop {
            std::thread::sleep(every.min(crash.unwrap_or(every)));
            if crash.is_some_and(|c| started.elapsed() >= c) {
                eprintln!("{name}: crashing on purpose");
                std::process::exit(3);
            }
            println!(
                "{name}: heartbeat after {} ms",
                started.elapsed().as_millis()
            );
        });
    }
    for stream in listener.incoming().flatten() {
        let upstreams = opts.upstreams.clone();
        let name = opts.name.clone();
        std::thread::spawn(move || serve(stream, &name, &upstreams));
    }
}

fn serve(mut stream: TcpStream, name: &str, upstreams: &[(String, String)]) {
    let mut request_line = String::new();
    if BufReader::new(&stream)
        .read_line(&mut request_line)
        .is_err()
    {
        return;
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_owned();
    let (status, body) = match path.as_str() {
        "/health" => ("200 OK", "ok\n".to_owned()),
        "/" => {
            let ups: Vec<String> = upstreams
                .iter()
                .map(|(n, a)| format!("\"{n}\":\"{a}\""))
                .collect();
            (
                "200 OK",
                format!(
                    "{{\"service\":\"{name}\",\"upstreams\":{{{}}}}}\n",
                    ups.join(",")
                ),
            )
        }
        _ => ("404 Not Found", "not found\n".to_owned()),
    };
    println!("{name}: GET {path} -> {status}");
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}
