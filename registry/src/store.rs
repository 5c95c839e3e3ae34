//! The registry snapshot (`registry.json`): its records, versioned schema and the store
//! that loads and saves it crash-safely.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use protocol::config::StackConfig;
use protocol::methods::{Health, ServiceState};
use serde::{Deserialize, Serialize};

use crate::fsutil::{
    corrupt_name, ensure_dir, io_err, make_private, remove_stale, rename_synced, replace,
};
use crate::{Recovery, RegistryError};

/// Schema version of `registry.json` written by this crate. Bump it (and add a migration
/// in [`Store::open`]) when a change would not read back with the old code's file.
pub const SCHEMA_VERSION: u32 = 1;

const REGISTRY_FILE: &str = "registry.json";
const REGISTRY_TMP: &str = "registry.json.tmp";
const INSTANCE_FILE: &str = "instance";
const INSTANCE_TMP: &str = "instance.tmp";

/// The whole persisted registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Schema version ([`SCHEMA_VERSION`]).
    pub schema: u32,
    /// Daemon instance id (16 hex chars), stable for the state directory; every marker the
    /// daemon leaves (labels, `HARNESS_INSTANCE`) carries it.
    pub instance: String,
    /// Stacks by name.
    #[serde(default)]
    pub stacks: BTreeMap<String, StackRecord>,
}

impl Snapshot {
    /// An empty registry of the current schema for `instance`.
    pub fn new(instance: String) -> Snapshot {
        Snapshot {
            schema: SCHEMA_VERSION,
            instance,
            stacks: BTreeMap::new(),
        }
    }
}

/// A stack: its config as last applied and its services' states.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StackRecord {
    /// Stack name.
    pub name: String,
    /// Where the config came from (file path), when known.
    #[serde(default)]
    pub source: Option<String>,
    /// The config as last applied.
    pub config: StackConfig,
    /// Services by name.
    #[serde(default)]
    pub services: BTreeMap<String, ServiceRecord>,
}

/// What the daemon knows about one service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// Lifecycle state.
    pub state: ServiceState,
    /// Health.
    pub health: Health,
    /// Why it is in this state, when it was not asked for (crash, failed dependency).
    #[serde(default)]
    pub reason: Option<String>,
    /// When it entered this state (RFC 3339).
    pub since: String,
    /// Port assigned to it, including one picked automatically.
    #[serde(default)]
    pub port: Option<u16>,
    /// Restarts by the restart policy since it was last healthy.
    #[serde(default)]
    pub restarts: u32,
    /// Exit code of its last run, when it exited normally.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// The backend's opaque record of what runs (pids, run dir); the deployer defines it.
    #[serde(default)]
    pub process: Option<serde_json::Value>,
    /// Its address on the WireGuard mesh, when mesh nodes reach it through a relay on
    /// the hub (an alias there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_alias: Option<String>,
}

impl ServiceRecord {
    /// A service just registered at `since`: never run, health unknown.
    pub fn new(since: String) -> ServiceRecord {
        ServiceRecord {
            state: ServiceState::Registered,
            health: Health::Unknown,
            reason: None,
            since,
            port: None,
            restarts: 0,
            exit_code: None,
            process: None,
            mesh_alias: None,
        }
    }
}

/// The snapshot file `registry.json` of a state directory.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    tmp: PathBuf,
    // Reused between saves: snapshots have similar sizes.
    buf: Vec<u8>,
}

