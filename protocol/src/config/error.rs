//! Config errors that name the file, line, column and dotted key, plus the did-you-mean helper.

use std::fmt;

/// One problem in a config file.
///
/// Displayed as `harness.yaml:12:5: services.api.port: bad port 70000: ...`; the line and
/// column are left out when unknown (a config that came over the wire has none), the file
/// when empty (errors of a pass over an already parsed config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// File name as shown to the user.
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// Dotted path of the key, e.g. `services.api.health_check.interval` (empty for the
    /// document itself).
    pub key: String,
    /// What is wrong and, where we know it, what to write instead.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut place = self.file.clone();
        if let Some(line) = self.line {
            place.push_str(&format!(":{line}"));
            if let Some(column) = self.column {
                place.push_str(&format!(":{column}"));
            }
        }
        for part in [place.as_str(), self.key.as_str()] {
            if !part.is_empty() {
                write!(f, "{part}: ")?;
            }
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in one config file (never empty when returned as an error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// The candidate closest to `word` when it is close enough to be a likely typo
/// (at most a third of its length in edits, at least one), for "did you mean X?" hints.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .into_iter()
        // A swap of two neighbours (`wbe` for `web`) counts as one edit.
        .map(|c| (strsim::osa_distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check_hint(word: &str, expected: Option<&str>) {
        let known = [
            "health_check",
            "depends_on",
            "dependencies",
            "env",
            "env_file",
            "port",
        ];
        assert_eq!(did_you_mean(word, known).as_deref(), expected);
    }

    #[test]
    fn hints() {
        check_hint("helth_check", Some("health_check"));
        check_hint("healthcheck", Some("health_check"));
        check_hint("depends-on", Some("depends_on"));
        check_hint("envfile", Some("env_file"));
        check_hint("prt", Some("port"));
        check_hint("nev", Some("env"));
        check_hint("image", None);
        check_hint("x", None);
    }

    #[test]
    fn display() {
        let mut e = ConfigError {
            file: "harness.yaml".into(),
            line: Some(12),
            column: Some(5),
            key: "services.api.port".into(),
            message: "bad port 70000".into(),
        };
        assert_eq!(
            e.to_string(),
            "harness.yaml:12:5: services.api.port: bad port 70000"
        );
        e.line = None;
        assert_eq!(
            e.to_string(),
            "harness.yaml: services.api.port: bad port 70000"
        );
        let all = ConfigErrors(vec![e.clone(), e]);
        assert_eq!(all.to_string().lines().count(), 2);
    }
}
