//! The mesh certificate authority: signs short-lived workload certificates whose URI SAN is a
//! SPIFFE ID, and knows the trust bundle every sidecar verifies peers against.
//!
//! The signing CA is either generated on first start (a self-signed root, persisted in
//! `--state-dir/ca/` so restarts keep it) or loaded from the operator's files (`--ca-cert`,
//! `--ca-key`): that certificate may be an intermediate signed by the operator's own root, in
//! which case the chain file carries the intermediates and the root goes into the bundle.
//! `--trust-bundle` adds roots (e.g. the previous root during a rotation, so both are
//! trusted for an overlap window).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use x509_parser::prelude::{FromDer, X509Certificate};

/// Clock skew tolerated between the control plane and the proxies.
const BACKDATE: Duration = Duration::from_secs(60);
/// Lifetime of a root the control plane generates itself.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("cannot sign: {0}")]
    Sign(#[from] rcgen::Error),
}

/// How the CA is set up (the binary's flags).
#[derive(Debug, Clone)]
pub struct CaOptions {
    pub trust_domain: String,
    pub cert_ttl: Duration,
    /// Operator-provided signing certificate (PEM; it, then its chain) and key.
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    /// Extra roots to trust (PEM).
    pub trust_bundle: Option<PathBuf>,
}

impl Default for CaOptions {
    fn default() -> Self {
        Self {
            trust_domain: "weft.local".into(),
            cert_ttl: Duration::from_secs(24 * 3600),
            ca_cert: None,
            ca_key: None,
            trust_bundle: None,
        }
    }
}

/// A certificate the CA issued.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf first, then intermediates.
    pub chain_pem: String,
    pub not_after: SystemTime,
}

/// The CA. Immutable once built; shared behind an `Arc`.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// Intermediates between an issued leaf and a root (PEM, in order), maybe empty.
    chain_pem: Vec<String>,
    bundle_pem: Vec<String>,
    trust_domain: String,
    ttl: Duration,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })
}

fn write(path: &Path, text: &str) -> Result<(), CaError> {
    let err = |source| CaError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    }
    std::fs::rename(&tmp, path).map_err(err)
}

/// Splits a PEM file into its certificates (PEM each, in order).
pub fn split_pem(what: &str, text: &str) -> Result<Vec<String>, CaError> {
    let certs: Vec<String> = text
        .split_inclusive("-----END CERTIFICATE-----")
        .filter_map(|block| {
            block
                .find("-----BEGIN CERTIFICATE-----")
                .map(|start| format!("{}\n", &block[start..]))
        })
        .collect();
    if certs.is_empty() {
        return Err(CaError::Invalid {
            what: what.into(),
            reason: "no PEM certificate found".into(),
        });
    }
    Ok(certs)
}

fn der_of(what: &str, pem_text: &str) -> Result<Vec<u8>, CaError> {
    let body: String = pem_text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .map_err(|e| CaError::Invalid {
            what: what.into(),
            reason: format!("bad PEM: {e}"),
        })
}

fn is_self_signed(what: &str, pem_text: &str) -> Result<bool, CaError> {
    let der = der_of(what, pem_text)?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| CaError::Invalid {
        what: what.into(),
        reason: format!("not an X.509 certificate: {e}"),
    })?;
    Ok(cert.subject() == cert.issuer())
}

impl Ca {
    /// Loads the operator's CA, or the one persisted in `state_dir`, or generates (and, with a
    /// state dir, persists) a new root.
    pub fn open(opts: &CaOptions, state_dir: Option<&Path>) -> Result<Self, CaError> {
        let (cert_pem, key_pem, generated) = Self::local_pems(opts, state_dir, true)?;
        Self::from_pems(opts, &cert_pem, &key_pem, generated)
    }

