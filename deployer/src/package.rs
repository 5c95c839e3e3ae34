//! Service packages: `NAME-VERSION.tar.zst` (or `.tar.gz`, or a plain tar) holding
//! manifest.yaml, bin/, scripts/start.sh, scripts/stop.sh, scripts/health.sh, config/
//! and lib/.
//!
//! Every entry is checked before anything reaches a host: absolute paths, `..`,
//! links that leave the package and device files make the whole package refused.
//! What is sent is a plain tar rewritten from the checked entries, so the host's
//! `tar` never sees an entry that was not checked and needs no zstd.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, Write};
use std::path::{Component, Path, PathBuf};

use protocol::package::Manifest;
use sha2::{Digest, Sha256};

use crate::DeployError;

/// The script every package must have.
pub const START_SCRIPT: &str = "scripts/start.sh";

/// A checked package.
#[derive(Debug, Clone, PartialEq)]
pub struct Package {
    /// The archive.
    pub path: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// SHA-256 of the archive, hex.
    pub sha256: String,
    /// Size of the archive in bytes.
    pub bytes: u64,
    /// Whether it has scripts/health.sh.
    pub has_health: bool,
    /// Whether it has scripts/stop.sh.
    pub has_stop: bool,
    /// The one top directory wrapping every entry (`tar czf x.tgz mydir`), empty when
    /// there is none; found once by [`open`] so later reads need not look again.
    top: PathBuf,
}

impl Package {
    /// `<version>-<first 12 hex digits of the hash>`: a release's directory name.
    pub fn release(&self) -> String {
        format!("{}-{}", self.manifest.version, &self.sha256[..12])
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> DeployError {
    DeployError::BadPackage {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Makes `NAME-VERSION.tar.zst` in `out_dir` from the package directory `dir`. The
/// same contents always give the same archive (sorted entries, no times or owners).
pub fn build(dir: &Path, out_dir: &Path) -> Result<Package, DeployError> {
    let manifest_path = dir.join("manifest.yaml");
    let text = std::fs::read_to_string(&manifest_path).map_err(|e| {
        bad(
            dir,
            format!("cannot read manifest.yaml ({e}); a package directory needs one with `name` and `version`"),
        )
    })?;
    let manifest = Manifest::parse(&text).map_err(|e| bad(dir, e))?;
    if !dir.join(START_SCRIPT).is_file() {
        return Err(bad(dir, format!("{START_SCRIPT} is missing")));
    }
    let mut files = Vec::new();
    walk(dir, Path::new(""), &mut files).map_err(|e| bad(dir, e.to_string()))?;
    files.sort();
    std::fs::create_dir_all(out_dir).map_err(|source| DeployError::WriteFile {
        path: out_dir.to_owned(),
        source,
    })?;
    let out = out_dir.join(format!("{}.tar.zst", manifest.stem()));
    let write_err = |source| DeployError::WriteFile {
        path: out.clone(),
        source,
    };
    let file = File::create(&out).map_err(write_err)?;
    let encoder = zstd::Encoder::new(file, 3).map_err(write_err)?;
    let mut tar = tar::Builder::new(encoder);
    tar.follow_symlinks(false);
    for rel in &files {
        let full = dir.join(rel);
        let meta = std::fs::symlink_metadata(&full).map_err(write_err)?;
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(&meta, tar::HeaderMode::Deterministic);
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&full).map_err(write_err)?;
            check_link(rel, &target).map_err(|r| bad(dir, r))?;
            tar.append_link(&mut header, rel, &target)
                .map_err(write_err)?;
        } else if meta.is_dir() {
            tar.append_data(&mut header, rel, io::empty())
                .map_err(write_err)?;
        } else if meta.is_file() {
            tar.append_data(&mut header, rel, File::open(&full).map_err(write_err)?)
                .map_err(write_err)?;
        } else {
            return Err(bad(
                dir,
                format!(
                    "{}: only files, directories and links go in a package",
                    rel.display()
                ),
            ));
        }
    }
    tar.into_inner()
        .and_then(|e| e.finish())
        .and_then(|f| f.sync_all())
        .map_err(write_err)?;
    open(&out)
}

fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in std::fs::read_dir(root.join(rel))? {
        let entry = entry?;
        let rel = rel.join(entry.file_name());
        let is_dir = entry.file_type()?.is_dir();
        out.push(rel.clone());
        if is_dir {
            walk(root, &rel, out)?;
        }
    }
    Ok(())
}

/// The archive's bytes, decompressed by what its first bytes say it is.
fn reader(path: &Path) -> Result<Box<dyn Read>, DeployError> {
    let read_err = |source| DeployError::ReadFile {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic).map_err(read_err)?;
    file.rewind().map_err(read_err)?;
    let file = BufReader::new(file);
    Ok(match &magic[..n] {
        [0x28, 0xb5, 0x2f, 0xfd] => Box::new(zstd::Decoder::with_buffer(file).map_err(read_err)?),
        [0x1f, 0x8b, ..] => Box::new(flate2::read::GzDecoder::new(file)),
        _ => Box::new(file),
    })
}

/// An entry's path inside the package: `./` and one top directory wrapping
/// everything (`tar czf x.tgz mydir`) are dropped by `prefix`.
fn inner_path(raw: &Path, prefix: &Path) -> Option<PathBuf> {
    let raw = raw.strip_prefix(".").unwrap_or(raw);
    let rel = raw.strip_prefix(prefix).ok()?;
    (!rel.as_os_str().is_empty()).then(|| rel.to_owned())
}

/// Refuses a path that is absolute or climbs out with `..`.
fn check_path(rel: &Path) -> Result<(), String> {
    for c in rel.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => {
                return Err(format!("{}: `..` in a path", rel.display()));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!("{}: absolute path", rel.display()));
            }
        }
    }
    Ok(())
}

