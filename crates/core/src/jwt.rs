//! RFC 9068 JWT access tokens: minting and local verification. Verification is strict and
//! allow-listed (RFC 8725): only EdDSA, only `typ: at+jwt`, a known `kid`, our issuer and the
//! verifier's audience; `exp`/`nbf` are judged by the injected clock with a small leeway.

use std::collections::HashMap;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

pub const TYP: &str = "at+jwt";
pub const ALG: Algorithm = Algorithm::EdDSA;

/// The claims of every access token we mint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    pub jti: String,
    pub client_id: String,
    /// Space-separated.
    pub scope: String,
    /// RFC 8705 §3.1: the token is bound to the client certificate with this thumbprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Confirmation>,
    /// Whether the client was a trusted service when the token was issued (seed 002 reads it).
    /// Routes that require trust also check the service's current flag.
    #[serde(default)]
    pub is_trusted: bool,
}

/// The `cnf` claim of a certificate-bound token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// base64url (no padding) SHA-256 of the certificate's DER.
    #[serde(rename = "x5t#S256")]
    pub x5t_s256: String,
}

/// Why a JWT was refused. Logged; the caller only ever sees `invalid_token`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("not a JWS compact token")]
    Malformed,
    #[error("algorithm not allowed")]
    AlgorithmNotAllowed,
    #[error("typ is not at+jwt")]
    WrongType,
    #[error("no kid")]
    MissingKid,
    #[error("unknown kid")]
    UnknownKid,
    #[error("signature does not verify")]
    BadSignature,
    #[error("expired")]
    Expired,
    #[error("not yet valid")]
    NotYetValid,
    #[error("wrong issuer")]
    WrongIssuer,
    #[error("wrong audience")]
    WrongAudience,
    #[error("revoked")]
    Revoked,
}

impl JwtError {
    pub const ALL: [JwtError; 11] = [
        JwtError::Malformed,
        JwtError::AlgorithmNotAllowed,
        JwtError::WrongType,
        JwtError::MissingKid,
        JwtError::UnknownKid,
        JwtError::BadSignature,
        JwtError::Expired,
        JwtError::NotYetValid,
        JwtError::WrongIssuer,
        JwtError::WrongAudience,
        JwtError::Revoked,
    ];

    pub fn reason(&self) -> &'static str {
        match self {
            JwtError::Malformed => "jwt_malformed",
            JwtError::AlgorithmNotAllowed => "jwt_algorithm_not_allowed",
            JwtError::WrongType => "jwt_wrong_typ",
            JwtError::MissingKid => "jwt_missing_kid",
            JwtError::UnknownKid => "jwt_unknown_kid",
            JwtError::BadSignature => "jwt_bad_signature",
            JwtError::Expired => "jwt_expired",
            JwtError::NotYetValid => "jwt_not_yet_valid",
            JwtError::WrongIssuer => "jwt_wrong_issuer",
            JwtError::WrongAudience => "jwt_wrong_audience",
            JwtError::Revoked => "jwt_revoked",
        }
    }
}

/// Signs with one Ed25519 key.
pub struct Signer {
    pub kid: String,
    key: EncodingKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", self.kid)
    }
}

impl Signer {
    /// `pkcs8_der`: the private key in PKCS#8 DER.
    pub fn new(kid: String, pkcs8_der: &[u8]) -> Signer {
        Signer {
            kid,
            key: EncodingKey::from_ed_der(pkcs8_der),
        }
    }

    pub fn sign(&self, claims: &AccessClaims) -> Result<String, jsonwebtoken::errors::Error> {
        let mut header = Header::new(ALG);
        header.typ = Some(TYP.to_string());
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key)
    }
}

/// The published verification keys, by kid.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, DecodingKey>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.keys.keys()).finish()
    }
}

/// Ed25519 public keys are 32 bytes; anything else is refused before jsonwebtoken sees it.
pub fn valid_ed25519_x(x: &str) -> bool {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(x)
        .is_ok_and(|b| b.len() == 32)
}

impl KeySet {
    /// `x`: base64url of the Ed25519 public key, as in the JWK.
    pub fn insert(&mut self, kid: &str, x: &str) -> bool {
        if !valid_ed25519_x(x) {
            return false;
        }
        match DecodingKey::from_ed_components(x) {
            Ok(k) => {
                self.keys.insert(kid.to_string(), k);
                true
            }
            Err(_) => false,
        }
    }

    pub fn contains(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// What a verifier requires of a token besides a good signature.
#[derive(Debug, Clone)]
pub struct Expectations<'a> {
    pub issuer: &'a str,
    pub audience: &'a str,
    pub leeway_secs: i64,
}

/// Cheap shape test used to route a bearer credential to JWT or API-key checking.
pub fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.bytes().filter(|&b| b == b'.').count() == 2
}

