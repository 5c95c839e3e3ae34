//! `${...}` templates: `${NAME}` and `${NAME:-default}` from the caller's environment
//! (resolved by the client), `${svc.addr}`-style service references (resolved by the
//! daemon for each caller), and `$$` for a literal `$`.
//!
//! A `$` followed by anything else is kept as it is, so `$HOME` or a price like `$5` in
//! an argument needs no escaping.

/// Why a template could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A `${` without its `}`.
    #[error("unterminated `${{` at byte {0}")]
    Unterminated(usize),
    /// `${}`, `${a b}`, `${a:b}` and the like.
    #[error("bad reference `{0}`: expected ${{NAME}} or ${{NAME:-default}}")]
    BadReference(String),
    /// A variable that is not set and has no default.
    #[error("unresolved variable `{0}`")]
    Unresolved(String),
    /// A `${svc.field}` reference in a field the daemon does not template.
    #[error("`${{{0}}}` cannot be used here: service references work in env, args, binary and health checks")]
    ServiceRefNotAllowed(String),
    /// `${svc.field}` with a field other than addr, host, port, bind.
    #[error("unknown field `{field}` in `${{{reference}}}`: expected addr, host, port or bind")]
    UnknownField {
        /// The whole reference, `svc.field`.
        reference: String,
        /// The field.
        field: String,
    },
    /// `${svc.field}` naming a service that does not exist or has no address yet.
    #[error("cannot resolve `${{{0}}}`: no such service, or it has no address yet")]
    UnknownService(String),
}

/// The fields a service reference may name.
pub const SERVICE_FIELDS: [&str; 4] = ["addr", "host", "port", "bind"];

/// One piece of a template.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Piece<'a> {
    /// Literal text.
    Text(&'a str),
    /// `$$`.
    Dollar,
    /// `${name}` or `${name:-default}`; `raw` is the whole reference as written.
    Ref {
        name: &'a str,
        default: Option<&'a str>,
        raw: &'a str,
    },
}

/// Splits a template into pieces.
fn pieces(input: &str) -> Result<Vec<Piece<'_>>, TemplateError> {
    let mut out = Vec::new();
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        let after = &rest[i + 1..];
        out.push(Piece::Text(&rest[..i]));
        if let Some(tail) = after.strip_prefix('$') {
            out.push(Piece::Dollar);
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let start = input.len() - rest.len() + i;
            let len = closing_brace(body).ok_or(TemplateError::Unterminated(start))?;
            out.push(reference(&rest[i..i + 3 + len])?);
            rest = &body[len + 1..];
        } else {
            // A lone `$` is literal text.
            out.push(Piece::Text("$"));
            rest = after;
        }
    }
    out.push(Piece::Text(rest));
    out.retain(|p| *p != Piece::Text(""));
    Ok(out)
}

/// Length of the body before the `}` that closes a `${`, counting nested `${...}` in a
/// default (`${PORT:-${BASE_PORT}}`).
fn closing_brace(body: &str) -> Option<usize> {
    let mut depth = 0usize;
    let bytes = body.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        match b {
            b'{' if i > 0 && bytes[i - 1] == b'$' => depth += 1,
            b'}' if depth == 0 => return Some(i),
            b'}' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// Parses `${name}` / `${name:-default}` (given whole, braces included).
fn reference(raw: &str) -> Result<Piece<'_>, TemplateError> {
    let body = &raw[2..raw.len() - 1];
    let (name, default) = match body.split_once(":-") {
        Some((name, default)) => (name, Some(default)),
        None => (body, None),
    };
    let valid = !name.is_empty()
        && !name.starts_with('.')
        && !name.ends_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !valid {
        return Err(TemplateError::BadReference(raw.to_owned()));
    }
    Ok(Piece::Ref { name, default, raw })
}

/// Resolves one reference given its name, default and raw text.
type Resolve<'r> = dyn FnMut(&str, Option<&str>, &str) -> Result<String, TemplateError> + 'r;

/// Renders pieces: `$$` becomes `dollar`, each reference what `resolve` returns for it.
fn render(input: &str, dollar: &str, resolve: &mut Resolve<'_>) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(input.len());
    for piece in pieces(input)? {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Dollar => out.push_str(dollar),
            Piece::Ref { name, default, raw } => out.push_str(&resolve(name, default, raw)?),
        }
    }
    Ok(out)
}

/// Expands `${NAME}` and `${NAME:-default}` (the default applies when NAME is unset or
/// empty, as in POSIX shells, and may itself hold references) and turns `$$` into `$`.
/// An unset `${NAME}` without a default is an error naming it.
pub fn expand(
    input: &str,
    lookup: &mut dyn FnMut(&str) -> Option<String>,
) -> Result<String, TemplateError> {
    render(input, "$", &mut |name, default, _| match (
        lookup(name).filter(|v| !v.is_empty() || default.is_none()),
        default,
    ) {
        (Some(value), _) => Ok(value),
        (None, Some(default)) => expand(default, lookup),
        (None, None) => Err(TemplateError::Unresolved(name.to_owned())),
    })
}