/// Refuses a link at `rel` whose `target` would point outside the package.
fn check_link(rel: &Path, target: &Path) -> Result<(), String> {
    if target.is_absolute() {
        return Err(format!(
            "{}: link to the absolute path {}",
            rel.display(),
            target.display()
        ));
    }
    let mut depth = rel.components().count() as i64 - 1;
    for c in target.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 {
            return Err(format!(
                "{}: link to {} leaves the package",
                rel.display(),
                target.display()
            ));
        }
    }
    Ok(())
}

/// Reads and checks a package: its manifest, and every entry (see the module doc).
pub fn open(path: &Path) -> Result<Package, DeployError> {
    let prefix = top_prefix(path)?;
    let mut manifest_text = None;
    let (mut has_start, mut has_health, mut has_stop) = (false, false, false);
    visit(path, &prefix, |rel, entry| {
        if rel == Path::new("manifest.yaml") {
            let mut text = String::new();
            entry
                .take(1 << 20)
                .read_to_string(&mut text)
                .map_err(|e| format!("manifest.yaml: {e}"))?;
            manifest_text = Some(text);
        }
        has_start |= rel == Path::new(START_SCRIPT);
        has_health |= rel == Path::new("scripts/health.sh");
        has_stop |= rel == Path::new("scripts/stop.sh");
        Ok(())
    })?;
    let text = manifest_text.ok_or_else(|| bad(path, "no manifest.yaml in the package"))?;
    let manifest = Manifest::parse(&text).map_err(|e| bad(path, e))?;
    if !has_start {
        return Err(bad(path, format!("{START_SCRIPT} is missing")));
    }
    let (sha256, bytes) = hash_file(path)?;
    Ok(Package {
        path: path.to_owned(),
        manifest,
        sha256,
        bytes,
        has_health,
        has_stop,
        top: prefix,
    })
}

/// `mydir/` when every entry is inside that one directory and manifest.yaml is not
/// at the top; empty otherwise.
fn top_prefix(path: &Path) -> Result<PathBuf, DeployError> {
    let mut tops = std::collections::BTreeSet::new();
    let mut manifest_at_top = false;
    visit(path, Path::new(""), |rel, _| {
        manifest_at_top |= rel == Path::new("manifest.yaml");
        if let Some(Component::Normal(first)) = rel.components().next() {
            tops.insert(PathBuf::from(first));
        }
        Ok(())
    })?;
    Ok(match (manifest_at_top, tops.len()) {
        (false, 1) => tops.pop_first().unwrap_or_default(),
        _ => PathBuf::new(),
    })
}

