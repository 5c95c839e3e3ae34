//! JSON Schema of the wire types, generated from the Rust types.
//!
//! The generated schema is committed as `protocol/schema/protocol.schema.json`; the test
//! below regenerates it and fails when the committed copy is stale (run the tests with
//! `UPDATE_SCHEMA=1` to rewrite it).

use schemars::JsonSchema;

use crate::config::StackConfig;
use crate::envelope::{Request, ServerMessage};
use crate::methods::*;

/// Every message and method type, gathered so one schema defines them all.
#[derive(JsonSchema)]
#[allow(dead_code)]
struct WireTypes {
    request: Request,
    server_message: ServerMessage,
    config: StackConfig,
    hello: (HelloParams, HelloResult),
    apply: (ApplyParams, ApplyResult),
    validate: (ValidateParams, ValidateResult),
    stack: StackParams,
    service: ServiceParams,
    list: (ListParams, Vec<ServiceInfo>, Vec<StackInfo>),
    services: (ServicesParams, ServicesResult),
    health: HealthResult,
    env: EnvResult,
    logs: (LogsParams, LogsResult),
    exec: (ExecParams, ExecResult),
    subscribe: (SubscribeParams, SubscribeResult, UnsubscribeParams),
    daemon: (DaemonStatus, ShutdownParams, Empty),
    ui: UiLoginResult,
    discover: (DiscoverParams, DiscoverResult),
    mesh: (Vec<MeshPeer>, MeshRevokeParams),
    network: (Vec<NetworkInfo>, Vec<AddressRow>, Vec<ReachCheck>),
}

/// The JSON Schema of every wire type, pretty-printed, ending in a newline.
pub fn wire_schema() -> String {
    let schema = schemars::schema_for!(WireTypes);
    let mut text = serde_json::to_string_pretty(&schema).expect("a schema serializes");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn committed_schema_is_up_to_date() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/schema/protocol.schema.json");
        let fresh = super::wire_schema();
        if std::env::var_os("UPDATE_SCHEMA").is_some() {
            std::fs::create_dir_all(concat!(env!("CARGO_MANIFEST_DIR"), "/schema")).unwrap();
            std::fs::write(path, &fresh).unwrap();
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == fresh,
            "protocol/schema/protocol.schema.json is stale: run `UPDATE_SCHEMA=1 cargo test -p protocol` and commit it"
        );
    }
}
