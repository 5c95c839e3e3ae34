//! The configuration model and the parser of `harness.yaml`.
//!
//! [`parse_stack`] reads YAML (both seed shapes: `target: {process: {...}}` and
//! `backend: {type: process, ...}`) into the canonical [`StackConfig`] and validates it;
//! errors name the file, line and key. [`validate`] checks a config that arrived in
//! canonical form, [`start_order`] and [`dependency_waves`] order its services, and
//! [`template`] expands `${...}` references. The client then calls
//! [`StackConfig::resolve_environment`] and [`StackConfig::resolve_paths`] before it
//! sends the config to the daemon.

mod compose;
mod error;
mod hosts_file;
mod instances;
mod model;
mod parse;
mod ranges;
mod read;
mod resolve;
pub mod template;
mod validate;
mod yaml;

#[cfg(test)]
mod tests;

pub use compose::{import_compose, is_compose_file_name, ComposeImport};
pub use error::{did_you_mean, ConfigError, ConfigErrors};
pub use hosts_file::{merge_hosts_file, HostsFile, HostsFileEntry};
pub use instances::{expand_instances, expand_names, instance_name, instances_of};
pub use model::*;
pub use parse::{parse_stack, parse_stack_with_hosts};
pub use ranges::{scan_addresses, AddressRange, MAX_SCAN_ADDRESSES};
pub use validate::{
    dependency_waves, dns_server_address, stack_name_problem, start_order, validate,
    DISCOVERY_KINDS, MAX_STACK_NAME_BYTES,
};
