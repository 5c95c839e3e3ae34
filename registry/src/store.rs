//! The registry on disk: a small header (`registry.json`: schema and instance id) and
//! one file per stack (`stacks/<name>.json`), their records and versioned schema, and
//! the store that loads them and saves, crash-safely, the stacks that changed.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use protocol::config::StackConfig;
use protocol::methods::{Health, ServiceState};
use serde::{Deserialize, Serialize};

use crate::fsutil::{
    corrupt_name, ensure_dir, io_err, make_private, remove_stale, rename_synced, replace, sync_dir,
    sync_directory, write_synced,
};
use crate::{Recovery, RegistryError};

/// Schema version of the files this crate writes. Bump it (and add a migration in
/// [`Store::open`]) when a change would not read back with the old code's files.
///
/// Schema 1 kept every stack in `registry.json`; [`Store::open`] moves such a registry
/// into stack files.
pub const SCHEMA_VERSION: u32 = 2;

const HEADER_FILE: &str = "registry.json";
const HEADER_TMP: &str = "registry.json.tmp";
const STACKS_DIR: &str = "stacks";
const STACKS_STAGING_DIR: &str = "stacks.new";
const STACK_SUFFIX: &str = ".json";
const STACK_TMP_SUFFIX: &str = ".json.tmp";
const INSTANCE_FILE: &str = "instance";
const INSTANCE_TMP: &str = "instance.tmp";

/// Bytes of a stack name kept as they are in its file name; every other byte is
/// percent-encoded, so any name is one safe file name and no name can look like a
/// temp (`.json.tmp`) or moved-aside (`.json.corrupt-…`) file.
const FILE_NAME_KEEPS: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_');

/// The whole registry as the daemon holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Daemon instance id (16 hex chars), stable for the state directory; every marker the
    /// daemon leaves (labels, `HARNESS_INSTANCE`) carries it.
    pub instance: String,
    /// Stacks by name. Shared, so that the copy a save takes costs nothing; change one
    /// through [`Arc::make_mut`]. [`Store::save`] writes only the stacks whose address
    /// differs from the one it last wrote (or read), and `make_mut` gives a stack the
    /// store has seen a new address (the store keeps a weak pointer to it).
    pub stacks: BTreeMap<String, Arc<StackRecord>>,
}

