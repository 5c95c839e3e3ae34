//! Printing for people (tables, progress lines) and for scripts (`--json`).

use std::io::IsTerminal;

use comfy_table::{Cell, Color, ContentArrangement, Table};
use protocol::methods::{DiscoveredService, Health, ServiceInfo, ServiceState};

/// Whether to use colour: stdout is a terminal and NO_COLOR is unset.
pub fn color() -> bool {
    std::env::var_os("NO_COLOR").is_none() && std::io::stdout().is_terminal()
}

/// Prints a value as pretty JSON.
pub fn json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("values serialize")
    );
}

/// A table with the house style.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(comfy_table::presets::UTF8_FULL_CONDENSED)
        .set_header(header.to_vec());
    if !color() {
        t.force_no_tty();
    }
    // Fit a real terminal's width; a terminal that reports no useful width (a pty
    // without a size, as under `script` or some CI runners) would squeeze every
    // column to one character, so the table keeps its natural width there.
    if t.width().is_some_and(|w| w >= 40) {
        t.set_content_arrangement(ContentArrangement::Dynamic);
    }
    t
}

fn state_cell(state: ServiceState) -> Cell {
    let text = format!("{state:?}").to_lowercase();
    let color = match state {
        ServiceState::Running => Color::Green,
        ServiceState::Failed => Color::Red,
        ServiceState::Starting | ServiceState::Stopping => Color::Yellow,
        _ => Color::Reset,
    };
    Cell::new(text).fg(color)
}

fn health_cell(health: Health) -> Cell {
    let text = format!("{health:?}").to_lowercase();
    let color = match health {
        Health::Healthy => Color::Green,
        Health::Unhealthy => Color::Red,
        Health::Unknown => Color::Reset,
    };
    Cell::new(text).fg(color)
}

/// The `ps` table.
pub fn services_table(list: &[ServiceInfo], show_stack: bool) -> Table {
    let mut header = vec![
        "service", "state", "health", "backend", "address", "pid", "restarts", "note",
    ];
    if show_stack {
        header.insert(0, "stack");
    }
    let mut t = table(&header);
    for s in list {
        let mut row = vec![
            Cell::new(&s.name),
            state_cell(s.state),
            health_cell(s.health),
            Cell::new(&s.backend),
            Cell::new(s.address.as_deref().unwrap_or("-")),
            // A pid on another host is shown with that host.
            Cell::new(match (s.pid, &s.host) {
                (Some(p), Some(host)) => format!("{p}@{host}"),
                (Some(p), None) => p.to_string(),
                (None, _) => "-".to_owned(),
            }),
            Cell::new(s.restarts),
            Cell::new(s.reason.as_deref().unwrap_or("")),
        ];
        if show_stack {
            row.insert(0, Cell::new(&s.stack));
        }
        t.add_row(row);
    }
    t
}

/// What `harness discover --save` writes: a harness config whose services are the
/// found ones as `external` targets (one per address; a known kind wins over
/// `unknown`), ready to copy into a stack or to validate as it is.
pub fn discovered_yaml(found: &[DiscoveredService]) -> String {
    let mut by_address: std::collections::BTreeMap<&str, &DiscoveredService> = Default::default();
    for s in found {
        let keep = by_address
            .get(s.address.as_str())
            .is_some_and(|kept| kept.kind != "unknown");
        if !keep {
            by_address.insert(&s.address, s);
        }
    }
    let mut out = format!(
        "# Found by `harness discover` at {}: {} service(s).\n\
         # Each is an `external` target: the harness checks it and injects its address, and\n\
         # never starts or stops it.\nservices:\n",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
        by_address.len()
    );
    for (address, s) in by_address {
        let kind = if s.kind == "unknown" {
            "service"
        } else {
            &s.kind
        };
        let name: String = format!("{kind}-{address}")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        // JSON strings are YAML strings: quoting is safe for any address or detail.
        let quoted = serde_json::to_string(address).expect("strings serialize");
        let detail = s.detail.as_deref().unwrap_or_default().replace('\n', " ");
        out.push_str(&format!(
            "  {name}:   # {}: {detail}\n    target: {{ external: {{ address: {quoted} }} }}\n",
            s.found_by
        ));
    }
    out
}
