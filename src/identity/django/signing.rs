//! Django's signing, as `django.core.signing` and `django.utils.crypto` do it, to verify
//! what Django signed: session data, signed-cookie sessions, and the session's
//! `_auth_user_hash`.
//!
//! - `salted_hmac(key_salt, value, secret)` is HMAC-SHA256 keyed with
//!   SHA-256(key_salt + secret).
//! - A `TimestampSigner` value is `payload:timestamp:signature`. The signature is
//!   URL-safe base64 (no padding) of `salted_hmac(salt + "signer", "payload:timestamp")`,
//!   the timestamp is seconds in base 62, and the payload is URL-safe base64 of the
//!   serialized object, zlib-compressed and marked with a leading `.` when that is
//!   shorter.
//! - `SECRET_KEY_FALLBACKS` (Django ≥ 4.1): a value signed with an older key verifies
//!   when one of the fallbacks made it. Every check here takes the current key first and
//!   then the fallbacks, as Django does.

use std::io::Read;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Largest signed value read, and largest decompressed payload, in bytes.
pub const MAX_SIGNED_BYTES: usize = 1 << 20;

/// The key salt of the session's `_auth_user_hash` (`AbstractBaseUser.get_session_auth_hash`).
const AUTH_HASH_SALT: &str = "django.contrib.auth.models.AbstractBaseUser.get_session_auth_hash";

/// Why a signed value was not accepted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("not a signed Django value")]
    Malformed,
    #[error("bad signature")]
    BadSignature,
    #[error("signature expired")]
    Expired,
    #[error("payload does not decompress")]
    Compression,
    #[error("value larger than {MAX_SIGNED_BYTES} bytes")]
    TooLarge,
}

/// Django's `salted_hmac(key_salt, value, secret, algorithm="sha256")`.
fn salted_hmac(key_salt: &str, secret: &str) -> Hmac<Sha256> {
    let mut key = Sha256::new();
    key.update(key_salt.as_bytes());
    key.update(secret.as_bytes());
    // unwrap: HMAC accepts keys of any length.
    Hmac::<Sha256>::new_from_slice(&key.finalize()).unwrap()
}

/// Django's `base62` decoding of a signing timestamp.
fn base62(text: &str) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    if digits.is_empty() || digits.len() > 11 {
        return None;
    }
    let mut n: i64 = 0;
    for c in digits.bytes() {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'A'..=b'Z' => c - b'A' + 10,
            b'a'..=b'z' => c - b'a' + 36,
            _ => return None,
        };
        n = n.checked_mul(62)?.checked_add(i64::from(d))?;
    }
    Some(if negative { -n } else { n })
}

/// Verifies a `TimestampSigner` value made with `salt` and one of `keys` (current key
/// first, then the fallbacks) and returns its serialized payload. With `max_age`, a
/// value signed longer ago than that is [`SignatureError::Expired`].
pub fn unsign(
    value: &[u8],
    salt: &str,
    keys: &[String],
    max_age: Option<Duration>,
) -> Result<Vec<u8>, SignatureError> {
    if value.len() > MAX_SIGNED_BYTES {
        return Err(SignatureError::TooLarge);
    }
    let value = std::str::from_utf8(value).map_err(|_| SignatureError::Malformed)?;
    let (signed, signature) = value.rsplit_once(':').ok_or(SignatureError::Malformed)?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| SignatureError::BadSignature)?;
    let signer_salt = format!("{salt}signer");
    let verified = keys.iter().any(|key| {
        let mut mac = salted_hmac(&signer_salt, key);
        mac.update(signed.as_bytes());
        mac.verify_slice(&signature).is_ok()
    });
    if !verified {
        return Err(SignatureError::BadSignature);
    }
    let (payload, timestamp) = signed.rsplit_once(':').ok_or(SignatureError::Malformed)?;
    if let Some(max_age) = max_age {
        let signed_at = base62(timestamp).ok_or(SignatureError::Malformed)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        if now - signed_at as f64 > max_age.as_secs_f64() {
            return Err(SignatureError::Expired);
        }
    }
    decode_payload(payload)
}

/// The serialized bytes of a signed payload: base64, then zlib when marked with `.`.
fn decode_payload(payload: &str) -> Result<Vec<u8>, SignatureError> {
    let (compressed, payload) = match payload.strip_prefix('.') {
        Some(rest) => (true, rest),
        None => (false, payload),
    };
    let data = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| SignatureError::Malformed)?;
    if !compressed {
        return Ok(data);
    }
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(&data[..])
        .take(MAX_SIGNED_BYTES as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|_| SignatureError::Compression)?;
    if out.len() > MAX_SIGNED_BYTES {
        return Err(SignatureError::TooLarge);
    }
    Ok(out)
}

