//! The backends that run services; one module each.

pub mod process;