/// Calls `f` for every entry (path inside the package, the entry) after checking it;
/// the first bad entry ends the walk with its reason.
fn visit(
    path: &Path,
    prefix: &Path,
    mut f: impl FnMut(&Path, &mut tar::Entry<'_, Box<dyn Read>>) -> Result<(), String>,
) -> Result<(), DeployError> {
    let mut archive = tar::Archive::new(reader(path)?);
    let entries = archive
        .entries()
        .map_err(|e| bad(path, format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(path, format!("unreadable entry: {e}")))?;
        let raw = entry
            .path()
            .map_err(|e| bad(path, format!("unreadable entry name: {e}")))?
            .into_owned();
        check_path(&raw).map_err(|r| bad(path, r))?;
        let Some(rel) = inner_path(&raw, prefix) else {
            continue;
        };
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Regular | tar::EntryType::Directory | tar::EntryType::Continuous => {}
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| bad(path, e.to_string()))?
                    .ok_or_else(|| bad(path, format!("{}: link without a target", rel.display())))?
                    .into_owned();
                if kind == tar::EntryType::Link {
                    // A hard link names another entry of the archive.
                    check_path(&target).map_err(|r| bad(path, r))?;
                    inner_path(&target, prefix).ok_or_else(|| {
                        bad(
                            path,
                            format!("{}: hard link leaves the package", rel.display()),
                        )
                    })?;
                } else {
                    check_link(&rel, &target).map_err(|r| bad(path, r))?;
                }
            }
            other => {
                return Err(bad(
                    path,
                    format!(
                        "{}: {other:?} entries (devices, fifos...) are not allowed in a package",
                        rel.display()
                    ),
                ))
            }
        }
        f(&rel, &mut entry).map_err(|r| bad(path, r))?;
    }
    Ok(())
}

/// The package's `config/**/*.template` files: (path inside the package, text).
pub fn templates(pkg: &Package) -> Result<Vec<(PathBuf, String)>, DeployError> {
    let prefix = &pkg.top;
    let mut out = Vec::new();
    visit(&pkg.path, prefix, |rel, entry| {
        let is_template = rel.starts_with("config")
            && rel.extension().is_some_and(|e| e == "template")
            && entry.header().entry_type() == tar::EntryType::Regular;
        if is_template {
            let mut text = String::new();
            entry
                .take(1 << 20)
                .read_to_string(&mut text)
                .map_err(|e| format!("{}: {e}", rel.display()))?;
            out.push((rel.to_owned(), text));
        }
        Ok(())
    })?;
    Ok(out)
}

