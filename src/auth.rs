//! Who a connection is: signed connection tokens (JWT) and private rooms.
//!
//! An application that knows its users signs a short-lived token for each
//! (`sub`, `name`, `exp`, optionally `nbf` and the `rooms` it may join) with
//! a secret (HS256) or a private key (RS256, ES256 or EdDSA) whose public
//! half hubbub has. A browser passes it as `?token=` on the WebSocket URL
//! (it cannot set headers there), other clients as `Authorization: Bearer`.
//! The checking is `jsonwebtoken`'s, with exactly one algorithm allowed, so
//! `alg: none` and algorithm confusion are refused by construction.
//!
//! With `mode = off` (the default) tokens are not even read, and nothing
//! costs anything; only `private_rooms` still need a token that allows them,
//! which makes them unreachable without a key.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

/// Clock skew allowed on `exp` and `nbf`.
pub const LEEWAY: Duration = Duration::from_secs(30);

/// Longest `sub` and `name` accepted, in characters.
const MAX_CLAIM_CHARS: usize = 256;

/// What `[auth] mode` says about connections without a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Tokens are not read at all.
    Off,
    /// A token is checked when there is one; without one, anonymous.
    Optional,
    /// Every connection needs a valid token.
    Required,
}

/// A verified sender, stamped on its messages by the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub id: String,
    pub name: String,
}

/// A verified token: who, and until when.
#[derive(Debug, Clone)]
pub struct Verified {
    pub identity: Arc<Identity>,
    /// When the token expires (without the leeway).
    pub expires: SystemTime,
}

/// The claims hubbub reads; anything else in the token is ignored.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    name: Option<String>,
    exp: u64,
    #[serde(default)]
    rooms: Option<Vec<String>>,
}

/// Why a handshake is refused: 401 (no or bad token) or 403 (a room the
/// token does not allow). The reason never repeats the token or the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
}

const fn refusal(status: u16, reason: &'static str) -> Refusal {
    Refusal { status, reason }
}

/// The key tokens are checked with.
#[derive(Clone)]
pub struct Key {
    key: DecodingKey,
    algorithm: Algorithm,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself.
        write!(f, "Key({:?})", self.algorithm)
    }
}

impl Key {
    /// An HS256 secret.
    pub fn secret(secret: &str) -> Key {
        Key {
            key: DecodingKey::from_secret(secret.as_bytes()),
            algorithm: Algorithm::HS256,
        }
    }

    /// A public key in a PEM file; its algorithm follows from the key:
    /// RSA keys RS256, P-256 keys ES256, Ed25519 keys EdDSA.
    pub fn public_pem(path: &Path) -> Result<Key, String> {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let text = String::from_utf8_lossy(&pem);
        let bad = |what: &str| format!("{}: {what}", path.display());
        if text.contains("-----BEGIN RSA PUBLIC KEY-----") {
            let key =
                DecodingKey::from_rsa_pem(&pem).map_err(|_| bad("not a usable RSA public key"))?;
            return Ok(Key {
                key,
                algorithm: Algorithm::RS256,
            });
        }
        use rustls_pki_types::pem::PemObject;
        let spki = rustls_pki_types::SubjectPublicKeyInfoDer::from_pem_slice(&pem)
            .map_err(|_| bad("expected a PEM public key (BEGIN PUBLIC KEY)"))?;
        let der: &[u8] = spki.as_ref();
        // The key's algorithm, from the object identifier in its DER.
        const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
        const EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
        const P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
        const ED25519: &[u8] = &[0x2b, 0x65, 0x70];
        let has = |oid: &[u8]| der.windows(oid.len()).any(|w| w == oid);
        let (key, algorithm) = if has(RSA) {
            (DecodingKey::from_rsa_pem(&pem), Algorithm::RS256)
        } else if has(EC) && has(P256) {
            (DecodingKey::from_ec_pem(&pem), Algorithm::ES256)
        } else if has(ED25519) {
            (DecodingKey::from_ed_pem(&pem), Algorithm::EdDSA)
        } else {
            return Err(bad("not an RSA, P-256 or Ed25519 public key"));
        };
        let key = key.map_err(|_| bad("not a usable public key"))?;
        Ok(Key { key, algorithm })
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

/// Room name patterns: exact names, or `prefix*`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Patterns(pub Vec<String>);

impl Patterns {
    pub fn matches(&self, room: &str) -> bool {
        self.0.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => room.starts_with(prefix),
            None => p == room,
        })
    }
}