/// Whether a session's `_auth_user_hash` matches the user's stored password hash under
/// one of `keys`, as Django's `auth.get_user` checks it (a password change ends the
/// sessions made before it).
pub fn session_hash_matches(session_hash: &str, password: &str, keys: &[String]) -> bool {
    let Some(expected) = hex(session_hash) else {
        return false;
    };
    keys.iter().any(|key| {
        let mut mac = salted_hmac(AUTH_HASH_SALT, key);
        mac.update(password.as_bytes());
        mac.verify_slice(&expected).is_ok()
    })
}

/// Lower- or upper-case hex digits as bytes.
fn hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || text.len() > 128 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const SALT: &str = "django.contrib.sessions.SessionStore";

    fn base62_encode(mut n: i64) -> String {
        const DIGITS: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        let mut out = Vec::new();
        loop {
            out.push(DIGITS[(n % 62) as usize]);
            n /= 62;
            if n == 0 {
                break;
            }
        }
        out.reverse();
        String::from_utf8(out).unwrap()
    }

    /// Signs the way a TimestampSigner does (to build inputs; the fixtures written by
    /// real Django are the reference).
    pub(crate) fn sign(payload_b64: &str, salt: &str, secret: &str, signed_at: i64) -> String {
        let value = format!("{payload_b64}:{}", base62_encode(signed_at));
        let mut mac = salted_hmac(&format!("{salt}signer"), secret);
        mac.update(value.as_bytes());
        format!(
            "{value}:{}",
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        )
    }

    fn now() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn values_verify_with_the_current_key_or_a_fallback() {
        let payload = URL_SAFE_NO_PAD.encode(br#"{"a":1}"#);
        let signed = sign(&payload, SALT, "old", now());
        assert_eq!(
            unsign(signed.as_bytes(), SALT, &keys(&["new", "old"]), None).unwrap(),
            br#"{"a":1}"#
        );
        assert_eq!(
            unsign(signed.as_bytes(), SALT, &keys(&["new"]), None),
            Err(SignatureError::BadSignature)
        );
        assert_eq!(
            unsign(signed.as_bytes(), "other salt", &keys(&["old"]), None),
            Err(SignatureError::BadSignature)
        );
        assert_eq!(
            unsign(b"garbage", SALT, &keys(&["old"]), None),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn max_age_is_measured_from_the_signing_time() {
        let payload = URL_SAFE_NO_PAD.encode(b"{}");
        let age = Some(Duration::from_secs(3600));
        let fresh = sign(&payload, SALT, "k", now() - 60);
        assert!(unsign(fresh.as_bytes(), SALT, &keys(&["k"]), age).is_ok());
        let stale = sign(&payload, SALT, "k", now() - 7200);
        assert_eq!(
            unsign(stale.as_bytes(), SALT, &keys(&["k"]), age),
            Err(SignatureError::Expired)
        );
        assert!(unsign(stale.as_bytes(), SALT, &keys(&["k"]), None).is_ok());
    }

    #[test]
    fn base62_reads_what_django_writes() {
        for n in [0, 1, 61, 62, 1_764_000_000, i64::from(u32::MAX)] {
            assert_eq!(base62(&base62_encode(n)), Some(n));
        }
        assert_eq!(base62("-1z"), Some(-(62 + 61)));
        assert_eq!(base62(""), None);
        assert_eq!(base62("a_b"), None);
        assert_eq!(base62("zzzzzzzzzzzz"), None);
    }

    #[test]
    fn compressed_payloads_are_bounded() {
        use flate2::{write::ZlibEncoder, Compression};
        use std::io::Write;
        let mut z = ZlibEncoder::new(Vec::new(), Compression::best());
        z.write_all(&vec![b' '; MAX_SIGNED_BYTES + 10]).unwrap();
        let bomb = format!(".{}", URL_SAFE_NO_PAD.encode(z.finish().unwrap()));
        assert_eq!(
            unsign(
                sign(&bomb, SALT, "k", now()).as_bytes(),
                SALT,
                &keys(&["k"]),
                None
            ),
            Err(SignatureError::TooLarge)
        );
    }

    #[test]
    fn the_session_hash_follows_the_password_and_the_keys() {
        let password = "md5$salt$0123456789abcdef";
        let mut mac = salted_hmac(AUTH_HASH_SALT, "old");
        mac.update(password.as_bytes());
        let hash: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(session_hash_matches(
            &hash,
            password,
            &keys(&["new", "old"])
        ));
        assert!(!session_hash_matches(&hash, password, &keys(&["new"])));
        assert!(!session_hash_matches(
            &hash,
            "md5$salt$changed",
            &keys(&["old"])
        ));
        assert!(!session_hash_matches("zz", password, &keys(&["old"])));
        assert!(!session_hash_matches("", password, &keys(&["old"])));
    }
}
