//! Identity from a signed token, for pages on another origin where cookies do not flow.
//!
//! The token is an HS256 JWT, taken from the `token` query parameter or from the cookie
//! named by `identity.token.cookie`. Claims: `sub` is the user name, `groups` a list of
//! group names, `session` an optional session key, and `exp` (required) the expiry in
//! seconds since the epoch. Only HS256 is accepted (`none` and every other algorithm
//! are refused). A missing token gives an anonymous socket; a token that does not verify
//! or has expired refuses the socket with 403. Tokens in URLs end up in access logs:
//! keep them short-lived.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use futures_util::future::LocalBoxFuture;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use super::{cookie, Handshake, Identity, IdentityError, IdentityResolver, Refusal};
use crate::secret::{secret_value, Secret};

/// Longest token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// `identity.token.*` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub secret: Option<Secret>,
    pub secret_file: Option<PathBuf>,
    /// A cookie that may carry the token, besides the `token` query parameter.
    pub cookie: Option<String>,
    /// Seconds of clock skew tolerated on `exp`.
    pub leeway: u64,
}

#[derive(Debug, Deserialize)]
struct Header {
    alg: String,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
    session: Option<String>,
    exp: Option<f64>,
    nbf: Option<f64>,
}

pub struct TokenResolver {
    secret: Vec<u8>,
    cookie: Option<String>,
    leeway: u64,
}

impl TokenResolver {
    pub fn new(config: TokenConfig) -> Result<Self, String> {
        let secret = secret_value(
            config.secret.as_ref(),
            config.secret_file.as_deref(),
            "identity.token.secret_file",
        )?
        .ok_or("identity.token.secret or secret_file must be set")?
        .into_bytes();
        if secret.len() < 32 {
            return Err("identity.token: the secret must be at least 32 bytes".into());
        }
        Ok(TokenResolver {
            secret,
            cookie: config.cookie,
            leeway: config.leeway,
        })
    }

    fn token<'r>(&self, handshake: &'r Handshake<'_>) -> Option<std::borrow::Cow<'r, str>> {
        let from_query = handshake
            .head
            .uri
            .query()
            .unwrap_or("")
            .split('&')
            .find_map(|p| p.strip_prefix("token="))
            .map(|t| percent_encoding::percent_decode_str(t).decode_utf8_lossy());
        from_query.or_else(|| {
            let name = self.cookie.as_deref()?;
            cookie(&handshake.head.headers, name).map(std::borrow::Cow::Borrowed)
        })
    }

    /// Verifies `token` at time `now` (seconds since the epoch).
    pub fn verify(&self, token: &str, now: f64) -> Result<Identity, String> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err("token too long".into());
        }
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a JWT".into());
        };
        let decode = |part: &str| {
            URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|_| "bad base64".to_string())
        };
        let header: Header =
            serde_json::from_slice(&decode(header)?).map_err(|e| format!("bad header: {e}"))?;
        if header.alg != "HS256" {
            return Err(format!(
                "algorithm {:?} is not accepted (HS256 only)",
                header.alg
            ));
        }
        // unwrap: HMAC accepts keys of any length.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).unwrap();
        let signed_len = token.len() - signature.len() - 1;
        mac.update(&token.as_bytes()[..signed_len]);
        mac.verify_slice(&decode(signature)?)
            .map_err(|_| "bad signature".to_string())?;
        let claims: Claims =
            serde_json::from_slice(&decode(payload)?).map_err(|e| format!("bad claims: {e}"))?;
        let leeway = self.leeway as f64;
        match claims.exp {
            None => return Err("no exp claim".into()),
            Some(exp) if now > exp + leeway => return Err("expired".into()),
            Some(_) => {}
        }
        if claims.nbf.is_some_and(|nbf| now + leeway < nbf) {
            return Err("not valid yet".into());
        }
        Ok(Identity::from_names(
            claims.session,
            claims.sub,
            claims.groups,
        ))
    }
}

impl IdentityResolver for TokenResolver {
    fn resolve<'a>(
        &'a self,
        handshake: &'a Handshake<'a>,
    ) -> LocalBoxFuture<'a, Result<Identity, IdentityError>> {
        Box::pin(async move {
            let Some(token) = self.token(handshake) else {
                return Ok(Identity::default());
            };
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.verify(&token, now).map_err(|why| {
                IdentityError::Refused(Refusal::forbidden(format!("invalid token: {why}")))
            })
        })
    }
}

/// Builds an HS256 token; for tests and for applications written in Rust.
pub fn sign_token(secret: &[u8], claims: &serde_json::Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    // unwrap: HMAC accepts keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(format!("{header}.{payload}").as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{header}.{payload}.{signature}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn resolver() -> TokenResolver {
        TokenResolver {
            secret: SECRET.to_vec(),
            cookie: None,
            leeway: 0,
        }
    }

    #[test]
    fn a_valid_token_gives_user_groups_and_session() {
        let t = sign_token(
            SECRET,
            &json!({"sub": "jane", "groups": ["staff", "x:y"], "session": "s1", "exp": 2000}),
        );
        let id = resolver().verify(&t, 1000.0).unwrap();
        assert_eq!(id.user.as_deref(), Some("jane"));
        assert_eq!(id.groups, ["staff"]);
        assert_eq!(id.session.as_deref(), Some("s1"));
    }

    #[test]
    fn expired_tampered_unsigned_and_foreign_tokens_are_refused() {
        let r = resolver();
        let t = sign_token(SECRET, &json!({"sub": "jane", "exp": 2000}));
        assert_eq!(r.verify(&t, 2001.0).unwrap_err(), "expired");
        let no_exp = sign_token(SECRET, &json!({"sub": "jane"}));
        assert_eq!(r.verify(&no_exp, 1.0).unwrap_err(), "no exp claim");
        let other = sign_token(
            b"another secret of thirty-two bytes!",
            &json!({"sub": "jane", "exp": 2000}),
        );
        assert_eq!(r.verify(&other, 1.0).unwrap_err(), "bad signature");
        let (head, rest) = t.split_once('.').unwrap();
        let forged_claims = URL_SAFE_NO_PAD.encode(br#"{"sub":"admin","exp":2000}"#);
        let sig = rest.rsplit_once('.').unwrap().1;
        assert_eq!(
            r.verify(&format!("{head}.{forged_claims}.{sig}"), 1.0)
                .unwrap_err(),
            "bad signature"
        );
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            forged_claims
        );
        assert!(r.verify(&none, 1.0).unwrap_err().contains("not accepted"));
        assert_eq!(r.verify("a.b", 1.0).unwrap_err(), "not a JWT");
    }
}
