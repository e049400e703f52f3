//! The server configuration: what `ssl.SSLContext.load_cert_chain`,
//! `load_verify_locations`, `verify_mode`, `set_alpn_protocols` and `minimum_version`
//! set on a stdlib context, checked here and built into one `Arc<rustls::ServerConfig>`
//! shared by every connection. Pure Rust: the Python-facing conversion of
//! [`ConfigError`] lives in `rust/error.rs`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// Client-certificate verification, as `ssl.CERT_NONE` / `CERT_OPTIONAL` /
/// `CERT_REQUIRED` on a server context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    None,
    Optional,
    Required,
}

/// The lowest protocol version accepted (`ssl.TLSVersion.TLSv1_2` / `TLSv1_3`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MinVersion {
    Tls12,
    Tls13,
}

/// What a TLS server is configured with, in `load_cert_chain`'s terms.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// PEM: the end-entity certificate first, then any intermediates; may hold the key.
    pub certfile: PathBuf,
    /// PEM private key; `None`: the key is in `certfile`, as `load_cert_chain` allows.
    pub keyfile: Option<PathBuf>,
    /// Password of an encrypted ("ENCRYPTED PRIVATE KEY", PKCS#8) key.
    pub password: Option<Vec<u8>>,
    /// PEM CA certificates that client certificates must chain to.
    pub cafile: Option<PathBuf>,
    pub verify: Verify,
    /// ALPN protocols in preference order (e.g. `b"h2"`, `b"http/1.1"`).
    pub alpn: Vec<Vec<u8>>,
    pub min_version: MinVersion,
}

impl ServerSettings {
    /// Settings with only a certificate file (key inside it), no client verification,
    /// no ALPN, TLS 1.2 and up.
    pub fn new(certfile: impl Into<PathBuf>) -> ServerSettings {
        ServerSettings {
            certfile: certfile.into(),
            keyfile: None,
            password: None,
            cafile: None,
            verify: Verify::None,
            alpn: Vec::new(),
            min_version: MinVersion::Tls12,
        }
    }
}

