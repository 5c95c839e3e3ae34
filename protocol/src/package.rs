//! The package manifest (`manifest.yaml` at the root of a service package).
//!
//! ```yaml
//! name: api-server          # required
//! version: 1.0.0            # required
//! port: 8080
//! os: linux                 # checked against the host before upload
//! arch: x86_64              # x86_64/amd64, aarch64/arm64, ...
//! system_requires: [curl, /usr/lib/libpq.so.5]   # commands on PATH or paths
//! network: { wireguard: true }
//! ```

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What a package says about itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Package name (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// Version (same characters as the name, plus `+`).
    pub version: String,
    /// The port the service listens on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Operating system it runs on (`linux`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    /// CPU architecture (`x86_64`, `aarch64`...; `amd64`, `arm64` are the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// Commands (on PATH) or files the host must have.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub system_requires: Vec<String>,
    /// Network needs, e.g. `{wireguard: true}`; the harness writes the node's own
    /// configuration into the release at deploy time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<serde_json::Value>,
}

impl Manifest {
    /// Parses and checks `manifest.yaml`; the error names what is wrong.
    pub fn parse(text: &str) -> Result<Manifest, String> {
        let m: Manifest = serde_saphyr::from_str(text).map_err(|e| {
            let e = e.to_string();
            if e.contains("missing field") {
                format!("manifest.yaml: {e} (a package needs `name` and `version`)")
            } else {
                format!("manifest.yaml: {e}")
            }
        })?;
        for (key, value, extra) in [("name", &m.name, ""), ("version", &m.version, "+")] {
            let ok = !value.is_empty()
                && value.len() <= 100
                && !value.starts_with('.')
                && value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c) || extra.contains(c));
            if !ok {
                return Err(format!(
                    "manifest.yaml: bad {key} {value:?}: use letters, digits, `-`, `_` and `.`{}, not starting with `.`",
                    if extra.is_empty() { "" } else { " (and `+`)" }
                ));
            }
        }
        if m.port == Some(0) {
            return Err("manifest.yaml: bad port 0".to_owned());
        }
        Ok(m)
    }

    /// `NAME-VERSION`, the package's file stem.
    pub fn stem(&self) -> String {
        format!("{}-{}", self.name, self.version)
    }

    /// Whether a host whose `uname -s` and `uname -m` say `os` and `arch` can run it.
    pub fn runs_on(&self, os: &str, arch: &str) -> bool {
        let os_ok = self
            .os
            .as_deref()
            .is_none_or(|want| want.eq_ignore_ascii_case(os));
        let arch_ok = self
            .arch
            .as_deref()
            .is_none_or(|want| canonical_arch(want) == canonical_arch(arch));
        os_ok && arch_ok
    }
}

/// One name per architecture: Debian's and Go's names mapped to the kernel's.
fn canonical_arch(arch: &str) -> String {
    match arch.to_ascii_lowercase().as_str() {
        "amd64" | "x86-64" | "x64" => "x86_64".to_owned(),
        "arm64" => "aarch64".to_owned(),
        "armhf" | "armv7" => "armv7l".to_owned(),
        "i386" | "i686" | "x86" => "i686".to_owned(),
        other => other.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_need_a_name_and_a_version() {
        let m = Manifest::parse("name: api\nversion: 1.2.0\nport: 80\narch: amd64\n").unwrap();
        assert_eq!((m.stem().as_str(), m.port), ("api-1.2.0", Some(80)));
        assert!(m.runs_on("Linux", "x86_64"));
        assert!(!m.runs_on("Linux", "aarch64"));
        let e = Manifest::parse("version: 1\n").unwrap_err();
        assert!(e.contains("name") && e.contains("needs"), "{e}");
        let e = Manifest::parse("name: api\n").unwrap_err();
        assert!(e.contains("version"), "{e}");
        let e = Manifest::parse("name: ../../etc\nversion: 1\n").unwrap_err();
        assert!(e.contains("bad name"), "{e}");
        let e = Manifest::parse("name: a\nversion: 1\nfoo: 2\n").unwrap_err();
        assert!(e.contains("foo"), "{e}");
    }
}
