//! Throwaway PKI for the TLS tests, generated per test with rcgen (nothing with a private key
//! is checked in): a CA, server certificates for 127.0.0.1/localhost, client certificates
//! with URI SANs, written as PEM files into the test's directory.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};

pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The CA certificate as PEM, in `dir/<name>-ca.pem`.
    pub pem_file: PathBuf,
    pub pem: String,
    dir: PathBuf,
}

/// A certificate and its key as PEM files.
pub struct Issued {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl Issued {
    /// cert + key in one PEM buffer (reqwest::Identity::from_pem).
    pub fn identity_pem(&self) -> Vec<u8> {
        format!("{}{}", self.cert_pem, self.key_pem).into_bytes()
    }
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        let pem = cert.pem();
        let pem_file = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&pem_file, &pem).unwrap();
        Ca {
            cert,
            key,
            pem_file,
            pem,
            dir: dir.to_path_buf(),
        }
    }

    fn issue(&self, file: &str, params: CertificateParams) -> Issued {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let (cert_file, key_file) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}.key")),
        );
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        Issued {
            cert_file,
            key_file,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// A server certificate for 127.0.0.1 and localhost, valid until `not_after_year`.
    pub fn server(&self, file: &str, not_after_year: i32) -> Issued {
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.subject_alt_names
            .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.not_after = rcgen::date_time_ymd(not_after_year, 1, 1);
        self.issue(file, p)
    }

    /// A client certificate with the URI SAN `uri` (e.g. `spiffe://permiso/mt5`).
    pub fn client(&self, file: &str, uri: &str) -> Issued {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names
            .push(SanType::URI(rcgen::Ia5String::try_from(uri).unwrap()));
        p.distinguished_name.push(DnType::CommonName, file);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(file, p)
    }
}
