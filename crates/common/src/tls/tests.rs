//! TLS in process: a tonic server behind [`incoming`], clients through [`Connector`].

use std::{path::Path, time::Duration};

use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use super::*;

/// A CA that writes PEM files.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Self { pem, issuer: Issuer::new(params, key) }
    }

    /// A certificate for `names` (server or client), as PEM certificate and key.
    fn issue(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        (params.signed_by(&key, &self.issuer).unwrap().pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Replaces `name` in `dir` by a rename, as a Secret update or an atomic writer would.
fn replace(dir: &Path, name: &str, text: &str) {
    let fresh = dir.join(format!("{name}.new"));
    std::fs::write(&fresh, text).unwrap();
    std::fs::rename(&fresh, dir.join(name)).unwrap();
}

/// A health server on a loopback port behind `tls`; its address.
async fn serve(tls: ServerTls) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(tonic::transport::Server::builder().add_service(health).serve_with_incoming(incoming(listener, tls)));
    addr
}

fn client_tls(dir: &Path, ca: &str, identity: Option<(&str, &str)>) -> ClientTls {
    let config = ClientTlsConfig {
        ca: Some(write(dir, &format!("client-ca-{}.pem", fastrand_name()), ca)),
        cert: identity.map(|(cert, _)| write(dir, &format!("c-{}.pem", fastrand_name()), cert)),
        key: identity.map(|(_, key)| write(dir, &format!("k-{}.pem", fastrand_name()), key)),
        server_name: None,
    };
    ClientTls::load(&config).unwrap().unwrap()
}

fn fastrand_name() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

async fn channel(addr: std::net::SocketAddr, tls: &ClientTls) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(Connector::new(tls.clone()))
        .await
}

async fn serving(channel: Channel) -> bool {
    HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.is_ok()
}

#[tokio::test]
async fn internal_ports_serve_only_clients_with_a_mesh_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (mesh, other) = (Ca::new("mesh"), Ca::new("other"));
    let (cert, key) = mesh.issue(&["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    let config = TlsConfig {
        cert: Some(write(dir.path(), "server.pem", &cert)),
        key: Some(write(dir.path(), "server-key.pem", &key)),
        client_ca: Some(write(dir.path(), "ca.pem", &mesh.pem)),
        health_listen: None,
    };
    let tls = ServerTls::load(&config, &[ALPN_H2]).unwrap().unwrap();
    assert!(tls.mutual());
    let addr = serve(tls).await;

    let (client_cert, client_key) = mesh.issue(&["client"], ExtendedKeyUsagePurpose::ClientAuth);
    let member = client_tls(dir.path(), &mesh.pem, Some((&client_cert, &client_key)));
    assert!(serving(channel(addr, &member).await.unwrap()).await, "a mesh client is refused");

    let anonymous = client_tls(dir.path(), &mesh.pem, None);
    let refused = match channel(addr, &anonymous).await {
        Ok(channel) => !serving(channel).await,
        Err(_) => true,
    };
    assert!(refused, "a client without a certificate was served");

    let (foreign_cert, foreign_key) = other.issue(&["client"], ExtendedKeyUsagePurpose::ClientAuth);
    let foreign = client_tls(dir.path(), &mesh.pem, Some((&foreign_cert, &foreign_key)));
    let refused = match channel(addr, &foreign).await {
        Ok(channel) => !serving(channel).await,
        Err(_) => true,
    };
    assert!(refused, "a client with another CA's certificate was served");

    let plaintext = Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await;
    let refused = match plaintext {
        Ok(channel) => !serving(channel).await,
        Err(_) => true,
    };
    assert!(refused, "a plaintext client was served");
}