    /// The certificate and key PEMs [`Ca::open`] would use (`generated`: a new root), writing a
    /// new root to `state_dir` only when `persist`.
    pub fn local_pems(
        opts: &CaOptions,
        state_dir: Option<&Path>,
        persist: bool,
    ) -> Result<(String, String, bool), CaError> {
        Ok(match (&opts.ca_cert, &opts.ca_key) {
            (Some(cert), Some(key)) => (read(cert)?, read(key)?, false),
            (None, None) => {
                let files = state_dir.map(|d| (d.join("ca/root.pem"), d.join("ca/root-key.pem")));
                match &files {
                    Some((c, k)) if c.exists() && k.exists() => (read(c)?, read(k)?, false),
                    _ => {
                        let (c, k) = generate_root(&opts.trust_domain)?;
                        if let Some((cp, kp)) = files.as_ref().filter(|_| persist) {
                            write(kp, &k)?;
                            write(cp, &c)?;
                        }
                        (c, k, true)
                    }
                }
            }
            _ => {
                return Err(CaError::Invalid {
                    what: "--ca-cert/--ca-key".into(),
                    reason: "give both or neither".into(),
                });
            }
        })
    }

    /// The CA of `cert_pem` (chain, root last if self-signed) and `key_pem`.
    pub fn from_pems(
        opts: &CaOptions,
        cert_pem: &str,
        key_pem: &str,
        generated: bool,
    ) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::Invalid {
            what: "CA key".into(),
            reason: e.to_string(),
        })?;
        let mut certs = split_pem("CA certificate", cert_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&certs[0], key).map_err(|e| CaError::Invalid {
            what: "CA certificate".into(),
            reason: e.to_string(),
        })?;
        let mut bundle = Vec::new();
        // A self-signed last certificate is the root: it belongs in the bundle, not the chain.
        if is_self_signed(
            "CA certificate",
            certs.last().expect("split_pem never returns empty"),
        )? {
            bundle.push(certs.pop().expect("not empty"));
        }
        if let Some(path) = &opts.trust_bundle {
            bundle.extend(split_pem(&path.display().to_string(), &read(path)?)?);
        }
        if bundle.is_empty() {
            return Err(CaError::Invalid {
                what: "trust bundle".into(),
                reason: "the CA certificate is an intermediate: give its root with --trust-bundle or at the end of --ca-cert".into(),
            });
        }
        tracing::info!(
            trust_domain = opts.trust_domain,
            generated,
            roots = bundle.len(),
            intermediates = certs.len(),
            "certificate authority ready"
        );
        Ok(Self {
            issuer,
            chain_pem: certs,
            bundle_pem: bundle,
            trust_domain: opts.trust_domain.clone(),
            ttl: opts.cert_ttl,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn bundle_pem(&self) -> &[String] {
        &self.bundle_pem
    }

    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub fn spiffe_id(&self, namespace: &str, service_account: &str) -> String {
        format!(
            "spiffe://{}/ns/{namespace}/sa/{service_account}",
            self.trust_domain
        )
    }

    /// Signs `csr_pem` if it asks for exactly `spiffe_id` and nothing else.
    pub fn sign_csr(&self, csr_pem: &str, spiffe_id: &str) -> Result<Issued, CaError> {
        let invalid = |reason: String| CaError::Invalid {
            what: "CSR".into(),
            reason,
        };
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| invalid(format!("cannot parse or verify: {e}")))?;
        let asked: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(uri) => uri.as_str().to_owned(),
                other => format!("{other:?}"),
            })
            .collect();
        if asked != [spiffe_id] {
            return Err(invalid(format!(
                "asks for {asked:?} but the proof of identity is for {spiffe_id:?}"
            )));
        }
        csr.params = self.leaf_params(spiffe_id, self.ttl)?;
        let not_after = SystemTime::now() + self.ttl;
        let leaf = csr.signed_by(&self.issuer)?;
        let mut chain_pem = leaf.pem();
        for c in &self.chain_pem {
            chain_pem.push_str(c);
        }
        Ok(Issued {
            chain_pem,
            not_after,
        })
    }

    /// Issues a certificate and key for the control plane itself (its gRPC server), with
    /// `dns`/IP SANs so ordinary TLS clients can verify it too.
    pub fn issue_server(
        &self,
        spiffe_id: &str,
        hosts: &[String],
    ) -> Result<(String, String), CaError> {
        let key = KeyPair::generate()?;
        let mut params = self.leaf_params(
            spiffe_id,
            ROOT_LIFETIME.min(Duration::from_secs(365 * 24 * 3600)),
        )?;
        for h in hosts {
            params
                .subject_alt_names
                .push(match h.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(h.clone().try_into()?),
                });
        }
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut chain = cert.pem();
        for c in &self.chain_pem {
            chain.push_str(c);
        }
        Ok((chain, key.serialize_pem()))
    }

    fn leaf_params(&self, spiffe_id: &str, ttl: Duration) -> Result<CertificateParams, CaError> {
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + ttl).into();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "weft");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into()?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(fastrand_serial().into());
        Ok(params)
    }
}

