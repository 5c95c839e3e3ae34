//! A package archive as deploy opens and checks it (plain tar; gzip and zstd by their
//! magic bytes), then rewritten as the plain tar that is sent to a host.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("fuzz-1.0.0.tar");
    std::fs::write(&path, data).expect("write");
    if let Ok(pkg) = deployer::package::open(&path) {
        let _ = deployer::package::templates(&pkg);
        let _ = deployer::package::write_plain_tar(&pkg, std::io::sink());
    }
});