impl Snapshot {
    /// An empty registry for `instance`.
    pub fn new(instance: String) -> Snapshot {
        Snapshot {
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

impl StackRecord {
    /// A stack just registered: no config applied yet, no services.
    pub fn new(name: &str) -> StackRecord {
        StackRecord {
            name: name.to_owned(),
            source: None,
            config: StackConfig::default(),
            services: BTreeMap::new(),
        }
    }
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

/// `registry.json` as this schema writes it.
#[derive(Serialize, Deserialize)]
struct Header {
    schema: u32,
    instance: String,
}

/// `registry.json` of schema 1: every stack in it.
#[derive(Deserialize)]
struct HeaderV1 {
    instance: String,
    #[serde(default)]
    stacks: BTreeMap<String, StackRecord>,
}

/// What `registry.json` held.
enum LoadedHeader {
    Current { instance: String },
    V1(HeaderV1),
}

/// A stack file as written.
#[derive(Serialize)]
struct StackFileOut<'a> {
    schema: u32,
    stack: &'a StackRecord,
}

/// A stack file as read.
#[derive(Deserialize)]
struct StackFileIn {
    stack: StackRecord,
}

/// The registry files of a state directory.
#[derive(Debug)]
pub struct Store {
    header: PathBuf,
    header_tmp: PathBuf,
    stacks_dir: PathBuf,
    /// Each stack as this store last wrote (or read) it. Weak: the daemon's copy alone
    /// keeps a record alive, so changing it moves it instead of cloning it, and the
    /// allocation a weak pointer holds is never reused by another record.
    saved: HashMap<String, Weak<StackRecord>>,
    // Reused between saves: stack files have similar sizes.
    buf: Vec<u8>,
}

impl Store {
    /// Loads the registry of `dir` (creating `dir`, mode 0700, if missing).
    ///
    /// On first start it makes a new random instance id, stores it in `<dir>/instance`
    /// and writes `registry.json` at once. Leftover temp files (a crash during a save; the
    /// previous file is still in place) are removed. A schema 1 registry is moved into
    /// stack files.
    ///
    /// A file that is not valid JSON or does not match its schema is never silently
    /// reset: it is renamed to `<file>.corrupt-<unix time>` and reported as a
    /// [`Recovery`]. A bad stack file costs only that stack; a bad `registry.json` costs
    /// nothing but its own content (the instance id is kept in `<dir>/instance`). A file
    /// that cannot be read at all (permissions), or one of a schema newer than
    /// [`SCHEMA_VERSION`] (a newer harnessd's: starting without it would take the
    /// services that one runs for strays), is an error, and the file is left as it is.
    pub fn open(dir: &Path) -> Result<(Store, Snapshot, Vec<Recovery>), RegistryError> {
        ensure_dir(dir)?;
        let mut store = Store {
            header: dir.join(HEADER_FILE),
            header_tmp: dir.join(HEADER_TMP),
            stacks_dir: dir.join(STACKS_DIR),
            saved: HashMap::new(),
            buf: Vec::new(),
        };
        if remove_stale(&store.header_tmp)? {
            tracing::info!(
                "removed {}, left by a save a crash interrupted",
                store.header_tmp.display()
            );
        }
        let mut recoveries: Vec<Recovery> = make_private(&store.header)?.into_iter().collect();
        let instance_path = dir.join(INSTANCE_FILE);
        let stored_instance = read_instance(&instance_path, &mut recoveries)?;

        let loaded = match fs::read(&store.header) {
            Ok(bytes) => match decode_header(&bytes) {
                Ok(header) => Some(header),
                Err(Unreadable::Newer(schema)) => return Err(newer_schema(&store.header, schema)),
                Err(Unreadable::Corrupt(problem)) => {
                    let moved_to = corrupt_name(&store.header);
                    rename_synced(&store.header, &moved_to)?;
                    recoveries.push(Recovery {
                        path: store.header.clone(),
                        moved_to: Some(moved_to),
                        problem: format!(
                            "{problem}; rewritten, the stacks are read from their own files"
                        ),
                    });
                    None
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&store.header)(e)),
        };
        let write_header = !matches!(loaded, Some(LoadedHeader::Current { .. }));
        let (header_instance, v1) = match loaded {
            Some(LoadedHeader::Current { instance }) => (Some(instance), None),
            Some(LoadedHeader::V1(v1)) => (Some(v1.instance.clone()), Some(v1)),
            None => (None, None),
        };
        let instance = match header_instance {
            Some(id) => id,
            None => match &stored_instance {
                Some(id) => id.clone(),
                None => {
                    let id = new_instance_id().map_err(io_err(&instance_path))?;
                    if !recoveries.is_empty() || store.stacks_dir.exists() {
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
            },
        };

        // The registry's id wins: the records in it (process markers) carry it.
        if stored_instance.as_deref() != Some(instance.as_str()) {
            if let Some(old) = &stored_instance {
                recoveries.push(Recovery {
                    path: instance_path.clone(),
                    moved_to: None,
                    problem: format!(
                        "instance id {old} differs from {instance} in {HEADER_FILE}; rewritten"
                    ),
                });
            }
            let line = format!("{instance}\n");
            replace(&instance_path, &dir.join(INSTANCE_TMP), line.as_bytes())?;
        }
        let mut snapshot = Snapshot::new(instance);
        match v1 {
            Some(v1) => {
                snapshot.stacks = v1
                    .stacks
                    .into_iter()
                    .map(|(name, rec)| (name, Arc::new(rec)))
                    .collect();
                store.migrate(&snapshot, &mut recoveries)?;
            }
            None => snapshot.stacks = store.load_stacks(&mut recoveries)?,
        }
        // Last: a crash before this leaves a schema 1 registry, which the next open
        // migrates again.
        if write_header {
            store.write_header(&snapshot.instance)?;
        }
        Ok((store, snapshot, recoveries))
    }

    /// Writes the stacks of `snapshot` that changed since the last save (and removes
    /// the files of stacks it no longer has), each crash-safely: `<name>.json.tmp`,
    /// fsync, rename over `<name>.json`; then one fsync of the directory. A crash at
    /// any moment leaves each stack file either old or new, never a mix. On error (disk
    /// full, read-only) the file being written still holds its previous content, the
    /// error names it, and the next save writes again every stack not yet written.
    pub fn save(&mut self, snapshot: &Snapshot) -> Result<(), RegistryError> {
        let changed: Vec<(&String, &Arc<StackRecord>)> = snapshot
            .stacks
            .iter()
            .filter(|(name, rec)| {
                !self
                    .saved
                    .get(*name)
                    .is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(rec)))
            })
            .collect();
        let removed: Vec<String> = self
            .saved
            .keys()
            .filter(|name| !snapshot.stacks.contains_key(*name))
            .cloned()
            .collect();
        if changed.is_empty() && removed.is_empty() {
            return Ok(());
        }
        self.ensure_stacks_dir()?;
        // One stack that cannot be written does not hold back the others; the first
        // error is returned.
        let mut first_error = None;
        // Every file is written and synced before any takes its place; then the
        // removals and renames follow one another with nothing slow between them. A
        // crash can leave one stack's new file beside another's old one (a mesh
        // address that one released and the other took is then claimed twice) only
        // in that short window, not across the save's fsyncs. It is not atomic.
        let mut prepared = Vec::new();
        for (name, rec) in changed {
            match self.write_stack_file(name, rec) {
                Ok(tmp) => prepared.push((name, rec, tmp)),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let mut gone = Vec::new();
        for name in removed {
            let path = self.stack_path(&name);
            match fs::remove_file(&path) {
                Ok(()) => gone.push(name),
                Err(e) if e.kind() == io::ErrorKind::NotFound => gone.push(name),
                Err(e) => {
                    first_error.get_or_insert(io_err(&path)(e));
                }
            }
        }
        let mut written: Vec<(String, Weak<StackRecord>)> = Vec::new();
        for (name, rec, tmp) in prepared {
            let path = self.stack_path(name);
            match fs::rename(&tmp, &path) {
                Ok(()) => written.push((name.clone(), Arc::downgrade(rec))),
                Err(e) => {
                    first_error.get_or_insert(io_err(&path)(e));
                }
            }
        }
        // One fsync of the directory makes every rename and removal above durable; only
        // then do they count as saved. Without it, a file written is still known to be
        // there (a removal of its stack must delete it) but not as saved (the next save
        // writes it again), and a removal is tried again.
        let synced = if written.is_empty() && gone.is_empty() {
            Ok(())
        } else {
            sync_directory(&self.stacks_dir)
        };
        for (name, weak) in written {
            let weak = if synced.is_ok() { weak } else { Weak::new() };
            self.saved.insert(name, weak);
        }
        if synced.is_ok() {
            for name in gone {
                self.saved.remove(&name);
            }
        }
        match (synced, first_error) {
            (Err(e), _) | (Ok(()), Some(e)) => Err(e),
            (Ok(()), None) => Ok(()),
        }
    }

    /// Makes `stacks/` if it is missing, and makes its creation durable (an fsync of
    /// the state directory), so that the files saved into it cannot vanish with it.
    fn ensure_stacks_dir(&self) -> Result<(), RegistryError> {
        if self.stacks_dir.is_dir() {
            return Ok(());
        }
        ensure_dir(&self.stacks_dir)?;
        sync_dir(&self.stacks_dir)
    }

    fn stack_path(&self, name: &str) -> PathBuf {
        stack_file_in(&self.stacks_dir, name, STACK_SUFFIX)
    }

    /// The file that holds stack `name` in the state directory `dir`.
    pub fn stack_file(dir: &Path, name: &str) -> PathBuf {
        stack_file_in(&dir.join(STACKS_DIR), name, STACK_SUFFIX)
    }

    /// Writes stack `name` to its temporary file, synced; returns that file's path.
    fn write_stack_file(
        &mut self,
        name: &str,
        rec: &StackRecord,
    ) -> Result<PathBuf, RegistryError> {
        let path = self.stack_path(name);
        self.buf.clear();
        // Pretty: a human reading the state during an incident matters more than the
        // bytes, and the cost is small next to the fsync.
        let file = StackFileOut {
            schema: SCHEMA_VERSION,
            stack: rec,
        };
        serde_json::to_writer_pretty(&mut self.buf, &file).map_err(|e| RegistryError::Corrupt {
            path: path.clone(),
            problem: format!("cannot encode: {e}"),
        })?;
        self.buf.push(b'\n');
        let tmp = stack_file_in(&self.stacks_dir, name, STACK_TMP_SUFFIX);
        write_synced(&tmp, &self.buf)?;
        Ok(tmp)
    }

    fn write_header(&mut self, instance: &str) -> Result<(), RegistryError> {
        let header = Header {
            schema: SCHEMA_VERSION,
            instance: instance.to_owned(),
        };
        let mut text = serde_json::to_vec_pretty(&header).expect("the header encodes");
        text.push(b'\n');
        replace(&self.header, &self.header_tmp, &text)?;
        Ok(())
    }

    /// Moves a schema 1 registry's stacks into stack files. They are written into
    /// `stacks.new/`, which takes the place of `stacks/` only once complete: a crash or
    /// an error midway leaves the schema 1 registry to migrate again, and nothing
    /// half-done in `stacks/`.
    fn migrate(
        &mut self,
        snapshot: &Snapshot,
        recoveries: &mut Vec<Recovery>,
    ) -> Result<(), RegistryError> {
        let stacks_dir = self.stacks_dir.clone();
        let staging = stacks_dir.with_file_name(STACKS_STAGING_DIR);
        match fs::remove_dir_all(&staging) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&staging)(e)),
        }
        self.stacks_dir = staging.clone();
        // Every stack is new to the store: this writes them all.
        let written = self.save(snapshot);
        self.stacks_dir = stacks_dir;
        written?;
        self.set_aside_stale_stacks(recoveries)?;
        rename_synced(&staging, &self.stacks_dir)
    }

    /// Stack files beside a schema 1 registry were not written from it (a newer
    /// harnessd's, left by a downgrade), so they are kept aside, not mixed in.
    fn set_aside_stale_stacks(&self, recoveries: &mut Vec<Recovery>) -> Result<(), RegistryError> {
        if !self.stacks_dir.exists() {
            return Ok(());
        }
        let moved_to = corrupt_name(&self.stacks_dir);
        rename_synced(&self.stacks_dir, &moved_to)?;
        recoveries.push(Recovery {
            path: self.stacks_dir.clone(),
            moved_to: Some(moved_to),
            problem: format!(
                "stack files beside a schema 1 {HEADER_FILE}, which is what this state \
                 directory's registry is; moved aside, the stacks are read from {HEADER_FILE}"
            ),
        });
        Ok(())
    }

    /// Reads every stack file; removes temp files of interrupted saves; moves aside, and
    /// reports, each file that cannot be read as a stack.
    fn load_stacks(
        &mut self,
        recoveries: &mut Vec<Recovery>,
    ) -> Result<BTreeMap<String, Arc<StackRecord>>, RegistryError> {
        let mut stacks = BTreeMap::new();
        let entries = match fs::read_dir(&self.stacks_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(stacks),
            Err(e) => return Err(io_err(&self.stacks_dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err(&self.stacks_dir))?;
            let path = entry.path();
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if file_name.ends_with(STACK_TMP_SUFFIX) {
                remove_stale(&path)?;
                tracing::info!(
                    "removed {}, left by a save a crash interrupted",
                    path.display()
                );
                continue;
            }
            // Anything else (files moved aside earlier) is left for a human.
            let Some(stem) = file_name.strip_suffix(STACK_SUFFIX) else {
                continue;
            };
            recoveries.extend(make_private(&path)?);
            // A file that cannot be read (EACCES, EIO) is an error, not a corrupt one:
            // moving it aside would drop a stack whose services still run.
            let bytes = fs::read(&path).map_err(io_err(&path))?;
            let loaded = stack_name(stem)
                .map_err(Unreadable::Corrupt)
                .and_then(|name| {
                    let rec = decode_stack(&bytes)?;
                    if rec.name != name {
                        return Err(Unreadable::Corrupt(format!(
                            "holds stack {:?}, not {name:?} as its name says",
                            rec.name
                        )));
                    }
                    Ok((name, rec))
                });
            match loaded {
                Ok((name, rec)) => {
                    let rec = Arc::new(rec);
                    self.saved.insert(name.clone(), Arc::downgrade(&rec));
                    stacks.insert(name, rec);
                }
                Err(Unreadable::Newer(schema)) => return Err(newer_schema(&path, schema)),
                Err(Unreadable::Corrupt(problem)) => {
                    let moved_to = corrupt_name(&path);
                    rename_synced(&path, &moved_to)?;
                    recoveries.push(Recovery {
                        path,
                        moved_to: Some(moved_to),
                        problem: format!("{problem}; that stack is not loaded"),
                    });
                }
            }
        }
        Ok(stacks)
    }
}

/// The file name (without `.json`) of stack `name`.
fn file_stem(name: &str) -> String {
    utf8_percent_encode(name, FILE_NAME_KEEPS).to_string()
}

fn stack_file_in(stacks_dir: &Path, name: &str, suffix: &str) -> PathBuf {
    stacks_dir.join(format!("{}{suffix}", file_stem(name)))
}

/// The stack a file name (without `.json`) is for, when this crate could have written it.
fn stack_name(stem: &str) -> Result<String, String> {
    let name = percent_decode_str(stem)
        .decode_utf8()
        .map_err(|_| "not a stack file name (not UTF-8 once decoded)".to_owned())?
        .into_owned();
    if file_stem(&name) != stem {
        return Err("not a stack file name this daemon writes".to_owned());
    }
    Ok(name)
}

/// Why a registry file was not decoded.
#[derive(Debug)]
enum Unreadable {
    /// Not a registry file of a schema this crate knows: moved aside.
    Corrupt(String),
    /// Written by a newer harnessd (its schema): left as it is, and the daemon does not
    /// start, so that nothing the newer one runs is taken for a stray.
    Newer(u32),
}

/// The `schema` of a registry file, checked to be one this crate reads.
fn schema_of(bytes: &[u8]) -> Result<u32, Unreadable> {
    #[derive(Deserialize)]
    struct Version {
        schema: u32,
    }
    let version: Version = serde_json::from_slice(bytes)
        .map_err(|e| Unreadable::Corrupt(format!("not a registry file: {e}")))?;
    match version.schema {
        0 => Err(Unreadable::Corrupt("unknown registry schema 0".into())),
        newer if newer > SCHEMA_VERSION => Err(Unreadable::Newer(newer)),
        known => Ok(known),
    }
}

fn decode_header(bytes: &[u8]) -> Result<LoadedHeader, Unreadable> {
    let schema = schema_of(bytes)?;
    let mismatch = |e: serde_json::Error| {
        Unreadable::Corrupt(format!("does not match registry schema {schema}: {e}"))
    };
    if schema == 1 {
        return serde_json::from_slice(bytes)
            .map(LoadedHeader::V1)
            .map_err(mismatch);
    }
    let header: Header = serde_json::from_slice(bytes).map_err(mismatch)?;
    Ok(LoadedHeader::Current {
        instance: header.instance,
    })
}

fn decode_stack(bytes: &[u8]) -> Result<StackRecord, Unreadable> {
    match schema_of(bytes)? {
        SCHEMA_VERSION => serde_json::from_slice::<StackFileIn>(bytes)
            .map(|f| f.stack)
            .map_err(|e| {
                Unreadable::Corrupt(format!(
                    "does not match stack file schema {SCHEMA_VERSION}: {e}"
                ))
            }),
        // Stack files came with schema 2.
        older => Err(Unreadable::Corrupt(format!(
            "unknown stack file schema {older}"
        ))),
    }
}

/// The error for a file a newer harnessd wrote.
fn newer_schema(path: &Path, schema: u32) -> RegistryError {
    RegistryError::NewerSchema {
        path: path.to_owned(),
        schema,
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
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::time::Instant;

    fn stack(name: &str, services: usize) -> StackRecord {
        let mut stack = StackRecord::new(name);
        stack.source = Some("/srv/demo/harness.yaml".into());
        for i in 0..services {
            let mut rec = ServiceRecord::new("2026-01-01T00:00:00.000Z".into());
            rec.state = ServiceState::Running;
            rec.health = Health::Healthy;
            rec.port = Some(10_000 + i as u16);
            rec.process =
                Some(serde_json::json!({ "pid": 1000 + i, "run_dir": format!("/run/x/{i}") }));
            stack.services.insert(format!("svc-{i:04}"), rec);
        }
        stack
    }

    fn sample(instance: &str, services: usize) -> Snapshot {
        let mut snap = Snapshot::new(instance.into());
        snap.stacks
            .insert("demo".into(), Arc::new(stack("demo", services)));
        snap
    }

    /// A state directory where [`sample`] with `services` was saved, and its
    /// (empty) snapshot as first opened.
    fn saved_sample(services: usize) -> (tempfile::TempDir, Snapshot) {
        let tmp = tempfile::tempdir().unwrap();
        let (mut store, snap, _) = Store::open(tmp.path()).unwrap();
        store.save(&sample(&snap.instance, services)).unwrap();
        (tmp, snap)
    }

    /// Opens `dir`, which must need no recovery.
    #[track_caller]
    fn open_clean(dir: &Path) -> Snapshot {
        let (_, snap, rec) = Store::open(dir).unwrap();
        assert!(rec.is_empty(), "{rec:?}");
        snap
    }

    fn stack_file(dir: &Path, name: &str) -> PathBuf {
        Store::stack_file(dir, name)
    }

    fn header_schema(dir: &Path) -> u32 {
        schema_of(&fs::read(dir.join(HEADER_FILE)).unwrap()).unwrap()
    }

    #[test]
    fn first_start_writes_instance_and_header() {
        let tmp = tempfile::tempdir().unwrap();
        let snap = open_clean(tmp.path());
        assert!(is_instance_id(&snap.instance), "{}", snap.instance);
        assert!(snap.stacks.is_empty());
        assert_eq!(header_schema(tmp.path()), SCHEMA_VERSION);
        let id = fs::read_to_string(tmp.path().join(INSTANCE_FILE)).unwrap();
        assert_eq!(id.trim(), snap.instance);
        for f in [INSTANCE_FILE, HEADER_FILE] {
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
        let loaded = open_clean(tmp.path());
        assert_eq!(loaded, saved);
        let mode = fs::metadata(stack_file(tmp.path(), "demo"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// A save writes the stacks that changed and no other: a rewritten file has a new
    /// inode (it was renamed over the old one), an untouched one keeps its own.
    #[test]
    fn a_save_writes_only_the_stacks_that_changed() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut store, mut snap, _) = Store::open(tmp.path()).unwrap();
        snap.stacks.insert("a".into(), Arc::new(stack("a", 2)));
        snap.stacks.insert("b".into(), Arc::new(stack("b", 2)));
        store.save(&snap).unwrap();
        let inode = |name: &str| fs::metadata(stack_file(tmp.path(), name)).unwrap().ino();
        let (a, b) = (inode("a"), inode("b"));

        // A copy held elsewhere (a save in flight) does not stop a change.
        let in_flight = snap.clone();
        Arc::make_mut(snap.stacks.get_mut("a").unwrap()).source = Some("changed".into());
        store.save(&snap).unwrap();
        assert_ne!(inode("a"), a, "the changed stack is rewritten");
        assert_eq!(inode("b"), b, "the unchanged stack is not");
        drop(in_flight);

        // Nothing changed: nothing is written.
        let a = inode("a");
        store.save(&snap).unwrap();
        assert_eq!((inode("a"), inode("b")), (a, b));

        // A change made after the save, with no other copy alive, is seen too.
        Arc::make_mut(snap.stacks.get_mut("b").unwrap()).source = None;
        store.save(&snap).unwrap();
        assert_ne!(inode("b"), b);

        snap.stacks.remove("a");
        store.save(&snap).unwrap();
        assert!(!stack_file(tmp.path(), "a").exists());
        drop(store);
        let loaded = open_clean(tmp.path());
        assert_eq!(loaded, snap);
    }

    /// Stack names are not file names: each becomes one file in `stacks/`, whatever it
    /// holds, and reads back as it was.
    #[test]
    fn any_stack_name_is_one_file_in_the_stacks_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut store, mut snap, _) = Store::open(tmp.path()).unwrap();
        let names = ["../up", "a b/c", "x.json.tmp", "Ünï", ".", "plain-name_1"];
        for n in names {
            snap.stacks.insert(n.into(), Arc::new(stack(n, 1)));
        }
        store.save(&snap).unwrap();
        let files: Vec<String> = fs::read_dir(tmp.path().join(STACKS_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(files.len(), names.len(), "{files:?}");
        for f in &files {
            let stem = f.strip_suffix(STACK_SUFFIX).unwrap();
            assert!(!stem.contains(['/', '.']), "{f}");
        }
        assert!(files.contains(&"plain-name_1.json".to_owned()), "{files:?}");
        assert!(!tmp.path().join("up.json").exists());
        drop(store);
        let loaded = open_clean(tmp.path());
        assert_eq!(loaded, snap);
    }

    /// The registry holds configs with secrets: a file others could read is made
    /// private at open, and that is reported.
    #[test]
    fn registry_files_others_can_read_are_made_private_and_reported() {
        let (tmp, snap) = saved_sample(1);
        let files = [tmp.path().join(HEADER_FILE), stack_file(tmp.path(), "demo")];
        for f in &files {
            fs::set_permissions(f, fs::Permissions::from_mode(0o644)).unwrap();
        }
        let (_store, loaded, rec) = Store::open(tmp.path()).unwrap();
        assert_eq!(loaded, sample(&snap.instance, 1));
        assert_eq!(rec.len(), 2, "{rec:?}");
        for (r, f) in rec.iter().zip(&files) {
            assert_eq!(&r.path, f);
            assert!(r.problem.contains("mode 644"), "{r}");
            let mode = fs::metadata(f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[test]
    fn crash_between_write_and_rename_loses_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut store, snap, _) = Store::open(tmp.path()).unwrap();
        let saved = sample(&snap.instance, 2);
        store.save(&saved).unwrap();
        drop(store);
        // Saves that died after writing part of their temp files.
        let stack_tmp = tmp.path().join(STACKS_DIR).join("demo.json.tmp");
        fs::write(&stack_tmp, b"{\"schema\":2,\"stack\":{\"na").unwrap();
        fs::write(tmp.path().join(HEADER_TMP), b"{\"schema\":2,\"inst").unwrap();
        let loaded = open_clean(tmp.path());
        assert_eq!(loaded, saved);
        assert!(!tmp.path().join(HEADER_TMP).exists());
        assert!(!stack_tmp.exists());
    }

    #[track_caller]
    fn check_header_moved_aside(content: &[u8], problem_has: &str) {
        let tmp = tempfile::tempdir().unwrap();
        let (mut store, snap, _) = Store::open(tmp.path()).unwrap();
        let saved = sample(&snap.instance, 2);
        store.save(&saved).unwrap();
        drop(store);
        let path = tmp.path().join(HEADER_FILE);
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
        // The same daemon identity, and the stacks from their own files.
        assert_eq!(loaded, saved);
        // The header was written again, so the next start is clean.
        let again = open_clean(tmp.path());
        assert_eq!(again, loaded);
        assert_eq!(header_schema(tmp.path()), SCHEMA_VERSION);
    }

    #[test]
    fn a_corrupt_header_is_moved_aside_and_costs_no_stack() {
        check_header_moved_aside(b"{\"schema\":2,\"instance\":\"0123", "not a registry file");
        check_header_moved_aside(b"\0\0\0\0", "not a registry file");
        check_header_moved_aside(
            b"{\"schema\":1,\"instance\":7}",
            "does not match registry schema 1",
        );
        check_header_moved_aside(
            b"{\"schema\":2,\"instance\":[]}",
            "does not match registry schema 2",
        );
        check_header_moved_aside(
            b"{\"schema\":0,\"instance\":\"x\"}",
            "unknown registry schema 0",
        );
    }

    /// A stack file that cannot be read costs that stack only: it is moved aside and
    /// reported, and the other stacks load.
    #[test]
    fn a_corrupt_stack_file_is_moved_aside_and_the_others_load() {
        for (content, problem_has) in [
            (&b"{\"schema\":2,\"stack\":{"[..], "not a registry file"),
            (
                b"{\"schema\":2,\"stack\":{\"name\":3}}",
                "does not match stack file schema 2",
            ),
            (
                b"{\"schema\":1,\"stack\":{}}",
                "unknown stack file schema 1",
            ),
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let (mut store, mut snap, _) = Store::open(tmp.path()).unwrap();
            snap.stacks
                .insert("good".into(), Arc::new(stack("good", 1)));
            snap.stacks.insert("bad".into(), Arc::new(stack("bad", 1)));
            store.save(&snap).unwrap();
            drop(store);
            let bad = stack_file(tmp.path(), "bad");
            fs::write(&bad, content).unwrap();
            let (_, loaded, rec) = Store::open(tmp.path()).unwrap();
            assert_eq!(rec.len(), 1, "{rec:?}");
            assert_eq!(rec[0].path, bad);
            assert!(rec[0].problem.contains(problem_has), "{}", rec[0]);
            assert_eq!(
                fs::read(rec[0].moved_to.as_ref().unwrap()).unwrap(),
                content
            );
            assert_eq!(loaded.stacks.keys().collect::<Vec<_>>(), ["good"]);
            // Reported once: the next start finds nothing wrong.
            let again = open_clean(tmp.path());
            assert_eq!(again, loaded);
        }
    }

    /// A newer harnessd's files are not moved aside: the daemon does not start on them
    /// (it would take the services the newer one runs for strays) and says why.
    #[test]
    fn files_of_a_newer_schema_stop_the_open_and_are_left_as_they_are() {
        let (tmp, snap) = saved_sample(1);
        let header = tmp.path().join(HEADER_FILE);
        let stack = stack_file(tmp.path(), "demo");
        for (path, content) in [
            (&header, &b"{\"schema\":9,\"instance\":\"x\"}"[..]),
            (&stack, b"{\"schema\":7,\"stack\":{}}"),
        ] {
            let before = fs::read(path).unwrap();
            fs::write(path, content).unwrap();
            let err = Store::open(tmp.path()).unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, RegistryError::NewerSchema { .. }), "{text}");
            assert!(
                text.contains(&path.display().to_string()) && text.contains("newer harnessd"),
                "{text}"
            );
            assert_eq!(fs::read(path).unwrap(), content, "left as it was");
            fs::write(path, before).unwrap();
        }
        let loaded = open_clean(tmp.path());
        assert_eq!(loaded, sample(&snap.instance, 1));
    }

    /// A stack file whose name and content disagree (renamed by hand) is not guessed at.
    #[test]
    fn a_stack_file_named_for_another_stack_is_moved_aside() {
        let (tmp, _) = saved_sample(1);
        fs::rename(
            stack_file(tmp.path(), "demo"),
            stack_file(tmp.path(), "other"),
        )
        .unwrap();
        let (_, loaded, rec) = Store::open(tmp.path()).unwrap();
        assert!(loaded.stacks.is_empty());
        assert_eq!(rec.len(), 1, "{rec:?}");
        assert!(
            rec[0].problem.contains("holds stack \"demo\""),
            "{}",
            rec[0]
        );
    }

    /// What a harnessd of schema 1 wrote: every stack in `registry.json`.
    fn v1_registry(instance: &str) -> Vec<u8> {
        let stacks: BTreeMap<&str, StackRecord> =
            [("demo", stack("demo", 2)), ("two", stack("two", 1))].into();
        serde_json::to_vec_pretty(&serde_json::json!({
            "schema": 1,
            "instance": instance,
            "stacks": stacks,
        }))
        .unwrap()
    }

    #[test]
    fn a_schema_1_registry_is_moved_into_stack_files() {
        let tmp = tempfile::tempdir().unwrap();
        let instance = "0123456789abcdef";
        let header = tmp.path().join(HEADER_FILE);
        fs::write(&header, v1_registry(instance)).unwrap();
        // As the old daemon left it: private.
        fs::set_permissions(&header, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(tmp.path().join(INSTANCE_FILE), format!("{instance}\n")).unwrap();
        let loaded = open_clean(tmp.path());
        assert_eq!(loaded.instance, instance);
        assert_eq!(*loaded.stacks["demo"], stack("demo", 2));
        assert_eq!(*loaded.stacks["two"], stack("two", 1));
        assert_eq!(header_schema(tmp.path()), SCHEMA_VERSION);
        assert!(stack_file(tmp.path(), "two").exists());
        let again = open_clean(tmp.path());
        assert_eq!(again, loaded);
    }

    /// Stack files beside a schema 1 registry (a newer harnessd ran here before an older
    /// one) are not mixed into it: they are kept aside, and the registry file decides.
    #[test]
    fn stack_files_beside_a_schema_1_registry_are_kept_aside() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut store, snap, _) = Store::open(tmp.path()).unwrap();
        let mut newer = snap.clone();
        newer
            .stacks
            .insert("stale".into(), Arc::new(stack("stale", 1)));
        store.save(&newer).unwrap();
        drop(store);
        fs::write(tmp.path().join(HEADER_FILE), v1_registry(&snap.instance)).unwrap();
        let (_, loaded, rec) = Store::open(tmp.path()).unwrap();
        assert_eq!(loaded.stacks.keys().collect::<Vec<_>>(), ["demo", "two"]);
        assert_eq!(rec.len(), 1, "{rec:?}");
        assert!(rec[0].problem.contains("schema 1"), "{}", rec[0]);
        let moved = rec[0].moved_to.as_ref().unwrap();
        assert!(moved.join("stale.json").exists(), "{moved:?}");
    }

    /// A migration a crash interrupted left `stacks.new/`: it is done again from the
    /// schema 1 registry, and the leftover is not reported as anything.
    #[test]
    fn an_interrupted_migration_is_done_again() {
        let tmp = tempfile::tempdir().unwrap();
        let (_, snap, _) = Store::open(tmp.path()).unwrap();
        fs::write(tmp.path().join(HEADER_FILE), v1_registry(&snap.instance)).unwrap();
        let staging = tmp.path().join(STACKS_STAGING_DIR);
        fs::create_dir(&staging).unwrap();
        fs::write(staging.join("demo.json.tmp"), b"{\"sch").unwrap();
        let loaded = open_clean(tmp.path());
        assert_eq!(loaded.stacks.keys().collect::<Vec<_>>(), ["demo", "two"]);
        assert!(!staging.exists());
        assert_eq!(header_schema(tmp.path()), SCHEMA_VERSION);
    }

    /// A stack file that cannot be read is an error that names it: moving it aside
    /// would drop a stack whose services may be running.
    #[test]
    fn an_unreadable_stack_file_is_an_error_and_is_left_in_place() {
        let (tmp, _) = saved_sample(1);
        let path = stack_file(tmp.path(), "demo");
        fs::remove_file(&path).unwrap();
        // A directory where the file should be: reading it fails (root reads any file).
        fs::create_dir(&path).unwrap();
        let err = Store::open(tmp.path()).unwrap_err();
        assert!(err.to_string().contains("demo.json"), "{err}");
        assert!(path.is_dir());
    }

    /// A stack that cannot be written does not hold back the others, and it is tried
    /// again by the next save.
    #[test]
    fn a_stack_that_cannot_be_written_does_not_hold_back_the_others() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut store, mut snap, _) = Store::open(tmp.path()).unwrap();
        // "a" sorts first; its file's place is taken by a directory that is not empty.
        let blocked = stack_file(tmp.path(), "a");
        fs::create_dir_all(blocked.join("x")).unwrap();
        snap.stacks.insert("a".into(), Arc::new(stack("a", 1)));
        snap.stacks.insert("b".into(), Arc::new(stack("b", 1)));
        let err = store.save(&snap).unwrap_err();
        assert!(err.to_string().contains("a.json"), "{err}");
        assert!(stack_file(tmp.path(), "b").is_file());
        fs::remove_dir_all(&blocked).unwrap();
        store.save(&snap).unwrap();
        drop(store);
        let loaded = open_clean(tmp.path());
        assert_eq!(loaded, snap);
    }

    #[test]
    fn corrupt_header_without_instance_file_reports_the_new_identity() {
        let tmp = tempfile::tempdir().unwrap();
        let (_, old, _) = Store::open(tmp.path()).unwrap();
        fs::remove_file(tmp.path().join(INSTANCE_FILE)).unwrap();
        fs::write(tmp.path().join(HEADER_FILE), b"{").unwrap();
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
        fs::create_dir(tmp.path().join(HEADER_FILE)).unwrap();
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
        let mut big = sample(&snap.instance, 1000);
        big.stacks
            .insert("small".into(), Arc::new(stack("small", 1)));
        store.save(&big).unwrap();
        let runs = 5;
        let time = |store: &mut Store, big: &mut Snapshot, name: &str| {
            let start = Instant::now();
            for i in 0..runs {
                Arc::make_mut(big.stacks.get_mut(name).unwrap()).source = Some(i.to_string());
                store.save(big).unwrap();
            }
            start.elapsed() / runs
        };
        let whole = time(&mut store, &mut big, "demo");
        let small = time(&mut store, &mut big, "small");
        let size = fs::metadata(stack_file(tmp.path(), "demo")).unwrap().len();
        // Printed, not asserted: it depends on the disk (run with --nocapture to see it).
        println!(
            "save of a changed stack of 1000 services ({size} bytes): {whole:?} each; \
             of a changed stack of 1 beside it: {small:?} each"
        );
    }
}
