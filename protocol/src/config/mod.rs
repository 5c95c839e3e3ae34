//! The configuration model and the parser of `harness.yaml`.
//!
//! [`parse_stack`] reads YAML (both seed shapes: `target: {process: {...}}` and
//! `backend: {type: process, ...}`) into the canonical [`StackConfig`] and validates it;
//! errors name the file, line and key.

mod model;

pub use model::*;