/// `exp`/`nbf` against `now` with leeway: at verification and again on every cache hit.
pub fn check_time(exp: i64, nbf: i64, leeway_secs: i64, now: i64) -> Result<(), JwtError> {
    if now >= exp.saturating_add(leeway_secs) {
        return Err(JwtError::Expired);
    }
    if now < nbf.saturating_sub(leeway_secs) {
        return Err(JwtError::NotYetValid);
    }
    Ok(())
}

/// Verifies signature and claims. `now` is unix seconds from the injected clock.
pub fn verify(
    token: &str,
    keys: &KeySet,
    want: &Expectations<'_>,
    now: i64,
) -> Result<AccessClaims, JwtError> {
    verify_with_kid(token, keys, want, now).map(|(claims, _)| claims)
}

/// As `verify`, also returning the `kid` that verified it (the header is decoded once).
pub fn verify_with_kid(
    token: &str,
    keys: &KeySet,
    want: &Expectations<'_>,
    now: i64,
) -> Result<(AccessClaims, String), JwtError> {
    // decode_header rejects `alg: none` and unknown algorithms as malformed; anything it does
    // parse must still be on our one-entry allow-list (so HS256 "signed" with our public key
    // is refused before any key is used).
    let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed)?;
    if header.alg != ALG {
        return Err(JwtError::AlgorithmNotAllowed);
    }
    let typ_ok = header
        .typ
        .as_deref()
        .is_some_and(|t| t.eq_ignore_ascii_case(TYP) || t.eq_ignore_ascii_case("application/at+jwt"));
    if !typ_ok {
        return Err(JwtError::WrongType);
    }
    let kid = header.kid.as_deref().ok_or(JwtError::MissingKid)?;
    let key = keys.keys.get(kid).ok_or(JwtError::UnknownKid)?;
    let mut v = Validation::new(ALG);
    // Time is checked below against the injected clock, not the system clock.
    v.validate_exp = false;
    v.validate_nbf = false;
    v.required_spec_claims.clear();
    v.validate_aud = false;
    let data = jsonwebtoken::decode::<AccessClaims>(token, key, &v).map_err(|e| {
        use jsonwebtoken::errors::ErrorKind;
        match e.kind() {
            ErrorKind::InvalidSignature => JwtError::BadSignature,
            ErrorKind::InvalidAlgorithm => JwtError::AlgorithmNotAllowed,
            _ => JwtError::Malformed,
        }
    })?;
    let c = data.claims;
    if c.iss != want.issuer {
        return Err(JwtError::WrongIssuer);
    }
    if c.aud != want.audience {
        return Err(JwtError::WrongAudience);
    }
    check_time(c.exp, c.nbf, want.leeway_secs, now)?;
    Ok((c, kid.to_string()))
}

