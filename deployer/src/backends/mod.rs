//! The backends that run services; one module each.

pub mod docker;
pub mod process;
pub mod release;
pub mod remote;
pub mod ssh;
