//! Clients on other machines: harnessd serves only loopback unless it is given a CA
//! for client certificates (mutual TLS), and then a client that is not on loopback
//! must present a certificate that CA signed, besides the token.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness_client::Client;
use protocol::DaemonFile;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tests::testbed::TestBed;

/// A CA (its PEM written to `dir/NAME-ca.pem`) and a client certificate it signed
/// (`dir/NAME-client.pem`, `dir/NAME-client.key`); the three paths.
fn client_pki(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut client = CertificateParams::new(vec![format!("{name}-client")]).unwrap();
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = client.signed_by(&key, &issuer).unwrap();
    let paths = (
        dir.join(format!("{name}-ca.pem")),
        dir.join(format!("{name}-client.pem")),
        dir.join(format!("{name}-client.key")),
    );
    std::fs::write(&paths.0, ca_pem).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    (paths.0, paths.1, paths.2)
}

#[test]
fn a_listen_beyond_loopback_is_refused_without_a_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(tests::bin("harnessd"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--listen", "0.0.0.0:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("harnessd served 0.0.0.0 without mutual TLS");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("0.0.0.0:0") && stderr.contains("--client-ca"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("state/daemon.json").exists(),
        "it told clients where to connect"
    );
}

#[test]
fn clients_on_other_machines_need_a_certificate_of_the_client_ca() {
    // The bed's bridge gives this machine an address that is not loopback.
    let bed = TestBed::new(0);
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = client_pki(dir.path(), "ours");
    let (_, other_cert, other_key) = client_pki(dir.path(), "other");
    let d = tests::TestDaemon::start_with_args(&[
        "--listen",
        "0.0.0.0:0",
        "--client-ca",
        ca.to_str().unwrap(),
        "--server-name",
        &bed.hub_address,
    ]);
    // A local client needs no certificate.
    assert!(d.info.url.starts_with("wss://127.0.0.1:"), "{}", d.info.url);
    let local = d.client();
    smol::block_on(local.call::<serde_json::Value>("daemon.status", serde_json::json!({})))
        .expect("a local client is served");

    let port = d.info.url.rsplit(':').next().unwrap().to_owned();
    let remote = |cert: Option<&PathBuf>, key: Option<&PathBuf>| DaemonFile {
        url: format!("wss://{}:{port}", bed.hub_address),
        client_cert: cert.cloned(),
        client_key: key.cloned(),
        ..d.info.clone()
    };
    let connect = |info: &DaemonFile| smol::block_on(Client::connect(info, "remote"));

    // Without a certificate: told what is missing at hello.
    let refused = connect(&remote(None, None))
        .err()
        .expect("served without a certificate");
    let message = refused.to_string();
    assert!(
        message.contains("client certificate") && message.contains(&bed.hub_address),
        "{message}"
    );
    // With one of another CA: the daemon ends the TLS session with an alert.
    let refused = connect(&remote(Some(&other_cert), Some(&other_key)))
        .err()
        .expect("served with a certificate of another CA");
    assert!(refused.to_string().contains("fatal alert"), "{refused}");
    // With one of the client CA (and the token): served, like a local client.
    let client =
        connect(&remote(Some(&cert), Some(&key))).expect("a remote client with a certificate");
    smol::block_on(client.call::<serde_json::Value>("daemon.status", serde_json::json!({})))
        .expect("the remote client is served");
    // And the daemon kept serving throughout.
    smol::block_on(local.call::<serde_json::Value>("daemon.status", serde_json::json!({})))
        .expect("still serving");
}

/// Only TLS 1.3 is spoken (rustls is built without TLS 1.2): a client that offers
/// nothing newer than TLS 1.2 is refused in the handshake, one that offers TLS 1.3 is
/// served, and the daemon goes on serving.
#[test]
fn a_client_that_offers_only_tls_1_2_is_refused() {
    let d = tests::TestDaemon::start();
    let authority = d
        .info
        .url
        .trim_start_matches("wss://")
        .trim_end_matches('/');
    let handshake = |version: &str| {
        Command::new("openssl")
            .args(["s_client", "-connect", authority, version, "-CAfile"])
            .arg(&d.info.ca)
            .stdin(Stdio::null())
            .output()
            .expect("openssl s_client")
    };
    let old = handshake("-tls1_2");
    let said = String::from_utf8_lossy(&old.stderr);
    assert!(!old.status.success(), "a TLS 1.2 handshake succeeded");
    assert!(said.contains("alert protocol version"), "{said}");
    let new = handshake("-tls1_3");
    let shown = String::from_utf8_lossy(&new.stdout);
    assert!(
        new.status.success(),
        "{}",
        String::from_utf8_lossy(&new.stderr)
    );
    assert!(
        shown.contains("TLSv1.3") && shown.contains("Verify return code: 0 (ok)"),
        "{shown}"
    );
    smol::block_on(
        d.client()
            .call::<serde_json::Value>("daemon.status", serde_json::json!({})),
    )
    .expect("still serving");
}
