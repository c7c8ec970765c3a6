//! What the gateway's two questions to the web application share: the identity
//! callback ([`crate::identity::callback`], "who is this?") and the authorization
//! callback ([`crate::authorize`], "may this socket use these flags?").
//!
//! Both are plain-HTTP requests to the application next to the gateway, sent on the
//! worker's own client, carrying the browser's `Cookie` and the headers their
//! `forward_headers` setting lists, bounded as a whole (answer body included) by their
//! `timeout`. Both cache answers, refusals included, for `cache_ttl` seconds and at most
//! `cache_size` entries, under a SHA-256 of everything the answer may depend on. Both
//! pass the application's refusal on to the browser: its status (401 or 403) and its
//! body as plain text, made safe by [`refusal_text`].
//!
//! The settings are the same for both (`identity.callback.*`, `policy.callback.*`):
//! one [`CallbackConfig`].

use std::fmt;
use std::time::Duration;

use actix_http::header::{HeaderMap, HeaderName, COOKIE};
use actix_http::{Method, StatusCode};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::ttl_cache::TtlCache;

/// Largest answer body read from the application (identities, allowed flags).
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Largest refusal text passed on to the browser, in bytes (cut on a character
/// boundary).
pub const MAX_REFUSAL_BYTES: usize = 1024;
/// Bytes of a refusal's body read: more than [`MAX_REFUSAL_BYTES`], because control
/// characters are stripped before the text is cut.
const REFUSAL_READ_BYTES: usize = 4 * MAX_REFUSAL_BYTES;
/// The reason given when the application refuses without saying why.
pub const DEFAULT_REFUSAL: &str = "refused by the application";

/// Seconds to wait for the application, by default.
pub const DEFAULT_CALLBACK_TIMEOUT: f64 = 2.0;
/// Seconds an answer is reused, by default.
pub const DEFAULT_CALLBACK_CACHE_TTL: f64 = 5.0;
/// Most answers cached, by default.
pub const DEFAULT_CALLBACK_CACHE_SIZE: usize = 10_000;

/// `identity.callback.*` and `policy.callback.*` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallbackConfig {
    pub url: Option<String>,
    /// Seconds to wait for the application (the whole answer).
    pub timeout: f64,
    /// Seconds an answer is reused; 0 disables the cache.
    pub cache_ttl: f64,
    pub cache_size: usize,
    /// Request headers passed on to the application (lower case).
    pub forward_headers: Vec<String>,
}

impl Default for CallbackConfig {
    fn default() -> Self {
        CallbackConfig {
            url: None,
            timeout: DEFAULT_CALLBACK_TIMEOUT,
            cache_ttl: DEFAULT_CALLBACK_CACHE_TTL,
            cache_size: DEFAULT_CALLBACK_CACHE_SIZE,
            forward_headers: Vec::new(),
        }
    }
}

/// A socket refused by the web application (or by an identity source): the status the
/// browser gets and the plain-text reason it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 401 or 403.
    pub status: StatusCode,
    pub reason: String,
}