/// Why a configuration could not be built. Each kind maps to the exception the stdlib
/// raises for the same mistake (see `rust/error.rs`).
#[derive(Debug)]
pub enum ConfigError {
    /// The file does not exist (ENOENT): `FileNotFoundError`.
    Missing { path: PathBuf },
    /// The file exists but cannot be read (any other errno): `OSError`.
    Unreadable { path: PathBuf, errno: i32 },
    /// The file is not valid PEM (broken base64, missing END line): `ssl.SSLError`.
    BadPem { path: PathBuf, detail: String },
    /// No "CERTIFICATE" section in the file: `ssl.SSLError`.
    NoCertificate { path: PathBuf },
    /// No private key section in the file: `ssl.SSLError`.
    NoKey { path: PathBuf },
    /// A key rustls cannot use (unsupported algorithm, corrupt DER, or an encryption
    /// format not supported, such as OpenSSL's legacy "Proc-Type: 4,ENCRYPTED"):
    /// `ssl.SSLError`.
    BadKey { detail: String },
    /// A certificate rustls or webpki rejects (in `cafile` or the chain): `ssl.SSLError`.
    BadCertificate { detail: String },
    /// The key is not the certificate's (OpenSSL's KEY_VALUES_MISMATCH): `ssl.SSLError`.
    KeyMismatch,
    /// The key is encrypted and no password was given: `ssl.SSLError`.
    NeedsPassword,
    /// The password does not decrypt the key: `ssl.SSLError`.
    WrongPassword,
    /// An argument value is invalid (empty or over-long ALPN name, client verification
    /// without a `cafile`): `ValueError`.
    BadArgument(String),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Missing { path } => write!(f, "no such file: {}", path.display()),
            ConfigError::Unreadable { path, errno } => {
                write!(f, "cannot read {} (errno {errno})", path.display())
            }
            ConfigError::BadPem { path, detail } => {
                write!(f, "bad PEM in {}: {detail}", path.display())
            }
            ConfigError::NoCertificate { path } => {
                write!(f, "no certificate found in {}", path.display())
            }
            ConfigError::NoKey { path } => write!(f, "no private key found in {}", path.display()),
            ConfigError::BadKey { detail } => write!(f, "unusable private key: {detail}"),
            ConfigError::BadCertificate { detail } => write!(f, "bad certificate: {detail}"),
            ConfigError::KeyMismatch => {
                f.write_str("key values mismatch: the private key is not the certificate's")
            }
            ConfigError::NeedsPassword => {
                f.write_str("the private key is encrypted and no password was given")
            }
            ConfigError::WrongPassword => {
                f.write_str("bad decrypt: the password does not decrypt the private key")
            }
            ConfigError::BadArgument(what) => f.write_str(what),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The crypto provider every TLS object of the engine uses (see the module doc of
/// `tls` for why ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Check `settings` and build the shared server configuration.
pub fn build(settings: &ServerSettings) -> Result<Arc<ServerConfig>, ConfigError> {
    for name in &settings.alpn {
        if name.is_empty() || name.len() > 255 {
            return Err(ConfigError::BadArgument(format!(
                "ALPN protocol names must be 1 to 255 bytes, got {}",
                name.len()
            )));
        }
    }
    if settings.verify != Verify::None && settings.cafile.is_none() {
        return Err(ConfigError::BadArgument(
            "verifying client certificates needs a cafile".to_owned(),
        ));
    }

    let cert_pem = read(&settings.certfile)?;
    let chain = load_certs(&cert_pem, &settings.certfile)?;
    let (key_pem, key_path) = match &settings.keyfile {
        Some(path) => (read(path)?, path.as_path()),
        None => (cert_pem.clone(), settings.certfile.as_path()),
    };
    let key = load_key(&key_pem, key_path, settings.password.as_deref())?;

    let provider = provider();
    let versions: &[&'static rustls::SupportedProtocolVersion] = match settings.min_version {
        MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        MinVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|err| ConfigError::BadArgument(err.to_string()))?;

    let builder = match (&settings.cafile, settings.verify) {
        (Some(cafile), verify) if verify != Verify::None => {
            let mut roots = RootCertStore::empty();
            for cert in load_certs(&read(cafile)?, cafile)? {
                roots.add(cert).map_err(|err| ConfigError::BadCertificate {
                    detail: err.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if verify == Verify::Optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|err| ConfigError::BadCertificate {
                    detail: err.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };

    // with_single_cert loads the key and, since rustls 0.23, compares its public key
    // with the certificate's (CertifiedKey::keys_match).
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|err| match err {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                ConfigError::KeyMismatch
            }
            rustls::Error::General(detail) => ConfigError::BadKey { detail },
            other => ConfigError::BadCertificate {
                detail: other.to_string(),
            },
        })?;
    config.alpn_protocols = settings.alpn.clone();
    Ok(Arc::new(config))
}

fn read(path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|err| match err.raw_os_error() {
        Some(libc::ENOENT) => ConfigError::Missing {
            path: path.to_owned(),
        },
        Some(errno) => ConfigError::Unreadable {
            path: path.to_owned(),
            errno,
        },
        None => ConfigError::Unreadable {
            path: path.to_owned(),
            errno: libc::EIO,
        },
    })
}

fn bad_pem(path: &Path, err: pem::Error) -> ConfigError {
    ConfigError::BadPem {
        path: path.to_owned(),
        detail: err.to_string(),
    }
}

fn load_certs(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| bad_pem(path, err))?;
    if chain.is_empty() {
        return Err(ConfigError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(chain)
}

const ENCRYPTED_BEGIN: &[u8] = b"-----BEGIN ENCRYPTED PRIVATE KEY-----";
const ENCRYPTED_END: &[u8] = b"-----END ENCRYPTED PRIVATE KEY-----";

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The private key of `pem`: PKCS#1 RSA, SEC1 EC or PKCS#8, or an encrypted PKCS#8 key
/// decrypted with `password` (a password given for a plain key is ignored, as
/// `load_cert_chain` ignores it).
fn load_key(
    pem: &[u8],
    path: &Path,
    password: Option<&[u8]>,
) -> Result<PrivateKeyDer<'static>, ConfigError> {
    if let Some(start) = find(pem, ENCRYPTED_BEGIN) {
        let end = find(&pem[start..], ENCRYPTED_END)
            .map(|at| start + at + ENCRYPTED_END.len())
            .ok_or_else(|| ConfigError::BadPem {
                path: path.to_owned(),
                detail: "ENCRYPTED PRIVATE KEY section has no END line".to_owned(),
            })?;
        let password = password.ok_or(ConfigError::NeedsPassword)?;
        return decrypt_pkcs8(&pem[start..end], path, password);
    }
    if find(pem, b"Proc-Type: 4,ENCRYPTED").is_some() {
        return Err(ConfigError::BadKey {
            detail: "legacy OpenSSL key encryption (Proc-Type: 4,ENCRYPTED) is not \
                     supported; convert the key to encrypted PKCS#8 with \
                     `openssl pkcs8 -topk8`"
                .to_owned(),
        });
    }
    match PrivateKeyDer::from_pem_slice(pem) {
        Ok(key) => Ok(key),
        Err(pem::Error::NoItemsFound) => Err(ConfigError::NoKey {
            path: path.to_owned(),
        }),
        Err(err) => Err(bad_pem(path, err)),
    }
}

fn decrypt_pkcs8(
    section: &[u8],
    path: &Path,
    password: &[u8],
) -> Result<PrivateKeyDer<'static>, ConfigError> {
    let (_, der) = pkcs8::der::pem::decode_vec(section).map_err(|err| ConfigError::BadPem {
        path: path.to_owned(),
        detail: err.to_string(),
    })?;
    let info = pkcs8::EncryptedPrivateKeyInfo::try_from(der.as_slice()).map_err(|err| {
        ConfigError::BadKey {
            detail: err.to_string(),
        }
    })?;
    // A wrong password shows as bad CBC padding, which pkcs5 0.7 reports as
    // `EncryptFailed` even when decrypting (its cbc_decrypt maps the padding error to
    // it), so both "failed" variants mean a wrong password here; a scheme it does not
    // know is a different error.
    let plain = info.decrypt(password).map_err(|err| match err {
        pkcs8::Error::EncryptedPrivateKey(
            pkcs8::pkcs5::Error::DecryptFailed | pkcs8::pkcs5::Error::EncryptFailed,
        ) => ConfigError::WrongPassword,
        other => ConfigError::BadKey {
            detail: other.to_string(),
        },
    })?;
    // A wrong password passes the padding check about once in 256 tries; the garbage
    // it yields is then not a PKCS#8 structure.
    if pkcs8::PrivateKeyInfo::try_from(plain.as_bytes()).is_err() {
        return Err(ConfigError::WrongPassword);
    }
    Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        plain.as_bytes().to_vec(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::sync::OnceLock;

    /// Run the `openssl` CLI in `dir`; a missing `openssl` fails the test loudly (CI
    /// installs it), it never skips.
    fn openssl(dir: &Path, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|err| {
                panic!("the TLS tests need the `openssl` command line tool to make test certificates: {err}")
            });
        assert!(
            out.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A fresh directory of test certificates and keys, made once per test run.
    fn fixtures() -> &'static Path {
        static DIR: OnceLock<PathBuf> = OnceLock::new();
        DIR.get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("fss-tls-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let d = dir.as_path();
            let subj = ["-days", "2", "-subj", "/CN=localhost"];
            let self_signed = |key: &[&str], name: &str| {
                let (k, c) = (format!("{name}.key"), format!("{name}.pem"));
                let mut args = vec!["req", "-x509", "-nodes", "-keyout", &k, "-out", &c];
                args.extend_from_slice(key);
                args.extend_from_slice(&subj);
                openssl(d, &args);
            };
            // PKCS#8 keys (OpenSSL 3's default output).
            self_signed(&["-newkey", "rsa:2048"], "rsa");
            self_signed(&["-newkey", "rsa:2048"], "rsa_other");
            self_signed(&["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"], "ec");
            // PKCS#1 RSA and SEC1 EC.
            openssl(d, &["rsa", "-in", "rsa.key", "-traditional", "-out", "rsa_pkcs1.key"]);
            openssl(d, &["ec", "-in", "ec.key", "-out", "ec_sec1.key"]);
            // Encrypted PKCS#8: PBES2 with PBKDF2 + AES-256-CBC (the default), and scrypt.
            openssl(d, &["pkcs8", "-topk8", "-in", "rsa.key", "-out", "rsa_enc.key",
                         "-passout", "pass:secret"]);
            openssl(d, &["pkcs8", "-topk8", "-scrypt", "-in", "ec.key", "-out", "ec_enc.key",
                         "-passout", "pass:secret"]);
            // OpenSSL's legacy encrypted PEM.
            openssl(d, &["rsa", "-in", "rsa.key", "-traditional", "-aes128", "-passout",
                         "pass:secret", "-out", "rsa_legacy.key"]);
            // A chain: root CA -> intermediate CA -> leaf.
            std::fs::write(d.join("ca.ext"), "basicConstraints=critical,CA:TRUE\nkeyUsage=keyCertSign,cRLSign\n").unwrap();
            std::fs::write(d.join("leaf.ext"), "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n").unwrap();
            openssl(d, &["req", "-x509", "-nodes", "-newkey", "ec", "-pkeyopt",
                         "ec_paramgen_curve:P-256", "-keyout", "root.key", "-out", "root.pem",
                         "-days", "2", "-subj", "/CN=Test Root", "-addext",
                         "basicConstraints=critical,CA:TRUE", "-addext",
                         "keyUsage=keyCertSign,cRLSign"]);
            let signed = |name: &str, cn: &str, ca: &str, ext: &str| {
                let (k, r, c) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
                let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
                openssl(d, &["req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt",
                             "ec_paramgen_curve:P-256", "-keyout", &k, "-out", &r, "-subj", cn]);
                openssl(d, &["x509", "-req", "-in", &r, "-CA", &ca_pem, "-CAkey", &ca_key,
                             "-CAcreateserial", "-out", &c, "-days", "2", "-extfile", ext]);
            };
            signed("inter", "/CN=Test Intermediate", "root", "ca.ext");
            signed("leaf", "/CN=localhost", "inter", "leaf.ext");
            let cat = |out: &str, parts: &[&str]| {
                let mut all = Vec::new();
                for part in parts {
                    all.extend(std::fs::read(d.join(part)).unwrap());
                }
                std::fs::write(d.join(out), all).unwrap();
            };
            cat("chain.pem", &["leaf.pem", "inter.pem"]);
            cat("rsa_combined.pem", &["rsa.pem", "rsa.key"]);
            std::fs::write(
                d.join("garbage.pem"),
                "-----BEGIN CERTIFICATE-----\n!!not base64!!\n-----END CERTIFICATE-----\n",
            )
            .unwrap();
            dir
        })
    }

    fn path(name: &str) -> PathBuf {
        fixtures().join(name)
    }

    fn settings(cert: &str, key: Option<&str>) -> ServerSettings {
        let mut s = ServerSettings::new(path(cert));
        s.keyfile = key.map(path);
        s
    }

    fn file_starts(name: &str, label: &str) {
        let text = std::fs::read_to_string(path(name)).unwrap();
        assert!(
            text.starts_with(label),
            "{name} is not {label}: {}",
            &text[..40]
        );
    }

    #[test]
    fn every_key_format_loads() {
        file_starts("rsa.key", "-----BEGIN PRIVATE KEY-----");
        file_starts("rsa_pkcs1.key", "-----BEGIN RSA PRIVATE KEY-----");
        file_starts("ec_sec1.key", "-----BEGIN EC PRIVATE KEY-----");
        file_starts("rsa_enc.key", "-----BEGIN ENCRYPTED PRIVATE KEY-----");
        for (cert, key) in [
            ("rsa.pem", "rsa.key"),
            ("rsa.pem", "rsa_pkcs1.key"),
            ("ec.pem", "ec.key"),
            ("ec.pem", "ec_sec1.key"),
            ("chain.pem", "leaf.key"),
        ] {
            build(&settings(cert, Some(key))).unwrap_or_else(|e| panic!("{cert} {key}: {e}"));
        }
    }

    #[test]
    fn key_inside_the_certfile() {
        build(&settings("rsa_combined.pem", None)).unwrap();
    }

    #[test]
    fn encrypted_pkcs8_with_its_password() {
        for (cert, key) in [("rsa.pem", "rsa_enc.key"), ("ec.pem", "ec_enc.key")] {
            let mut s = settings(cert, Some(key));
            s.password = Some(b"secret".to_vec());
            build(&s).unwrap_or_else(|e| panic!("{key}: {e}"));
            s.password = Some(b"wrong".to_vec());
            let got = build(&s);
            assert!(
                matches!(got, Err(ConfigError::WrongPassword)),
                "{key}: {got:?}"
            );
            s.password = None;
            assert!(
                matches!(build(&s), Err(ConfigError::NeedsPassword)),
                "{key}"
            );
        }
    }

    #[test]
    fn password_ignored_for_a_plain_key() {
        let mut s = settings("rsa.pem", Some("rsa.key"));
        s.password = Some(b"unused".to_vec());
        build(&s).unwrap();
    }

    #[test]
    fn legacy_encrypted_pem_is_refused_with_a_reason() {
        let mut s = settings("rsa.pem", Some("rsa_legacy.key"));
        s.password = Some(b"secret".to_vec());
        match build(&s) {
            Err(ConfigError::BadKey { detail }) => assert!(detail.contains("pkcs8"), "{detail}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn client_verification_and_alpn_and_versions() {
        for verify in [Verify::Optional, Verify::Required] {
            let mut s = settings("chain.pem", Some("leaf.key"));
            s.cafile = Some(path("root.pem"));
            s.verify = verify;
            s.alpn = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            s.min_version = MinVersion::Tls13;
            let config = build(&s).unwrap();
            assert_eq!(config.alpn_protocols, s.alpn);
        }
    }

    #[test]
    fn missing_and_unreadable_files() {
        match build(&settings("nope.pem", Some("rsa.key"))) {
            Err(ConfigError::Missing { path }) => assert!(path.ends_with("nope.pem")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            build(&settings("rsa.pem", Some("nope.key"))),
            Err(ConfigError::Missing { .. })
        ));
        // A directory cannot be read (EISDIR), whoever runs the tests (root reads a
        // chmod 000 file).
        let mut s = settings("rsa.pem", None);
        s.keyfile = Some(fixtures().to_owned());
        assert!(matches!(
            build(&s),
            Err(ConfigError::Unreadable {
                errno: libc::EISDIR,
                ..
            })
        ));
        let mut s = settings("chain.pem", Some("leaf.key"));
        s.cafile = Some(path("nope-ca.pem"));
        s.verify = Verify::Required;
        assert!(matches!(build(&s), Err(ConfigError::Missing { .. })));
    }

    #[test]
    fn no_certificate_no_key_bad_pem() {
        assert!(matches!(
            build(&settings("rsa.key", Some("rsa.key"))),
            Err(ConfigError::NoCertificate { .. })
        ));
        assert!(matches!(
            build(&settings("rsa.pem", None)),
            Err(ConfigError::NoKey { .. })
        ));
        assert!(matches!(
            build(&settings("garbage.pem", Some("rsa.key"))),
            Err(ConfigError::BadPem { .. })
        ));
        assert!(matches!(
            build(&settings("rsa.pem", Some("garbage.pem"))),
            Err(ConfigError::NoKey { .. }) | Err(ConfigError::BadPem { .. })
        ));
    }

    #[test]
    fn key_of_another_certificate() {
        for (cert, key) in [
            ("rsa.pem", "rsa_other.key"),
            ("rsa.pem", "ec.key"),
            ("chain.pem", "inter.key"),
        ] {
            assert!(
                matches!(
                    build(&settings(cert, Some(key))),
                    Err(ConfigError::KeyMismatch)
                ),
                "{cert} {key}"
            );
        }
    }

    #[test]
    fn bad_argument_values() {
        let mut s = settings("rsa.pem", Some("rsa.key"));
        s.alpn = vec![Vec::new()];
        assert!(matches!(build(&s), Err(ConfigError::BadArgument(_))));
        s.alpn = vec![vec![b'a'; 256]];
        assert!(matches!(build(&s), Err(ConfigError::BadArgument(_))));
        let mut s = settings("rsa.pem", Some("rsa.key"));
        s.verify = Verify::Required;
        assert!(matches!(build(&s), Err(ConfigError::BadArgument(_))));
    }

    #[test]
    fn errors_become_the_stdlib_exceptions() {
        use pyo3::prelude::*;
        Python::attach(|py| {
            let ssl_error = py.import("ssl").unwrap().getattr("SSLError").unwrap();
            let cases: Vec<(ConfigError, Bound<'_, PyAny>)> = vec![
                (
                    ConfigError::Missing { path: "x".into() },
                    py.get_type::<pyo3::exceptions::PyFileNotFoundError>()
                        .into_any(),
                ),
                (
                    ConfigError::Unreadable {
                        path: "x".into(),
                        errno: libc::EISDIR,
                    },
                    py.get_type::<pyo3::exceptions::PyIsADirectoryError>()
                        .into_any(),
                ),
                (ConfigError::KeyMismatch, ssl_error.clone()),
                (ConfigError::WrongPassword, ssl_error.clone()),
                (ConfigError::NoKey { path: "x".into() }, ssl_error.clone()),
                (
                    ConfigError::BadArgument("x".into()),
                    py.get_type::<pyo3::exceptions::PyValueError>().into_any(),
                ),
            ];
            for (err, expected) in cases {
                let text = format!("{err:?}");
                let err: PyErr = err.into();
                assert!(
                    err.value(py).is_instance(&expected).unwrap(),
                    "{text} became {err}"
                );
            }
        });
    }
}
