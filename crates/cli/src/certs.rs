//! `llmesh certs new --out DIR`: a development CA and every certificate a mesh needs, as PEM
//! files, for `llmesh up --tls DIR`, the tests, and a first try of TLS in compose or Kubernetes.
//!
//! ```text
//! DIR/ca.pem, ca-key.pem                 the CA (its key signs nothing else here; keep it, or delete it)
//! DIR/<service>.pem, <service>-key.pem   a server certificate per service (gateway, generation,
//!                                        cache, health, and redis for a Redis with TLS): localhost,
//!                                        127.0.0.1, ::1, the service's name, and every --san
//! DIR/client.pem, client-key.pem         the mesh's client certificate (the gateway and health
//!                                        present it inside the mesh; grpcurl, buf curl, tests too)
//! ```
//!
//! ECDSA P-256 keys (written 0600), SHA-256 signatures; the CA is valid for 5 years, the others
//! for 1 year, from an hour ago (clocks drift). A directory that already holds a CA is left alone
//! unless `--force`: replacing a CA that a running mesh trusts locks its clients out. This is a
//! development CA: in production, certificates come from your CA or cert-manager
//! (docs/SECURITY.md), and are rotated by replacing the files.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// The services of `llmesh up`.
pub const SERVICES: [&str; 4] = ["gateway", "generation", "cache", "health"];
/// Who gets a server certificate: the services, and Redis (rediss://, compose and Kubernetes).
const SERVERS: [&str; 5] = ["gateway", "generation", "cache", "health", "redis"];
/// The names every server certificate holds.
const LOCAL_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

const CA_DAYS: i64 = 5 * 365;
const LEAF_DAYS: i64 = 365;

#[derive(Debug, clap::Subcommand)]
pub enum CertsCommand {
    /// Make a development CA, a server certificate per service and a mesh client certificate.
    New {
        /// The directory to write them to (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Another name (or IP address) every server certificate is valid for: compose service
        /// names, Kubernetes Services (`generation.llmesh.svc`), a host name. Repeatable.
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
        /// Overwrite a CA already in the directory.
        #[arg(long)]
        force: bool,
    },
}

pub fn run(command: CertsCommand) -> anyhow::Result<()> {
    match command {
        CertsCommand::New { out, sans, force } => {
            let written = new(&out, &sans, force)?;
            let mut stdout = std::io::stdout().lock();
            for path in written {
                writeln!(stdout, "{}", path.display())?;
            }
            Ok(())
        }
    }
}

/// Writes the CA and the certificates into `dir`; the paths written.
pub fn new(dir: &Path, sans: &[String], force: bool) -> anyhow::Result<Vec<PathBuf>> {
    if dir.join("ca.pem").exists() && !force {
        bail!("{} already holds a CA (ca.pem); pass --force to replace it and every certificate", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let now = now()?;

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(DnType::CommonName, "llmesh development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca_params, now, CA_DAYS);
    let ca_key = KeyPair::generate().context("generating the CA's key")?;
    let ca_cert = ca_params.self_signed(&ca_key).context("signing the CA")?;
    let mut written =
        vec![write(dir, "ca.pem", &ca_cert.pem(), false)?, write(dir, "ca-key.pem", &ca_key.serialize_pem(), true)?];
    let issuer = Issuer::new(ca_params, ca_key);

    for service in SERVERS {
        let mut names: Vec<String> = LOCAL_NAMES.iter().map(|n| n.to_string()).collect();
        names.push(service.to_string());
        for san in sans {
            if !names.contains(san) {
                names.push(san.clone());
            }
        }
        let (cert, key) = leaf(&issuer, names, service, ExtendedKeyUsagePurpose::ServerAuth, now)
            .with_context(|| format!("the {service} certificate"))?;
        written.push(write(dir, &format!("{service}.pem"), &cert, false)?);
        written.push(write(dir, &format!("{service}-key.pem"), &key, true)?);
    }
    let (cert, key) = leaf(&issuer, Vec::new(), "llmesh-client", ExtendedKeyUsagePurpose::ClientAuth, now)
        .context("the client certificate")?;
    written.push(write(dir, "client.pem", &cert, false)?);
    written.push(write(dir, "client-key.pem", &key, true)?);
    Ok(written)
}

/// A certificate and its key, as PEM, signed by `issuer`.
fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    names: Vec<String>,
    common_name: &str,
    usage: ExtendedKeyUsagePurpose,
    now: time::OffsetDateTime,
) -> anyhow::Result<(String, String)> {
    let mut params = CertificateParams::new(names.clone())
        .with_context(|| format!("{names:?}: not names a certificate can hold"))?;
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, now, LEAF_DAYS);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn validity(params: &mut CertificateParams, now: time::OffsetDateTime, days: i64) {
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

fn now() -> anyhow::Result<time::OffsetDateTime> {
    let seconds = SystemTime::now().duration_since(UNIX_EPOCH).context("the clock is before 1970")?.as_secs();
    Ok(time::OffsetDateTime::from_unix_timestamp(i64::try_from(seconds)?)?)
}

/// Writes `text` to `dir/name` (0600 for keys); its path.
fn write(dir: &Path, name: &str, text: &str, secret: bool) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join(name);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true).mode(if secret { 0o600 } else { 0o644 });
    let mut file = options.open(&path).with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(text.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn writes_a_ca_and_every_certificate_and_keeps_an_existing_ca() {
        let dir = tempfile::tempdir().unwrap();
        let written = new(dir.path(), &["generation.llmesh.svc".into(), "10.0.0.1".into()], false).unwrap();
        let names: Vec<String> =
            written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        for name in
            ["ca.pem", "ca-key.pem", "gateway.pem", "cache-key.pem", "redis.pem", "client.pem", "client-key.pem"]
        {
            assert!(names.iter().any(|n| n == name), "{name} missing from {names:?}");
        }
        for path in &written {
            let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            let key = path.to_string_lossy().ends_with("-key.pem");
            assert_eq!(mode, if key { 0o600 } else { 0o644 }, "{}", path.display());
        }
        let error = new(dir.path(), &[], false).unwrap_err().to_string();
        assert!(error.contains("--force"), "{error}");
        assert!(new(dir.path(), &[], true).is_ok());
    }
}