impl Refusal {
    /// A 403 with the gateway's own reason.
    pub fn forbidden(reason: impl Into<String>) -> Refusal {
        Refusal {
            status: StatusCode::FORBIDDEN,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

/// The application's refusal body as the text the browser gets: decoded as UTF-8
/// (invalid bytes become U+FFFD), tabs and line breaks turned into spaces, every other
/// control character dropped, trimmed, and cut to at most [`MAX_REFUSAL_BYTES`] on a
/// character boundary. Nothing left: [`DEFAULT_REFUSAL`].
pub fn refusal_text(body: &[u8]) -> String {
    let mut text = String::with_capacity(body.len().min(MAX_REFUSAL_BYTES));
    for c in String::from_utf8_lossy(body).chars() {
        let c = match c {
            c if c.is_control() && c.is_whitespace() => ' ',
            c if c.is_control() => continue,
            c => c,
        };
        if text.len() + c.len_utf8() > MAX_REFUSAL_BYTES {
            break;
        }
        text.push(c);
    }
    match text.trim() {
        "" => DEFAULT_REFUSAL.into(),
        trimmed => trimmed.into(),
    }
}

/// The refusal an answer of `status` (401 or 403) carries: the start of its body, made
/// safe. A body that cannot be read gives what was read, or the default reason.
pub async fn read_refusal<S, E>(status: StatusCode, body: &mut S) -> Refusal
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    let mut read = Vec::new();
    while read.len() < REFUSAL_READ_BYTES {
        match body.next().await {
            Some(Ok(chunk)) => {
                let room = REFUSAL_READ_BYTES - read.len();
                read.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Some(Err(_)) | None => break,
        }
    }
    Refusal {
        status,
        reason: refusal_text(&read),
    }
}

/// A cache key: a SHA-256 over the parts of a question.
pub type CacheKey = [u8; 32];

/// One endpoint of the web application: its URL, what is forwarded to it, and the
/// cache of its answers (`V`: an answer, or a refusal).
pub struct Endpoint<V> {
    pub url: String,
    timeout: Duration,
    /// `Cookie`, then the configured headers.
    forward: Vec<HeaderName>,
    cache: TtlCache<CacheKey, V>,
}

impl<V: Clone> Endpoint<V> {
    /// The endpoint `config` describes; `section` (`identity.callback`) names the
    /// settings in errors.
    pub fn new(section: &str, config: &CallbackConfig) -> Result<Self, String> {
        let url = config
            .url
            .clone()
            .ok_or_else(|| format!("{section}.url is not set"))?;
        if !url.starts_with("http://") {
            return Err(format!(
                "{section}.url must be an http:// URL of the web application"
            ));
        }
        let mut forward = vec![COOKIE];
        for name in &config.forward_headers {
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{section}.forward_headers: bad header name {name:?}"))?;
            forward.push(header);
        }
        Ok(Endpoint {
            url,
            timeout: Duration::from_secs_f64(config.timeout),
            forward,
            cache: TtlCache::new(Duration::from_secs_f64(config.cache_ttl), config.cache_size),
        })
    }

    /// How long one question may take, answer body included.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The cache key of a question made of `parts` and the forwarded request headers:
    /// each part length-prefixed so that no two different questions share a key, and
    /// the key's size fixed whatever the size of the headers.
    pub fn key(&self, parts: &[&[u8]], headers: &HeaderMap) -> CacheKey {
        let mut hash = Sha256::new();
        let mut part = |bytes: &[u8]| {
            hash.update((bytes.len() as u64).to_le_bytes());
            hash.update(bytes);
        };
        for bytes in parts {
            part(bytes);
        }
        for name in &self.forward {
            let values: Vec<_> = headers.get_all(name).collect();
            part(name.as_str().as_bytes());
            part(&(values.len() as u64).to_le_bytes());
            for value in values {
                part(value.as_bytes());
            }
        }
        hash.finalize().into()
    }

    /// The answer cached under `key`, if still fresh.
    pub fn cached(&self, key: &CacheKey) -> Option<V> {
        self.cache.get(key)
    }

    /// Caches `answer` (unless the cache is off, or full of fresh answers).
    pub fn remember(&self, key: CacheKey, answer: &V) {
        self.cache.put(key, answer.clone());
    }

    /// A request to `url` (the endpoint's, with a query perhaps) carrying the
    /// forwarded headers of the browser's request.
    pub fn request(
        &self,
        client: &awc::Client,
        method: Method,
        url: &str,
        headers: &HeaderMap,
    ) -> awc::ClientRequest {
        let mut call = client.request(method, url).timeout(self.timeout);
        for name in &self.forward {
            for value in headers.get_all(name) {
                call = call.append_header((name.clone(), value.clone()));
            }
        }
        call
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn refusal_text_keeps_plain_text() {
        assert_eq!(
            refusal_text(b"Your subscription has expired"),
            "Your subscription has expired"
        );
        assert_eq!(
            refusal_text("Abonnement abgelaufen: ä€😀".as_bytes()),
            "Abonnement abgelaufen: ä€😀"
        );
    }

    #[test]
    fn refusal_text_strips_controls_and_falls_back() {
        assert_eq!(
            refusal_text(b"\x1b[31mred\x1b[0m\r\nline\ttwo\x00\x7f"),
            "[31mred[0m  line two"
        );
        assert_eq!(refusal_text(b""), DEFAULT_REFUSAL);
        assert_eq!(refusal_text(b" \r\n\t\x01 "), DEFAULT_REFUSAL);
        assert_eq!(refusal_text(b"bad \xff byte"), "bad \u{fffd} byte");
        assert_eq!(refusal_text("a\u{85}b\u{9f}c".as_bytes()), "a bc");
    }

    #[test]
    fn refusal_text_is_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_REFUSAL_BYTES);
        let text = refusal_text(long.as_bytes());
        assert_eq!(text.len(), MAX_REFUSAL_BYTES);
        let odd = format!("x{long}");
        let text = refusal_text(odd.as_bytes());
        assert_eq!(text.len(), MAX_REFUSAL_BYTES - 1);
        assert!(text.ends_with('é'));
    }

    #[tokio::test]
    async fn a_refusal_reads_only_the_start_of_its_body() {
        let chunks: Vec<Result<Bytes, ()>> = vec![
            Ok(Bytes::from_static(b"no\n")),
            Ok(Bytes::from(vec![b'x'; 10 * REFUSAL_READ_BYTES])),
            Err(()),
        ];
        let mut body = futures_util::stream::iter(chunks);
        let refusal = read_refusal(StatusCode::UNAUTHORIZED, &mut body).await;
        assert_eq!(refusal.status, StatusCode::UNAUTHORIZED);
        assert_eq!(refusal.reason.len(), MAX_REFUSAL_BYTES);
        assert!(refusal.reason.starts_with("no xxx"));
        // The rest of the body is never read.
        assert!(body.next().await.is_some());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Whatever the application sends, the browser gets non-empty text, within the
        /// bound, without a control character, without surrounding spaces.
        #[test]
        fn refusal_text_is_always_safe(body in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let text = refusal_text(&body);
            prop_assert!(!text.is_empty() && text.len() <= MAX_REFUSAL_BYTES);
            prop_assert!(!text.chars().any(char::is_control));
            prop_assert_eq!(text.trim(), text.as_str());
        }

        /// Text without control characters that fits passes unchanged (bar trimming).
        #[test]
        fn fitting_text_passes_unchanged(text in "[^\\p{Cc}]{1,300}") {
            let trimmed = text.trim();
            prop_assume!(!trimmed.is_empty() && trimmed.len() <= MAX_REFUSAL_BYTES);
            prop_assert_eq!(refusal_text(text.as_bytes()), trimmed);
        }

        /// A text that is too long is cut to a prefix of itself.
        #[test]
        fn long_text_is_a_prefix(text in "[a-zé€😀 ]{300,1200}") {
            prop_assume!(!text.trim().is_empty());
            let cut = refusal_text(text.as_bytes());
            prop_assert!(text.trim_start().starts_with(&cut));
        }
    }
}