/// The server's checks at the handshake.
#[derive(Debug, Clone)]
pub struct Auth {
    pub mode: Mode,
    key: Option<Key>,
    private: Patterns,
}

impl Auth {
    pub fn new(mode: Mode, key: Option<Key>, private: Patterns) -> Auth {
        Auth { mode, key, private }
    }

    /// Checks a connection's token (if any) for `room`: who it is
    /// (`None`: anonymous), or why it is refused.
    pub fn admit(&self, token: Option<&str>, room: &str) -> Result<Option<Verified>, Refusal> {
        let private = self.private.matches(room);
        if self.mode == Mode::Off && !private {
            return Ok(None);
        }
        let Some(token) = token else {
            return match (self.mode, private) {
                (_, true) => Err(refusal(
                    401,
                    "this room is private: a token that allows it is needed",
                )),
                (Mode::Required, _) => Err(refusal(
                    401,
                    "a token is required (?token= or Authorization: Bearer)",
                )),
                _ => Ok(None),
            };
        };
        let Some(key) = &self.key else {
            return Err(refusal(
                401,
                "this server checks no tokens, so its private rooms are closed",
            ));
        };
        let claims = verify(key, token)?;
        let allowed = match &claims.rooms {
            Some(rooms) => Patterns(rooms.clone()).matches(room),
            None => !private,
        };
        if !allowed {
            return Err(refusal(403, "the token does not allow this room"));
        }
        // An empty name is no name: others see the id.
        let name = claims
            .name
            .filter(|n| !n.trim().is_empty())
            .unwrap_or_else(|| claims.sub.clone());
        if claims.sub.is_empty()
            || claims.sub.chars().count() > MAX_CLAIM_CHARS
            || name.chars().count() > MAX_CLAIM_CHARS
        {
            return Err(refusal(401, "the token's sub or name is empty or too long"));
        }
        Ok(Some(Verified {
            identity: Arc::new(Identity {
                id: claims.sub,
                name,
            }),
            expires: UNIX_EPOCH + Duration::from_secs(claims.exp),
        }))
    }
}

/// The `alg` a token's header names, read before anything is trusted,
/// so that `none` or another algorithm is refused as such.
fn header_alg(token: &str) -> Option<String> {
    use base64::Engine;
    let first = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(first.trim_end_matches('='))
        .ok()?;
    let header: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    header.get("alg")?.as_str().map(str::to_string)
}

fn verify(key: &Key, token: &str) -> Result<Claims, Refusal> {
    if let Some(alg) = header_alg(token) {
        if alg != format!("{:?}", key.algorithm) {
            return Err(refusal(
                401,
                "the token is not signed with this server's algorithm",
            ));
        }
    }
    let mut validation = Validation::new(key.algorithm);
    validation.algorithms = vec![key.algorithm];
    validation.leeway = LEEWAY.as_secs();
    validation.validate_nbf = true;
    validation.validate_aud = false;
    validation.set_required_spec_claims(&["exp", "sub"]);
    match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
        Ok(data) => Ok(data.claims),
        Err(e) => Err(match e.kind() {
            ErrorKind::ExpiredSignature => refusal(401, "the token has expired"),
            ErrorKind::ImmatureSignature => refusal(401, "the token is not valid yet (nbf)"),
            ErrorKind::InvalidSignature => refusal(401, "the token's signature does not verify"),
            ErrorKind::InvalidAlgorithm
            | ErrorKind::MissingAlgorithm
            | ErrorKind::InvalidAlgorithmName => {
                refusal(401, "the token is not signed with this server's algorithm")
            }
            ErrorKind::MissingRequiredClaim(_)
            | ErrorKind::InvalidClaimFormat(_)
            | ErrorKind::Json(_) => refusal(
                401,
                "the token's claims are malformed (sub and exp are required)",
            ),
            _ => refusal(401, "the token is malformed"),
        }),
    }
}

/// When a connection with this token must be closed: at `exp` plus the
/// leeway, as a deadline of the runtime's clock.
pub fn deadline(expires: SystemTime) -> tokio::time::Instant {
    let left = expires
        .checked_add(LEEWAY)
        .and_then(|at| at.duration_since(SystemTime::now()).ok())
        .unwrap_or(Duration::ZERO);
    tokio::time::Instant::now() + left
}
