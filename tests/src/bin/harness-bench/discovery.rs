//! The discovery benchmark (issue 8): a tcp scan of the test bed's /24 × 10 ports with a
//! 200 ms connect timeout and 256 connects in flight, 3 live hosts (each with its
//! sshd), through the daemon's `discover` method. Baseline in the same run: the same
//! scan with `probe_all` (every address × port tried, no host check).

use std::time::{Duration, Instant};

use protocol::config::DiscoveryOptions;
use protocol::methods::{self as m, names};
use tests::testbed::TestBed;
use tests::TestDaemon;

use crate::{median, ms};

const RUNS: usize = 5;
const PORTS: [u16; 10] = [22, 80, 443, 3000, 5432, 6379, 8000, 8080, 9090, 27017];

pub fn bench(d: &TestDaemon) {
    let bed = TestBed::new(3);
    let c = d.client();
    let scan = |probe_all: bool| {
        let params = m::DiscoverParams {
            options: DiscoveryOptions {
                strategies: vec!["tcp".into()],
                ranges: vec![bed.subnet.clone()],
                tcp_ports: PORTS.to_vec(),
                tcp_timeout_ms: Some(200),
                concurrency: Some(256),
                probe_all,
                ..Default::default()
            },
            refresh: true,
        };
        // Every scan starts with no neighbour entries on the bed's link, as on a LAN
        // not scanned before (the kernel answers for addresses that failed ARP lately).
        tests::testbed::run("ip", &["neigh", "flush", "dev", &bed.bridge]);
        let t = Instant::now();
        let r: m::DiscoverResult =
            smol::block_on(c.call(names::DISCOVER, params)).expect("discover");
        (t.elapsed(), r)
    };
    let (mut ours, mut all) = (Vec::new(), Vec::new());
    let mut found = (0, 0, 0, 0);
    // Alternate the two, so both see the same machine and the same neighbour table.
    for _ in 0..RUNS {
        let (t, r) = scan(false);
        ours.push(t);
        let ssh = r.services.iter().filter(|s| s.kind == "ssh").count();
        found = (r.services.len(), ssh, r.probes as usize, found.3);
        let (t, r) = scan(true);
        all.push(t);
        found.3 = r.services.len();
        assert_eq!(
            r.probes,
            254 * PORTS.len() as u64,
            "the baseline tries every probe"
        );
    }
    let (ours, all): (Duration, Duration) = (median(ours), median(all));
    println!(
        "discover tcp, {} (254 addresses) x {} ports, 200 ms timeout, concurrency 256, 3 live hosts (median of {RUNS}): harness {} ({} open ports found, {} of them ssh; {} connects) vs every probe (probe_all) {} ({} found, {} connects): ratio {:.2}; target < 2 s: {}",
        bed.subnet,
        PORTS.len(),
        ms(ours),
        found.0,
        found.1,
        found.2,
        ms(all),
        found.3,
        254 * PORTS.len(),
        ours.as_secs_f64() / all.as_secs_f64(),
        if ours < Duration::from_secs(2) { "met" } else { "NOT met" },
    );
}