/// The names referenced by a template, in order, including those in defaults
/// (`${A:-${B}}` gives `A`, `B`). A malformed template has none: `expand` reports it.
pub fn references(input: &str) -> Vec<String> {
    let mut names = Vec::new();
    for piece in pieces(input).unwrap_or_default() {
        if let Piece::Ref { name, default, .. } = piece {
            names.push(name.to_owned());
            names.extend(default.map(references).unwrap_or_default());
        }
    }
    names
}

/// The client's pass over a field the daemon templates again: expands `${NAME}` without
/// a dot from `lookup` and keeps `${svc.field}` references and `$$` as written. A `$` in
/// a substituted value is written `$$`, so the daemon's pass gives it back unchanged.
pub(crate) fn expand_env_keeping_refs(
    input: &str,
    lookup: &mut dyn FnMut(&str) -> Option<String>,
) -> Result<String, TemplateError> {
    render(input, "$$", &mut |name, default, raw| {
        if name.contains('.') {
            return Ok(raw.to_owned());
        }
        match (
            lookup(name).filter(|v| !v.is_empty() || default.is_none()),
            default,
        ) {
            (Some(value), _) => Ok(value.replace('$', "$$")),
            (None, Some(default)) => expand_env_keeping_refs(default, lookup),
            (None, None) => Err(TemplateError::Unresolved(name.to_owned())),
        }
    })
}

/// The client's pass over a field the daemon uses as it is (paths, images, hosts):
/// like [`expand`], but a `${svc.field}` reference is an error that says so.
pub(crate) fn expand_env_only(
    input: &str,
    lookup: &mut dyn FnMut(&str) -> Option<String>,
) -> Result<String, TemplateError> {
    if let Some(name) = references(input).into_iter().find(|n| n.contains('.')) {
        return Err(TemplateError::ServiceRefNotAllowed(name));
    }
    expand(input, lookup)
}

/// The daemon's pass: resolves `${svc.field}` (field: addr, host, port or bind; `svc`
/// may be `self`) through `lookup(service, field)` and turns `$$` into `$`. A plain
/// `${VAR}` left over (the client resolves those) is an "unresolved variable" error.
pub fn expand_service_refs(
    input: &str,
    lookup: &mut dyn FnMut(&str, &str) -> Option<String>,
) -> Result<String, TemplateError> {
    render(input, "$", &mut |name, default, _| {
        let Some((service, field)) = name.rsplit_once('.') else {
            return Err(TemplateError::Unresolved(name.to_owned()));
        };
        if !SERVICE_FIELDS.contains(&field) {
            return Err(TemplateError::UnknownField {
                reference: name.to_owned(),
                field: field.to_owned(),
            });
        }
        match (lookup(service, field), default) {
            (Some(value), _) => Ok(value),
            (None, Some(default)) => expand_service_refs(default, lookup),
            (None, None) => Err(TemplateError::UnknownService(name.to_owned())),
        }
    })
}

/// A package's `config/*.template` file: `${svc.field}` resolved as in
/// [`expand_service_refs`], and `${VAR}` (with `${VAR:-default}`) from the service's
/// environment `vars` (its `DEP_ADDR`s and its own `env`); `$$` is a `$`.
pub fn expand_config_template(
    input: &str,
    lookup: &mut dyn FnMut(&str, &str) -> Option<String>,
    vars: &dyn Fn(&str) -> Option<String>,
) -> Result<String, TemplateError> {
    render(input, "$", &mut |name, default, _| {
        if name.contains('.') {
            return expand_service_refs(&format!("${{{name}}}"), lookup);
        }
        match (vars(name), default) {
            (Some(value), _) => Ok(value),
            (None, Some(default)) => expand_config_template(default, lookup, vars),
            (None, None) => Err(TemplateError::Unresolved(name.to_owned())),
        }
    })
}

