//! `harness.yaml` and docker compose files as the CLI reads them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(mut config) = protocol::config::parse_stack(text, "fuzz.yaml") {
        let _ = protocol::config::start_order(&config);
        let _ = protocol::config::dependency_waves(&config);
        let _ = config.resolve_environment(&mut |_| None);
        config.resolve_paths("/fuzz", Some("/home/fuzz"));
    }
    let _ = protocol::config::import_compose(text, "docker-compose.yml", "fuzz");
});