impl Store {
    /// Loads `<dir>/registry.json` (creating `dir`, mode 0700, if missing).
    ///
    /// On first start it makes a new random instance id, stores it in `<dir>/instance`
    /// and writes an empty snapshot at once. A leftover `registry.json.tmp` (a crash
    /// during a save; `registry.json` still holds the previous snapshot) is removed.
    ///
    /// A file that is not valid JSON, does not match the schema, or has a schema newer
    /// than [`SCHEMA_VERSION`] is never silently reset: it is renamed to
    /// `registry.json.corrupt-<unix time>`, reported as a [`Recovery`], and the daemon
    /// starts from an empty snapshot that keeps the instance id from `<dir>/instance`.
    /// A file that cannot be read at all (permissions) is an error.
    pub fn open(dir: &Path) -> Result<(Store, Snapshot, Vec<Recovery>), RegistryError> {
        ensure_dir(dir)?;
        let mut store = Store {
            path: dir.join(REGISTRY_FILE),
            tmp: dir.join(REGISTRY_TMP),
            buf: Vec::new(),
        };
        if remove_stale(&store.tmp)? {
            tracing::info!(
                "removed {}, left by a save a crash interrupted",
                store.tmp.display()
            );
        }
        let mut recoveries: Vec<Recovery> = make_private(&store.path)?.into_iter().collect();
        let instance_path = dir.join(INSTANCE_FILE);
        let stored_instance = read_instance(&instance_path, &mut recoveries)?;

        let loaded = match fs::read(&store.path) {
            Ok(bytes) => match decode(&bytes) {
                Ok(snapshot) => Some(snapshot),
                Err(problem) => {
                    let moved_to = corrupt_name(&store.path);
                    rename_synced(&store.path, &moved_to)?;
                    recoveries.push(Recovery {
                        path: store.path.clone(),
                        moved_to: Some(moved_to),
                        problem: format!("{problem}; starting from an empty registry"),
                    });
                    None
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&store.path)(e)),
        };
        let fresh = loaded.is_none();
        let snapshot = match loaded {
            Some(snapshot) => snapshot,
            None => Snapshot::new(match &stored_instance {
                Some(id) => id.clone(),
                None => {
                    let id = new_instance_id().map_err(io_err(&instance_path))?;
                    if !recoveries.is_empty() {
                        // Not a first start: things the old daemon left are not ours now.
                        recoveries.push(Recovery {
                            path: instance_path.clone(),
                            moved_to: None,
                            problem: format!(
                                "the old instance id is lost; the daemon is now instance {id} \
                                 and will not recognize what the old one started"
                            ),
                        });
                    }
                    id
                }
            }),
        };

        // The snapshot's id wins: the records in it (process markers) carry it.
        if stored_instance.as_deref() != Some(snapshot.instance.as_str()) {
            if let Some(old) = &stored_instance {
                recoveries.push(Recovery {
                    path: instance_path.clone(),
                    moved_to: None,
                    problem: format!(
                        "instance id {old} differs from {} in {REGISTRY_FILE}; rewritten",
                        snapshot.instance
                    ),
                });
            }
            let line = format!("{}\n", snapshot.instance);
            replace(&instance_path, &dir.join(INSTANCE_TMP), line.as_bytes())?;
        }
        if fresh {
            store.save(&snapshot)?;
        }
        Ok((store, snapshot, recoveries))
    }

    /// Writes `snapshot` crash-safely: `registry.json.tmp`, fsync, rename over
    /// `registry.json`, fsync of the directory. On error (disk full, read-only) the old
    /// snapshot is still in place and the error names the file.
    pub fn save(&mut self, snapshot: &Snapshot) -> Result<(), RegistryError> {
        self.buf.clear();
        // Pretty: a human reading the state during an incident matters more than the
        // bytes, and the cost is small next to the fsync.
        serde_json::to_writer_pretty(&mut self.buf, snapshot).map_err(|e| {
            RegistryError::Corrupt {
                path: self.path.clone(),
                problem: format!("cannot encode: {e}"),
            }
        })?;
        self.buf.push(b'\n');
        replace(&self.path, &self.tmp, &self.buf)?;
        Ok(())
    }
}

/// Decodes a registry file of any known schema into the current one.
fn decode(bytes: &[u8]) -> Result<Snapshot, String> {
    #[derive(Deserialize)]
    struct Version {
        schema: u32,
    }
    let version: Version =
        serde_json::from_slice(bytes).map_err(|e| format!("not a registry file: {e}"))?;
    // Migration point: when schema 2 comes, decode 1 with the v1 types kept in a module
    // of their own and convert, so every old file reads back.
    match version.schema {
        SCHEMA_VERSION => serde_json::from_slice(bytes)
            .map_err(|e| format!("does not match registry schema {SCHEMA_VERSION}: {e}")),
        newer if newer > SCHEMA_VERSION => Err(format!(
            "written by a newer harnessd (schema {newer}; this one reads up to {SCHEMA_VERSION})"
        )),
        other => Err(format!("unknown registry schema {other}")),
    }
}