fn hash_file(path: &Path) -> Result<(String, u64), DeployError> {
    let mut file = File::open(path).map_err(|source| DeployError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    let mut hasher = Sha256::new();
    let bytes = io::copy(&mut file, &mut hasher).map_err(|source| DeployError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    Ok((format!("{:x}", hasher.finalize()), bytes))
}

/// Writes the checked entries of `pkg` as a plain tar to `out` (what is sent to a
/// host); returns the bytes written.
pub fn write_plain_tar(pkg: &Package, out: impl Write) -> Result<u64, DeployError> {
    let prefix = &pkg.top;
    // The first write error, kept whole: it is the receiving side's (a cut
    // connection), not the package's.
    let failed: std::cell::RefCell<Option<io::Error>> = Default::default();
    let write_err = |e: io::Error| {
        let text = e.to_string();
        failed.borrow_mut().get_or_insert(e);
        text
    };
    let mut tar = tar::Builder::new(Counting {
        inner: out,
        bytes: 0,
    });
    let visited = visit(&pkg.path, prefix, |rel, entry| {
        let mut header = entry.header().clone();
        match header.entry_type() {
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(write_err)?
                    .unwrap_or_default()
                    .into_owned();
                let target = if header.entry_type() == tar::EntryType::Link {
                    inner_path(&target, prefix).unwrap_or(target)
                } else {
                    target
                };
                tar.append_link(&mut header, rel, target).map_err(write_err)
            }
            _ => tar.append_data(&mut header, rel, entry).map_err(write_err),
        }
    });
    if let Some(source) = failed.into_inner() {
        return Err(DeployError::WriteFile {
            path: pkg.path.clone(),
            source,
        });
    }
    visited?;
    let mut counting = tar.into_inner().map_err(|source| DeployError::WriteFile {
        path: pkg.path.clone(),
        source,
    })?;
    counting.flush().map_err(|source| DeployError::WriteFile {
        path: pkg.path.clone(),
        source,
    })?;
    Ok(counting.bytes)
}

/// A writer that counts what passes through it.
struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn package_dir(dir: &Path) {
        std::fs::create_dir_all(dir.join("scripts")).unwrap();
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::write(dir.join("manifest.yaml"), "name: web\nversion: 1.0.0\n").unwrap();
        std::fs::write(dir.join("scripts/start.sh"), "#!/bin/sh\nexec sleep 100\n").unwrap();
        std::fs::write(dir.join("bin/web"), "binary").unwrap();
        std::os::unix::fs::symlink("web", dir.join("bin/web-link")).unwrap();
    }

    #[test]
    fn the_same_contents_build_the_same_archive() {
        let tmp = tempfile::tempdir().unwrap();
        package_dir(&tmp.path().join("src"));
        let a = build(&tmp.path().join("src"), &tmp.path().join("a")).unwrap();
        let b = build(&tmp.path().join("src"), &tmp.path().join("b")).unwrap();
        assert_eq!(a.sha256, b.sha256);
        assert_eq!(a.path.file_name().unwrap(), "web-1.0.0.tar.zst");
        assert!(!a.has_health);
        let plain = tmp.path().join("plain.tar");
        write_plain_tar(&a, File::create(&plain).unwrap()).unwrap();
        assert_eq!(open(&plain).unwrap().manifest, a.manifest);
    }

    #[test]
    fn plain_tar_and_gzip_packages_with_a_top_directory_open() {
        let tmp = tempfile::tempdir().unwrap();
        package_dir(&tmp.path().join("web"));
        let out = tmp.path().join("web.tar.gz");
        let status = std::process::Command::new("tar")
            .arg("czf")
            .arg(&out)
            .arg("-C")
            .arg(tmp.path())
            .arg("web")
            .status()
            .unwrap();
        assert!(status.success());
        let pkg = open(&out).unwrap();
        assert_eq!(pkg.manifest.name, "web");
    }

    fn tar_with(path: &Path, name: &str, kind: tar::EntryType, link: Option<&str>) {
        let mut tar = tar::Builder::new(File::create(path).unwrap());
        for (n, body) in [
            ("manifest.yaml", &b"name: x\nversion: 1\n"[..]),
            ("scripts/start.sh", b"#!/bin/sh\n"),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o755);
            h.set_cksum();
            tar.append_data(&mut h, n, body).unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(0);
        h.set_mode(0o644);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        // set_path refuses `..`; write the raw name as a hostile archive would.
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        tar.append(&h, io::empty()).unwrap();
        tar.finish().unwrap();
    }

    #[test]
    fn hostile_entries_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let cases = [
            ("../evil", tar::EntryType::Regular, None, "`..`"),
            ("/etc/evil", tar::EntryType::Regular, None, "absolute"),
            (
                "bin/x",
                tar::EntryType::Symlink,
                Some("../../etc/passwd"),
                "leaves",
            ),
            (
                "bin/y",
                tar::EntryType::Symlink,
                Some("/etc/passwd"),
                "absolute",
            ),
            ("bin/z", tar::EntryType::Link, Some("../outside"), "`..`"),
            ("dev/null", tar::EntryType::Char, None, "not allowed"),
            ("fifo", tar::EntryType::Fifo, None, "not allowed"),
        ];
        for (i, (name, kind, link, want)) in cases.into_iter().enumerate() {
            let path = tmp.path().join(format!("{i}.tar"));
            tar_with(&path, name, kind, link);
            let err = open(&path).expect_err(name).to_string();
            assert!(err.contains(want), "{name}: {err}");
        }
        let ok = tmp.path().join("ok.tar");
        tar_with(
            &ok,
            "bin/inside",
            tar::EntryType::Symlink,
            Some("../scripts/start.sh"),
        );
        open(&ok).expect("a link inside the package is fine");
    }
}