/// The prefix of the variables injected for a dependency: upper case, `-` (and any
/// other character not allowed in a variable name) as `_`. `api-server` gives
/// `API_SERVER`, for `API_SERVER_ADDR`.
pub fn env_var_prefix(service: &str) -> String {
    service
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENV: [(&str, &str); 4] = [
        ("HOME", "/home/u"),
        ("EMPTY", ""),
        ("PORT", "8080"),
        ("PRICE", "$5"),
    ];

    fn env(name: &str) -> Option<String> {
        ENV.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }

    #[track_caller]
    fn check(input: &str, expected: Result<&str, &str>) {
        let got = expand(input, &mut env).map_err(|e| e.to_string());
        assert_eq!(
            got.as_deref().map_err(String::as_str),
            expected,
            "input {input:?}"
        );
    }

    #[test]
    fn config_templates_take_service_refs_and_the_service_environment() {
        let mut lookup = |svc: &str, field: &str| {
            (svc == "db" && field == "addr").then(|| "10.0.0.2:5432".to_owned())
        };
        let vars = |k: &str| (k == "PORT").then(|| "8080".to_owned());
        let out = expand_config_template(
            "db = ${db.addr}\nport = ${PORT}\nmode = ${MODE:-dev}\ncost = $$5\n",
            &mut lookup,
            &vars,
        )
        .unwrap();
        assert_eq!(
            out,
            "db = 10.0.0.2:5432\nport = 8080\nmode = dev\ncost = $5\n"
        );
        assert!(expand_config_template("${NOPE}", &mut lookup, &vars).is_err());
    }

    #[test]
    fn expands_variables_defaults_and_escapes() {
        check("plain", Ok("plain"));
        check("", Ok(""));
        check("${HOME}/x", Ok("/home/u/x"));
        check("a${PORT}b${PORT}", Ok("a8080b8080"));
        check("${UNSET:-dflt}", Ok("dflt"));
        check("${EMPTY:-dflt}", Ok("dflt"));
        check("${EMPTY}", Ok(""));
        check("${PORT:-1}", Ok("8080"));
        check("${UNSET:-}", Ok(""));
        check("${UNSET:-${PORT}}", Ok("8080"));
        check("${UNSET:-a:-b}", Ok("a:-b"));
        check("$${HOME}", Ok("${HOME}"));
        check("$$", Ok("$"));
        check("$HOME $5 a$", Ok("$HOME $5 a$"));
        check("${PRICE}", Ok("$5"));
    }

    #[test]
    fn reports_bad_templates() {
        check("${UNSET}", Err("unresolved variable `UNSET`"));
        check("x ${HOME", Err("unterminated `${` at byte 2"));
        check(
            "${}",
            Err("bad reference `${}`: expected ${NAME} or ${NAME:-default}"),
        );
        check(
            "${a b}",
            Err("bad reference `${a b}`: expected ${NAME} or ${NAME:-default}"),
        );
        check(
            "${a:b}",
            Err("bad reference `${a:b}`: expected ${NAME} or ${NAME:-default}"),
        );
        check(
            "${UNSET:-${ALSO_UNSET}}",
            Err("unresolved variable `ALSO_UNSET`"),
        );
    }

    #[test]
    fn lists_references() {
        assert_eq!(
            references("${A}-${b.addr}:${C:-${D}} $$ ${E"),
            Vec::<String>::new()
        );
        assert_eq!(
            references("${A}-${b.addr}:${C:-${D}} $${X}"),
            ["A", "b.addr", "C", "D"]
        );
    }

    #[track_caller]
    fn check_keeping(input: &str, expected: Result<&str, &str>) {
        let got = expand_env_keeping_refs(input, &mut env).map_err(|e| e.to_string());
        assert_eq!(
            got.as_deref().map_err(String::as_str),
            expected,
            "input {input:?}"
        );
    }

    #[test]
    fn client_pass_keeps_service_refs() {
        check_keeping(
            "http://${self.addr}/health",
            Ok("http://${self.addr}/health"),
        );
        check_keeping("${db.addr:-x} ${PORT}", Ok("${db.addr:-x} 8080"));
        check_keeping("$${HOME} ${PRICE}", Ok("$${HOME} $$5"));
        check_keeping("${UNSET}", Err("unresolved variable `UNSET`"));
        let only = expand_env_only("${HOME}/${db.addr}", &mut env).map_err(|e| e.to_string());
        assert!(only
            .unwrap_err()
            .starts_with("`${db.addr}` cannot be used here"));
    }

    #[track_caller]
    fn check_refs(input: &str, expected: Result<&str, &str>) {
        let mut lookup = |svc: &str, field: &str| match (svc, field) {
            ("db", "addr") => Some("127.0.0.1:5432".to_owned()),
            ("self", "port") => Some("8080".to_owned()),
            ("api-server", "host") => Some("10.0.0.2".to_owned()),
            _ => None,
        };
        let got = expand_service_refs(input, &mut lookup).map_err(|e| e.to_string());
        assert_eq!(
            got.as_deref().map_err(String::as_str),
            expected,
            "input {input:?}"
        );
    }

    #[test]
    fn daemon_pass_resolves_service_refs() {
        check_refs("postgres://${db.addr}/x", Ok("postgres://127.0.0.1:5432/x"));
        check_refs("--port=${self.port}", Ok("--port=8080"));
        check_refs("${api-server.host}", Ok("10.0.0.2"));
        check_refs("$${db.addr} $$5", Ok("${db.addr} $5"));
        check_refs("${cache.addr:-none}", Ok("none"));
        check_refs(
            "${db.url}",
            Err("unknown field `url` in `${db.url}`: expected addr, host, port or bind"),
        );
        check_refs(
            "${cache.addr}",
            Err("cannot resolve `${cache.addr}`: no such service, or it has no address yet"),
        );
        check_refs("${HOME}", Err("unresolved variable `HOME`"));
    }

    #[test]
    fn prefixes() {
        for (service, prefix) in [
            ("api-server", "API_SERVER"),
            ("db", "DB"),
            ("load_gen2", "LOAD_GEN2"),
        ] {
            assert_eq!(env_var_prefix(service), prefix);
        }
    }
}