/// A fresh Ed25519 key pair: (PKCS#8 DER private key, base64url public key `x`).
pub fn generate_ed25519() -> (Vec<u8>, String) {
    use base64::Engine;
    use ed25519_dalek::pkcs8::EncodePrivateKey;
    use rand::TryRngCore;
    let mut seed = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut seed)
        .expect("OS CSPRNG unavailable");
    let sk = ed25519_dalek::SigningKey::from_bytes(&seed);
    let der = sk.to_pkcs8_der().expect("pkcs8 encoding").as_bytes().to_vec();
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sk.verifying_key().as_bytes());
    (der, x)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;

    pub const NOW: i64 = 1_800_000_000;
    const WANT: Expectations<'static> = Expectations {
        issuer: "https://auth",
        audience: "permiso",
        leeway_secs: 30,
    };

    pub fn claims() -> AccessClaims {
        AccessClaims {
            is_trusted: false,
            iss: "https://auth".into(),
            sub: "srv_a".into(),
            aud: "permiso".into(),
            exp: NOW + 3600,
            iat: NOW,
            nbf: NOW,
            jti: "jti-1".into(),
            client_id: "srv_a".into(),
            scope: "trade:read".into(),
            cnf: None,
        }
    }

    pub fn setup() -> (Signer, KeySet, String) {
        let (der, x) = generate_ed25519();
        let signer = Signer::new("k1".into(), &der);
        let mut keys = KeySet::default();
        assert!(keys.insert("k1", &x));
        (signer, keys, x)
    }

    fn b64(v: &serde_json::Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    #[test]
    fn round_trip() {
        let (signer, keys, _) = setup();
        let t = signer.sign(&claims()).unwrap();
        assert!(looks_like_jwt(&t));
        assert_eq!(verify(&t, &keys, &WANT, NOW).unwrap(), claims());
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(t.split('.').next().unwrap()).unwrap()).unwrap();
        assert_eq!(header["typ"], "at+jwt");
        assert_eq!(header["alg"], "EdDSA");
        assert_eq!(header["kid"], "k1");
    }

    #[test]
    fn time_claims_with_leeway() {
        let (signer, keys, _) = setup();
        let t = signer.sign(&claims()).unwrap();
        assert!(verify(&t, &keys, &WANT, NOW + 3600 + 29).is_ok());
        assert_eq!(verify(&t, &keys, &WANT, NOW + 3600 + 30), Err(JwtError::Expired));
        assert!(verify(&t, &keys, &WANT, NOW - 30).is_ok());
        assert_eq!(verify(&t, &keys, &WANT, NOW - 31), Err(JwtError::NotYetValid));
    }

    #[test]
    fn issuer_audience_kid() {
        let (signer, keys, _) = setup();
        let mut c = claims();
        c.iss = "https://evil".into();
        assert_eq!(
            verify(&signer.sign(&c).unwrap(), &keys, &WANT, NOW),
            Err(JwtError::WrongIssuer)
        );
        let mut c = claims();
        c.aud = "other".into();
        assert_eq!(
            verify(&signer.sign(&c).unwrap(), &keys, &WANT, NOW),
            Err(JwtError::WrongAudience)
        );
        let (der, _) = generate_ed25519();
        let stranger = Signer::new("k2".into(), &der);
        assert_eq!(
            verify(&stranger.sign(&claims()).unwrap(), &keys, &WANT, NOW),
            Err(JwtError::UnknownKid)
        );
        // Same kid, different key: the signature fails.
        let impostor = Signer::new("k1".into(), &der);
        assert_eq!(
            verify(&impostor.sign(&claims()).unwrap(), &keys, &WANT, NOW),
            Err(JwtError::BadSignature)
        );
    }

    #[test]
    fn tampering_and_algorithm_attacks() {
        let (signer, keys, x) = setup();
        let t = signer.sign(&claims()).unwrap();
        let parts: Vec<&str> = t.split('.').collect();
        // Payload changed (scope escalated), signature kept.
        let mut c = serde_json::to_value(claims()).unwrap();
        c["scope"] = "admin:*".into();
        let forged = format!("{}.{}.{}", parts[0], b64(&c), parts[2]);
        assert_eq!(verify(&forged, &keys, &WANT, NOW), Err(JwtError::BadSignature));
        // Signature bytes flipped.
        let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        sig[0] ^= 1;
        let flipped = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(sig));
        assert_eq!(verify(&flipped, &keys, &WANT, NOW), Err(JwtError::BadSignature));
        // alg: none, empty signature.
        let none = format!(
            "{}.{}.",
            b64(&serde_json::json!({"alg":"none","typ":"at+jwt","kid":"k1"})),
            parts[1]
        );
        assert_eq!(verify(&none, &keys, &WANT, NOW), Err(JwtError::Malformed));
        // HS256 keyed with the public key (the classic confusion attack).
        let mut h = Header::new(Algorithm::HS256);
        h.typ = Some(TYP.into());
        h.kid = Some("k1".into());
        let hs = jsonwebtoken::encode(&h, &claims(), &EncodingKey::from_secret(x.as_bytes())).unwrap();
        assert_eq!(verify(&hs, &keys, &WANT, NOW), Err(JwtError::AlgorithmNotAllowed));
        let raw_pub = URL_SAFE_NO_PAD.decode(&x).unwrap();
        let hs2 = jsonwebtoken::encode(&h, &claims(), &EncodingKey::from_secret(&raw_pub)).unwrap();
        assert_eq!(
            verify(&hs2, &keys, &WANT, NOW),
            Err(JwtError::AlgorithmNotAllowed)
        );
        // Wrong typ (an ID token or a plain JWT).
        let wrong_typ = {
            let mut parts = t.split('.');
            let hdr = b64(&serde_json::json!({"alg":"EdDSA","typ":"JWT","kid":"k1"}));
            format!(
                "{}.{}.{}",
                hdr,
                {
                    parts.next();
                    parts.next().unwrap()
                },
                parts.next().unwrap()
            )
        };
        assert_eq!(verify(&wrong_typ, &keys, &WANT, NOW), Err(JwtError::WrongType));
        for junk in ["", "a.b.c", "eyJ.eyJ.x", "....", &"eyJ".repeat(10_000)] {
            assert!(verify(junk, &keys, &WANT, NOW).is_err());
        }
    }

    #[test]
    fn keyset_refuses_bad_public_keys() {
        let mut ks = KeySet::default();
        assert!(!ks.insert("a", "short"));
        assert!(!ks.insert("a", "!!!!"));
        assert!(ks.is_empty());
    }
}