fn fastrand_serial() -> Vec<u8> {
    let mut s = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut s)
        .expect("the OS random source works");
    s[0] &= 0x7f; // positive
    s.to_vec()
}

/// A new self-signed root: (cert PEM, key PEM).
pub fn generate_root(trust_domain: &str) -> Result<(String, String), CaError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ROOT_LIFETIME).into();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "weft");
    dn.push(DnType::CommonName, format!("weft root CA {trust_domain}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(fastrand_serial().into());
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(spiffe: &str) -> String {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(spiffe.try_into().unwrap())];
        p.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn root_is_persisted_and_csr_identity_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::open(&CaOptions::default(), Some(dir.path())).unwrap();
        let again = Ca::open(&CaOptions::default(), Some(dir.path())).unwrap();
        assert_eq!(
            ca.bundle_pem(),
            again.bundle_pem(),
            "the root survives a restart"
        );
        let id = ca.spiffe_id("default", "reviews");
        assert_eq!(id, "spiffe://weft.local/ns/default/sa/reviews");
        let issued = ca.sign_csr(&csr(&id), &id).unwrap();
        assert!(issued.chain_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let err = ca
            .sign_csr(&csr("spiffe://weft.local/ns/default/sa/admin"), &id)
            .unwrap_err()
            .to_string();
        assert!(err.contains("but the proof of identity is for"), "{err}");
    }

    #[test]
    fn a_rotation_trusts_the_old_and_the_new_root() {
        let dir = tempfile::tempdir().unwrap();
        let old = Ca::open(&CaOptions::default(), Some(dir.path())).unwrap();
        let (new_root, new_key) = generate_root("weft.local").unwrap();
        std::fs::write(dir.path().join("new.pem"), &new_root).unwrap();
        std::fs::write(dir.path().join("new-key.pem"), new_key).unwrap();
        std::fs::write(dir.path().join("old.pem"), old.bundle_pem().concat()).unwrap();
        let opts = CaOptions {
            ca_cert: Some(dir.path().join("new.pem")),
            ca_key: Some(dir.path().join("new-key.pem")),
            trust_bundle: Some(dir.path().join("old.pem")),
            ..CaOptions::default()
        };
        let new = Ca::open(&opts, Some(dir.path())).unwrap();
        assert_eq!(new.bundle_pem(), [new_root, old.bundle_pem()[0].clone()]);
        let err = Ca::open(
            &CaOptions {
                ca_key: None,
                ..opts
            },
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("give both or neither"), "{err}");
    }

    #[test]
    fn an_intermediate_signed_by_the_operators_root_works() {
        let dir = tempfile::tempdir().unwrap();
        let (root_pem, root_key) = generate_root("corp").unwrap();
        let root =
            Issuer::from_ca_cert_pem(&root_pem, KeyPair::from_pem(&root_key).unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let inter = p.signed_by(&key, &root).unwrap();
        std::fs::write(
            dir.path().join("ca.pem"),
            format!("{}{root_pem}", inter.pem()),
        )
        .unwrap();
        std::fs::write(dir.path().join("ca-key.pem"), key.serialize_pem()).unwrap();
        let opts = CaOptions {
            ca_cert: Some(dir.path().join("ca.pem")),
            ca_key: Some(dir.path().join("ca-key.pem")),
            ..CaOptions::default()
        };
        let ca = Ca::open(&opts, None).unwrap();
        assert_eq!(ca.bundle_pem(), [root_pem]);
        let id = ca.spiffe_id("ns", "sa");
        let issued = ca.sign_csr(&csr(&id), &id).unwrap();
        assert_eq!(
            issued.chain_pem.matches("BEGIN CERTIFICATE").count(),
            2,
            "leaf + intermediate"
        );
    }
}
