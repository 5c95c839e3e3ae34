//! End-to-end tests: a real harnessd (TLS WebSocket server, shims, processes) driven by
//! the client library and the `harness` CLI. Run with `cargo nextest run -p tests`.

mod bad_input;
mod cli;
mod crash_cycles;
mod daemon_restart;
mod dashboard;
mod discovery;
mod docker;
mod external;
mod lan;
mod lifecycle;
mod load;
mod mesh;
mod packages;
mod remote_clients;
mod scripts;
mod support;
mod systemd;