#[tokio::test]
async fn a_certificate_replaced_on_disk_serves_new_connections_and_spares_open_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (old_ca, new_ca) = (Ca::new("old"), Ca::new("new"));
    let (cert, key) = old_ca.issue(&["127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    let config = TlsConfig {
        cert: Some(write(dir.path(), "tls.crt", &cert)),
        key: Some(write(dir.path(), "tls.key", &key)),
        client_ca: None,
        health_listen: None,
    };
    let addr = serve(ServerTls::load(&config, &[ALPN_H2]).unwrap().unwrap()).await;
    let trusts_old = client_tls(dir.path(), &old_ca.pem, None);
    let trusts_new = client_tls(dir.path(), &new_ca.pem, None);
    let open = channel(addr, &trusts_old).await.unwrap();
    assert!(serving(open.clone()).await);
    assert!(channel(addr, &trusts_new).await.is_err(), "the new CA's client trusted the old certificate");

    // The key first, then the certificate: the pair in between does not match and is kept out.
    let (cert, key) = new_ca.issue(&["127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    replace(dir.path(), "tls.key", &key);
    replace(dir.path(), "tls.crt", &cert);
    let mut switched = false;
    for _ in 0..250 {
        if let Ok(channel) = channel(addr, &trusts_new).await
            && serving(channel).await
        {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(switched, "new connections never got the new certificate");
    assert!(serving(open).await, "the connection opened before the change was dropped");
    assert!(channel(addr, &trusts_old).await.is_err(), "new connections still get the old certificate");
}

#[test]
fn broken_settings_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("mesh");
    let (cert, key) = ca.issue(&["localhost"], ExtendedKeyUsagePurpose::ServerAuth);
    let (_, other_key) = ca.issue(&["localhost"], ExtendedKeyUsagePurpose::ServerAuth);
    let cert = write(dir.path(), "cert.pem", &cert);
    let key = write(dir.path(), "key.pem", &key);
    let other_key = write(dir.path(), "other-key.pem", &other_key);
    let garbage = write(dir.path(), "garbage.pem", "not pem at all\n");
    let missing = dir.path().join("missing.pem");
    let ca_file = write(dir.path(), "ca.pem", &ca.pem);

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _guard = runtime.enter();
    let server_error = |cert: &PathBuf, key: &PathBuf, client_ca: Option<&PathBuf>| {
        let config = TlsConfig {
            cert: Some(cert.clone()),
            key: Some(key.clone()),
            client_ca: client_ca.cloned(),
            health_listen: None,
        };
        format!("{:#}", ServerTls::load(&config, &[ALPN_H2]).unwrap_err())
    };
    for (error, named) in [
        (server_error(&missing, &key, None), &missing),
        (server_error(&garbage, &key, None), &garbage),
        (server_error(&cert, &missing, None), &missing),
        (server_error(&cert, &garbage, None), &garbage),
        (server_error(&cert, &other_key, None), &other_key),
        (server_error(&cert, &key, Some(&missing)), &missing),
        (server_error(&cert, &key, Some(&garbage)), &garbage),
    ] {
        assert!(error.contains(&named.display().to_string()), "{error}");
    }
    let half = TlsConfig { cert: Some(cert.clone()), ..TlsConfig::default() };
    assert!(format!("{:#}", ServerTls::load(&half, &[ALPN_H2]).unwrap_err()).contains("tls.key"));
    let ca_only = TlsConfig { client_ca: Some(ca_file.clone()), ..TlsConfig::default() };
    assert!(format!("{:#}", ServerTls::load(&ca_only, &[ALPN_H2]).unwrap_err()).contains("mTLS needs TLS"));
    assert!(ServerTls::load(&TlsConfig::default(), &[ALPN_H2]).unwrap().is_none());

    let client_error = |config: ClientTlsConfig| format!("{:#}", ClientTls::load(&config).unwrap_err());
    let error = client_error(ClientTlsConfig { ca: Some(missing.clone()), ..ClientTlsConfig::default() });
    assert!(error.contains(&missing.display().to_string()), "{error}");
    let error =
        client_error(ClientTlsConfig { cert: Some(cert.clone()), key: Some(key), ..ClientTlsConfig::default() });
    assert!(error.contains("client_tls.ca"), "{error}");
    let error = client_error(ClientTlsConfig {
        ca: Some(ca_file),
        cert: Some(cert),
        key: Some(other_key.clone()),
        ..ClientTlsConfig::default()
    });
    assert!(error.contains(&other_key.display().to_string()), "{error}");
    assert!(ClientTls::load(&ClientTlsConfig::default()).unwrap().is_none());
}

#[test]
fn ip_endpoints_are_checked_against_the_configured_name() {
    let dir = tempfile::tempdir().unwrap();
    let ca = write(dir.path(), "ca.pem", &Ca::new("mesh").pem);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _guard = runtime.enter();
    let plain =
        ClientTls::load(&ClientTlsConfig { ca: Some(ca.clone()), ..ClientTlsConfig::default() }).unwrap().unwrap();
    assert_eq!(plain.server_name("10.1.2.3").unwrap(), ServerName::try_from("10.1.2.3").unwrap());
    assert_eq!(plain.server_name("[::1]").unwrap(), ServerName::try_from("::1").unwrap());
    assert_eq!(plain.server_name("cache").unwrap(), ServerName::try_from("cache").unwrap());
    let named = ClientTls::load(&ClientTlsConfig {
        ca: Some(ca),
        server_name: Some("generation.llmesh.svc".into()),
        ..ClientTlsConfig::default()
    })
    .unwrap()
    .unwrap();
    assert_eq!(named.server_name("10.1.2.3").unwrap(), ServerName::try_from("generation.llmesh.svc").unwrap());
    assert_eq!(named.server_name("cache").unwrap(), ServerName::try_from("cache").unwrap());
}
