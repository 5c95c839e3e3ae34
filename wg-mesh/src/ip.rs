//! ip(8), for what the data plane leaves to the kernel's tables: aliases on the device
//! and routes around the mesh subnet.

/// Runs `ip ARGS` off the async threads; on failure, what it said (or why it could
/// not run).
pub async fn run(args: Vec<String>) -> Result<(), String> {
    let out = smol::unblock(move || std::process::Command::new("ip").args(&args).output())
        .await
        .map_err(|e| format!("cannot run ip(8): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}
