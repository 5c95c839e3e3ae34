//! A client's message as the daemon reads it: the envelope, then the params of the
//! method it names (a config in `config.apply` is validated and ordered too).
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::methods::{self as m, names};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(req) = protocol::envelope::parse_request(text) else {
        return;
    };
    let params = req.params.clone();
    match req.method.as_str() {
        names::CONFIG_APPLY => {
            if let Ok(p) = serde_json::from_value::<m::ApplyParams>(params) {
                if protocol::config::validate(&p.config, "fuzz").is_ok() {
                    let _ = protocol::config::start_order(&p.config);
                    let _ = protocol::config::expand_instances(&p.config);
                }
            }
        }
        names::SUBSCRIBE => {
            let _ = serde_json::from_value::<m::SubscribeParams>(params);
        }
        names::DISCOVER => {
            if let Ok(p) = serde_json::from_value::<m::DiscoverParams>(params) {
                let _ = protocol::config::scan_addresses(&p.options.ranges);
            }
        }
        names::SERVICE_LOGS => {
            let _ = serde_json::from_value::<m::LogsParams>(params);
        }
        names::DEPLOY => {
            let _ = serde_json::from_value::<m::DeployParams>(params);
        }
        _ => {
            let _ = serde_json::from_value::<m::ServicesParams>(params);
        }
    }
});