/// Reads `<dir>/instance`; a missing file is `None`, a malformed one is reported and
/// treated as missing.
fn read_instance(
    path: &Path,
    recoveries: &mut Vec<Recovery>,
) -> Result<Option<String>, RegistryError> {
    match fs::read_to_string(path) {
        Ok(s) if is_instance_id(s.trim()) => Ok(Some(s.trim().to_owned())),
        Ok(s) => {
            recoveries.push(Recovery {
                path: path.to_owned(),
                moved_to: None,
                problem: format!("not an instance id: {:?}; replaced", s.trim()),
            });
            Ok(None)
        }
        // Non-UTF-8 content is as malformed as any other garbage.
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            recoveries.push(Recovery {
                path: path.to_owned(),
                moved_to: None,
                problem: "not an instance id (binary data); replaced".into(),
            });
            Ok(None)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn is_instance_id(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A new random instance id: 16 lower-case hex chars.
fn new_instance_id() -> io::Result<String> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| io::Error::other(format!("no randomness: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Instant;

    fn sample(instance: &str, services: usize) -> Snapshot {
        let mut snap = Snapshot::new(instance.into());
        let mut stack = StackRecord {
            name: "demo".into(),
            source: Some("/srv/demo/harness.yaml".into()),
            config: StackConfig::default(),
            services: BTreeMap::new(),
        };
        for i in 0..services {
            let mut rec = ServiceRecord::new("2026-01-01T00:00:00.000Z".into());
            rec.state = ServiceState::Running;
            rec.health = Health::Healthy;
            rec.port = Some(10_000 + i as u16);
            rec.process =
                Some(serde_json::json!({ "pid": 1000 + i, "run_dir": format!("/run/x/{i}") }));
            stack.services.insert(format!("svc-{i:04}"), rec);
        }
        snap.stacks.insert("demo".into(), stack);
        snap
    }

    #[test]
    fn first_start_writes_instance_and_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let (_store, snap, rec) = Store::open(tmp.path()).unwrap();
        assert!(rec.is_empty(), "{rec:?}");
        assert!(is_instance_id(&snap.instance), "{}", snap.instance);
        assert_eq!(snap.schema, SCHEMA_VERSION);
        assert!(snap.stacks.is_empty());
        let id = fs::read_to_string(tmp.path().join(INSTANCE_FILE)).unwrap();
        assert_eq!(id.trim(), snap.instance);
        for f in [INSTANCE_FILE, REGISTRY_FILE] {
            let mode = fs::metadata(tmp.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
    }

    #[test]
    fn persists_across_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut store, snap, _) = Store::open(tmp.path()).unwrap();
        let saved = sample(&snap.instance, 3);
        store.save(&saved).unwrap();
        drop(store);
        let (_store, loaded, rec) = Store::open(tmp.path()).unwrap();
        assert!(rec.is_empty(), "{rec:?}");
        assert_eq!(loaded, saved);
    }

    /// The registry holds configs with secrets: one others could read is made private
    /// at open, and that is reported.
    #[test]
    fn a_registry_others_can_read_is_made_private_and_reported() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let (mut store, snap, _) = Store::open(tmp.path()).unwrap();
        store.save(&sample(&snap.instance, 1)).unwrap();
        drop(store);
        let path = tmp.path().join(REGISTRY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let (_store, loaded, rec) = Store::open(tmp.path()).unwrap();
        assert_eq!(loaded, sample(&snap.instance, 1));
        assert_eq!(rec.len(), 1, "{rec:?}");
        assert!(rec[0].problem.contains("mode 644"), "{}", rec[0]);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn crash_between_write_and_rename_loses_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut store, snap, _) = Store::open(tmp.path()).unwrap();
        let saved = sample(&snap.instance, 2);
        store.save(&saved).unwrap();
        drop(store);
        // A save that died after writing part of the temp file.
        fs::write(
            tmp.path().join(REGISTRY_TMP),
            b"{\"schema\":1,\"instance\":\"ab",
        )
        .unwrap();
        let (_store, loaded, rec) = Store::open(tmp.path()).unwrap();
        assert!(rec.is_empty(), "{rec:?}");
        assert_eq!(loaded, saved);
        assert!(!tmp.path().join(REGISTRY_TMP).exists());
    }

    #[track_caller]
    fn check_moved_aside(content: &[u8], problem_has: &str) {
        let tmp = tempfile::tempdir().unwrap();
        let (_, snap, _) = Store::open(tmp.path()).unwrap();
        let path = tmp.path().join(REGISTRY_FILE);
        fs::write(&path, content).unwrap();

        let (_store, loaded, rec) = Store::open(tmp.path()).unwrap();
        assert_eq!(rec.len(), 1, "{rec:?}");
        assert_eq!(rec[0].path, path);
        assert!(rec[0].problem.contains(problem_has), "{}", rec[0]);
        let moved = rec[0].moved_to.as_ref().unwrap();
        assert!(
            moved.to_str().unwrap().contains("registry.json.corrupt-"),
            "{moved:?}"
        );
        assert_eq!(fs::read(moved).unwrap(), content);
        // Empty, but the same daemon identity.
        assert_eq!(loaded, Snapshot::new(snap.instance.clone()));
        // The empty snapshot was written, so the next start is clean.
        let (_, again, rec) = Store::open(tmp.path()).unwrap();
        assert!(rec.is_empty(), "{rec:?}");
        assert_eq!(again, loaded);
    }

    #[test]
    fn corrupt_file_is_moved_aside_not_reset() {
        check_moved_aside(b"{\"schema\":1,\"instance\":\"0123", "not a registry file");
        check_moved_aside(b"\0\0\0\0", "not a registry file");
        check_moved_aside(
            b"{\"schema\":1,\"instance\":7}",
            "does not match registry schema 1",
        );
        check_moved_aside(
            b"{\"schema\":9,\"instance\":\"x\"}",
            "newer harnessd (schema 9",
        );
        check_moved_aside(
            b"{\"schema\":0,\"instance\":\"x\"}",
            "unknown registry schema 0",
        );
    }

    #[test]
    fn corrupt_file_without_instance_file_reports_the_new_identity() {
        let tmp = tempfile::tempdir().unwrap();
        let (_, old, _) = Store::open(tmp.path()).unwrap();
        fs::remove_file(tmp.path().join(INSTANCE_FILE)).unwrap();
        fs::write(tmp.path().join(REGISTRY_FILE), b"{").unwrap();
        let (_, new, rec) = Store::open(tmp.path()).unwrap();
        assert_ne!(new.instance, old.instance);
        assert_eq!(rec.len(), 2, "{rec:?}");
        assert!(
            rec[1].problem.contains("old instance id is lost"),
            "{}",
            rec[1]
        );
    }

    #[test]
    fn unreadable_file_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        // A directory where the file should be: reading fails, and moving it would hide a
        // problem a human must look at.
        fs::create_dir(tmp.path().join(REGISTRY_FILE)).unwrap();
        let err = Store::open(tmp.path()).unwrap_err();
        assert!(err.to_string().contains("registry.json"), "{err}");
    }

    #[test]
    fn instance_file_disagreeing_is_rewritten_and_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let (_, snap, _) = Store::open(tmp.path()).unwrap();
        fs::write(tmp.path().join(INSTANCE_FILE), "garbage\n").unwrap();
        let (_, loaded, rec) = Store::open(tmp.path()).unwrap();
        assert_eq!(loaded.instance, snap.instance);
        assert_eq!(rec.len(), 1, "{rec:?}");
        let id = fs::read_to_string(tmp.path().join(INSTANCE_FILE)).unwrap();
        assert_eq!(id.trim(), snap.instance);
    }

    #[test]
    fn save_time_of_1000_services() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut store, snap, _) = Store::open(tmp.path()).unwrap();
        let big = sample(&snap.instance, 1000);
        store.save(&big).unwrap();
        let runs = 5;
        let start = Instant::now();
        for _ in 0..runs {
            store.save(&big).unwrap();
        }
        let size = fs::metadata(tmp.path().join(REGISTRY_FILE)).unwrap().len();
        // Printed, not asserted: it depends on the disk (run with --nocapture to see it).
        println!(
            "save of 1000 services ({size} bytes): {:?} each",
            start.elapsed() / runs
        );
    }
}
