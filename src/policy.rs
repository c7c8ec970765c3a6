//! The access policy: what each socket may subscribe to and publish, which pages may
//! open sockets, and the limits a client cannot exceed. Decided before the upgrade.
//!
//! Safe defaults, and why:
//! - Every subscribe audience is allowed (user, group and session ones only exist with
//!   an identity, so a socket can only ever hear its own user, groups and session).
//! - Every client publish audience is **denied** unless a rule allows it: a browser that
//!   can publish to `broadcast:chat` can write into every other browser's page.
//!   `policy.compat = true` restores ws4redis's allow-everything behaviour for migrations.
//! - `Origin` must be the request's own host (or one of `allowed_origins`): sockets are
//!   authenticated by cookie, which a browser sends from any page, so without this check
//!   any site could open a socket as the logged-in user (cross-site WebSocket hijacking).
//!   A request without `Origin` does not come from a browser page and is let through.
//! - Connections per client address, subscriptions per socket, cookie size and
//!   handshake time are bounded.
//!
//! Rules are tried in order; the first whose `facility` pattern matches (`*` matches
//! any run of characters, `/` included) and whose `who` matches the identity decides.
//! They are the static half of the policy; the web application can have the last word
//! on each socket through the authorization callback ([`crate::authorize`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use actix_http::header;
use actix_http::RequestHead;
use serde::Deserialize;

use crate::channel::{AudienceKinds, Flags};
use crate::identity::Identity;
use crate::webapp::CallbackConfig;

/// `policy.*` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Allow every subscribe and publish flag, as ws4redis did.
    pub compat: bool,
    /// Origins (`https://app.example.com`) allowed besides the request's own host; `*`
    /// allows any.
    pub allowed_origins: Vec<String>,
    /// Proxies whose `X-Real-IP` / `X-Forwarded-For` name the client.
    pub trusted_proxies: Vec<IpAddr>,
    /// Open sockets per client address; 0 = no limit.
    pub max_connections_per_ip: u32,
    /// Redis keys one socket may listen to.
    pub max_subscriptions: usize,
    /// Largest `Cookie` header accepted, in bytes.
    pub max_cookie_bytes: usize,
    /// Seconds a client has to send each request head.
    pub handshake_timeout: f64,
    /// Seconds the rest of an HTTP request (body, answer) may take, and a write may wait
    /// for the client to read.
    pub request_timeout: f64,
    pub rules: Vec<Rule>,
    /// The authorization callback, asked after `rules` (see [`crate::authorize`]).
    pub callback: CallbackConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Broadcast,
    User,
    Group,
    Session,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Who {
    #[default]
    Anyone,
    Authenticated,
    /// Members of at least one of `groups`.
    Members,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub facility: String,
    #[serde(default)]
    pub who: Who,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default = "all_kinds")]
    pub subscribe: Vec<Kind>,
    #[serde(default)]
    pub publish: Vec<Kind>,
}

impl Rule {
    /// What the demo page needs: anyone may subscribe to and publish broadcast and
    /// session messages on `demo/…` facilities.
    pub fn demo() -> Rule {
        Rule {
            facility: "demo/*".into(),
            who: Who::Anyone,
            groups: vec![],
            subscribe: all_kinds(),
            publish: vec![Kind::Broadcast, Kind::Session],
        }
    }
}

fn all_kinds() -> Vec<Kind> {
    vec![Kind::Broadcast, Kind::User, Kind::Group, Kind::Session]
}

fn kinds(list: &[Kind]) -> AudienceKinds {
    AudienceKinds {
        broadcast: list.contains(&Kind::Broadcast),
        user: list.contains(&Kind::User),
        group: list.contains(&Kind::Group),
        session: list.contains(&Kind::Session),
    }
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

impl Rule {
    fn applies(&self, facility: &str, identity: &Identity) -> bool {
        glob_match(&self.facility, facility)
            && match self.who {
                Who::Anyone => true,
                Who::Authenticated => identity.user.is_some(),
                // Groups come only with a logged-in identity (a stock ws4redis
                // session has groups and no user name), as for group audiences.
                Who::Members => identity.groups.iter().any(|g| self.groups.contains(g)),
            }
    }
}

const FLAG_NAMES: [&str; 4] = ["broadcast", "user", "group", "session"];

fn refused_kind(wanted: AudienceKinds, allowed: AudienceKinds) -> Option<&'static str> {
    let pairs = [
        (wanted.broadcast, allowed.broadcast),
        (wanted.user, allowed.user),
        (wanted.group, allowed.group),
        (wanted.session, allowed.session),
    ];
    pairs
        .iter()
        .position(|&(w, a)| w && !a)
        .map(|i| FLAG_NAMES[i])
}

impl PolicyConfig {
    /// Checks the requested flags; the error is the reason given with 403.
    pub fn check_flags(
        &self,
        facility: &str,
        flags: &Flags,
        identity: &Identity,
    ) -> Result<(), String> {
        if self.compat {
            return Ok(());
        }
        let (subscribe, publish) = match self.rules.iter().find(|r| r.applies(facility, identity)) {
            Some(rule) => (kinds(&rule.subscribe), kinds(&rule.publish)),
            None => (kinds(&all_kinds()), AudienceKinds::default()),
        };
        if let Some(kind) = refused_kind(flags.subscribe, subscribe) {
            return Err(format!(
                "subscribe-{kind} is not allowed on facility {facility}"
            ));
        }
        if let Some(kind) = refused_kind(flags.publish, publish) {
            return Err(format!(
                "publish-{kind} is not allowed on facility {facility}"
            ));
        }
        Ok(())
    }

    /// Checks `Origin`: an http or https origin whose scheme and host are the
    /// request's own (the scheme is http, or what `X-Forwarded-Proto` says when a
    /// trusted proxy sent the request), or one of `allowed_origins`. Other schemes never
    /// pass. Requests without `Origin` do not come from a browser page and pass.
    pub fn check_origin(&self, head: &RequestHead, peer: Option<IpAddr>) -> Result<(), String> {
        // Drafts 7 and 8 of the protocol (still accepted) name it Sec-WebSocket-Origin.
        let origin = head
            .headers
            .get(header::ORIGIN)
            .or_else(|| head.headers.get("sec-websocket-origin"));
        let Some(origin) = origin else {
            return Ok(());
        };
        let origin = origin.to_str().unwrap_or("");
        let refused = || {
            Err(format!(
                "origin {origin:?} is not allowed (list it in policy.allowed_origins)"
            ))
        };
        let Some((scheme, authority)) = origin.split_once("://") else {
            return refused();
        };
        if !["http", "https"]
            .iter()
            .any(|s| s.eq_ignore_ascii_case(scheme))
        {
            return refused();
        }
        if self
            .allowed_origins
            .iter()
            .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
        {
            return Ok(());
        }
        let host = head.headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let own_host =
            host.is_some_and(|h| !authority.is_empty() && h.eq_ignore_ascii_case(authority));
        if own_host && scheme.eq_ignore_ascii_case(self.request_scheme(head, peer)) {
            return Ok(());
        }
        refused()
    }

    /// The scheme the client used: `http` (the gateway serves plain HTTP), or the one
    /// a trusted proxy names in `X-Forwarded-Proto`.
    fn request_scheme(&self, head: &RequestHead, peer: Option<IpAddr>) -> &'static str {
        if !peer.is_some_and(|p| self.trusted_proxies.contains(&p)) {
            return "http";
        }
        // The last entry is the one our own proxy wrote.
        let forwarded = head
            .headers
            .get_all("x-forwarded-proto")
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .last()
            .map(str::trim);
        match forwarded {
            Some(p) if p.eq_ignore_ascii_case("https") => "https",
            _ => "http",
        }
    }

    /// Whether `peer` is one of the trusted proxies.
    pub fn is_trusted_proxy(&self, peer: IpAddr) -> bool {
        self.trusted_proxies.contains(&peer)
    }

    /// The client's address: the peer, or what a trusted proxy says it forwarded.
    pub fn client_ip(&self, head: &RequestHead, peer: Option<IpAddr>) -> Option<IpAddr> {
        let peer = peer?;
        if !self.trusted_proxies.contains(&peer) {
            return Some(peer);
        }
        let headers = &head.headers;
        let real_ip = headers
            .get("x-real-ip")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<IpAddr>().ok())
            .map(|ip| ip.to_canonical());
        // Walking from the right (the entries our proxies appended), the first address
        // that is not a trusted proxy is the client. An entry that does not parse ends
        // the walk: what lies left of it was written by somebody we do not trust.
        let entries: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect();
        let mut forwarded = None;
        for entry in entries.iter().rev() {
            match entry.trim().parse::<IpAddr>().map(|ip| ip.to_canonical()) {
                Ok(ip) if self.trusted_proxies.contains(&ip) => continue,
                Ok(ip) => forwarded = Some(ip),
                Err(_) => {}
            }
            break;
        }
        Some(forwarded.or(real_ip).unwrap_or(peer))
    }
}

/// Counts the sockets of the process against `max_sockets`: the one ceiling on sockets.
#[derive(Debug)]
pub struct SocketLimit {
    open: AtomicUsize,
    max: usize,
}

/// One socket's place under `max_sockets`; given back when dropped (when the socket's
/// descriptor is released).
#[derive(Debug)]
pub struct SocketPermit(Arc<SocketLimit>);

impl SocketLimit {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(SocketLimit {
            open: AtomicUsize::new(0),
            max,
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// A place, or `None` when `max` sockets are open.
    pub fn try_acquire(self: &Arc<Self>) -> Option<SocketPermit> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| SocketPermit(self.clone()))
    }
}

impl Drop for SocketPermit {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts open sockets per client address.
#[derive(Debug, Default)]
pub struct IpLimiter {
    open: Mutex<HashMap<IpAddr, u32>>,
}

/// One open socket of an address; releases its slot when dropped.
#[derive(Debug)]
pub struct IpSlot {
    limiter: Arc<IpLimiter>,
    ip: IpAddr,
}

impl IpLimiter {
    /// Takes a slot for `ip`, or `None` when it already has `max` sockets (0 = no limit).
    pub fn acquire(self: &Arc<Self>, ip: IpAddr, max: u32) -> Option<IpSlot> {
        // unwrap: nothing panics while the map is locked.
        let mut open = self.open.lock().unwrap();
        let count = open.entry(ip).or_default();
        if max > 0 && *count >= max {
            return None;
        }
        *count += 1;
        Some(IpSlot {
            limiter: self.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        // unwrap: see `acquire`.
        let mut open = self.limiter.open.lock().unwrap();
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header;
    use actix_web::test::TestRequest;

    fn policy(rules: Vec<Rule>) -> PolicyConfig {
        PolicyConfig {
            compat: false,
            allowed_origins: vec![],
            trusted_proxies: vec!["10.0.0.1".parse().unwrap()],
            max_connections_per_ip: 0,
            max_subscriptions: 64,
            max_cookie_bytes: 8192,
            handshake_timeout: 5.0,
            request_timeout: 30.0,
            rules,
            callback: CallbackConfig::default(),
        }
    }

    fn identity(user: Option<&str>, groups: &[&str]) -> Identity {
        Identity::from_names(
            None,
            user.map(String::from),
            groups.iter().map(|g| g.to_string()).collect(),
        )
    }

    #[test]
    fn globs_match_runs_of_characters() {
        assert!(glob_match("chat/*", "chat/room1"));
        assert!(glob_match("*", "a/b/c"));
        assert!(glob_match("a*c", "abbbc"));
        assert!(!glob_match("chat/*", "chatroom"));
        assert!(!glob_match("news", "news2"));
        assert!(glob_match("a*b*c", "aXbYbZc"));
    }

    /// The policy matrix: each audience × anonymous/authenticated/member/non-member ×
    /// allowed/denied.
    #[test]
    fn policy_matrix() {
        let members = Rule {
            facility: "staff/*".into(),
            who: Who::Members,
            groups: vec!["staff".into()],
            subscribe: all_kinds(),
            publish: all_kinds(),
        };
        let authenticated = Rule {
            facility: "chat".into(),
            who: Who::Authenticated,
            groups: vec![],
            subscribe: all_kinds(),
            publish: vec![Kind::Broadcast],
        };
        let closed = Rule {
            facility: "staff/*".into(),
            who: Who::Anyone,
            groups: vec![],
            subscribe: vec![],
            publish: vec![],
        };
        let p = policy(vec![members, authenticated, closed]);
        let anon = identity(None, &[]);
        let jane = identity(Some("jane"), &[]);
        let staff = identity(Some("sam"), &["staff"]);
        let other = identity(Some("olga"), &["ops"]);
        for (i, kind) in FLAG_NAMES.iter().enumerate() {
            let flags = |publish: bool| {
                let q = format!("{}-{kind}", if publish { "publish" } else { "subscribe" });
                let _ = i;
                Flags::parse(&q)
            };
            // Default (no rule): every subscribe allowed for everybody, publish denied.
            for who in [&anon, &jane, &staff] {
                assert!(p.check_flags("news", &flags(false), who).is_ok());
                assert!(p.check_flags("news", &flags(true), who).is_err());
            }
            // Members rule: staff may do everything, non-members and anonymous nothing.
            assert!(p.check_flags("staff/x", &flags(false), &staff).is_ok());
            assert!(p.check_flags("staff/x", &flags(true), &staff).is_ok());
            for who in [&anon, &jane, &other] {
                assert!(
                    p.check_flags("staff/x", &flags(false), who).is_err(),
                    "{kind} {who:?}"
                );
                assert!(p.check_flags("staff/x", &flags(true), who).is_err());
            }
            // Authenticated rule: publish only to broadcast; anonymous falls to the default.
            assert_eq!(
                p.check_flags("chat", &flags(true), &jane).is_ok(),
                *kind == "broadcast"
            );
            assert!(p.check_flags("chat", &flags(true), &anon).is_err());
            assert!(p.check_flags("chat", &flags(false), &anon).is_ok());
        }
        let err = p
            .check_flags("news", &Flags::parse("publish-broadcast"), &jane)
            .unwrap_err();
        assert_eq!(err, "publish-broadcast is not allowed on facility news");
        let compat = PolicyConfig { compat: true, ..p };
        assert!(compat
            .check_flags("staff/x", &Flags::parse("publish-user"), &anon)
            .is_ok());
    }

    #[test]
    fn origin_must_be_own_scheme_and_host_or_listed() {
        let p = policy(vec![]);
        let direct: IpAddr = "9.9.9.9".parse().unwrap();
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let req = |origin: Option<&str>, proto: Option<&str>| {
            let mut r = TestRequest::default().insert_header((header::HOST, "app.example.com"));
            if let Some(o) = origin {
                r = r.insert_header((header::ORIGIN, o));
            }
            if let Some(p) = proto {
                r = r.insert_header(("x-forwarded-proto", p));
            }
            r.to_http_request()
        };
        let check = |origin, proto, peer| p.check_origin(req(origin, proto).head(), Some(peer));
        assert!(check(Some("http://app.example.com"), None, direct).is_ok());
        assert!(check(None, None, direct).is_ok());
        // The scheme counts: plain HTTP here, so an https page is another origin.
        assert!(check(Some("https://app.example.com"), None, direct).is_err());
        assert!(check(Some("ftp://app.example.com"), None, direct).is_err());
        // Behind a trusted TLS proxy the request's scheme is https.
        assert!(check(Some("https://app.example.com"), Some("https"), proxy).is_ok());
        assert!(check(Some("http://app.example.com"), Some("https"), proxy).is_err());
        // X-Forwarded-Proto from anybody else is not believed.
        assert!(check(Some("https://app.example.com"), Some("https"), direct).is_err());
        assert!(check(Some("https://evil.example"), None, direct).is_err());
        assert!(check(Some("null"), None, direct).is_err());
        let listed = PolicyConfig {
            allowed_origins: vec!["https://evil.example".into(), "*".into()],
            ..policy(vec![])
        };
        let req = req(Some("https://evil.example"), None);
        assert!(listed.check_origin(req.head(), Some(direct)).is_ok());
        let other = TestRequest::default()
            .insert_header((header::ORIGIN, "chrome-extension://abc"))
            .to_http_request();
        assert!(listed.check_origin(other.head(), Some(direct)).is_err());
    }

    #[test]
    fn forwarded_addresses_count_only_from_trusted_proxies() {
        let p = policy(vec![]);
        let req = TestRequest::default()
            .insert_header(("x-forwarded-for", "1.2.3.4, 10.0.0.1"))
            .to_http_request();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            p.client_ip(req.head(), Some(ip("10.0.0.1"))),
            Some(ip("1.2.3.4"))
        );
        assert_eq!(
            p.client_ip(req.head(), Some(ip("9.9.9.9"))),
            Some(ip("9.9.9.9"))
        );
        // A client-written entry left of an unparsable one is never believed.
        let spoofed = TestRequest::default()
            .insert_header(("x-forwarded-for", "6.6.6.6, 1.2.3.4:999"))
            .to_http_request();
        assert_eq!(
            p.client_ip(spoofed.head(), Some(ip("10.0.0.1"))),
            Some(ip("10.0.0.1"))
        );
    }

    #[test]
    fn socket_places_are_bounded_and_released() {
        let limit = SocketLimit::new(2);
        let a = limit.try_acquire().unwrap();
        let _b = limit.try_acquire().unwrap();
        assert!(limit.try_acquire().is_none());
        drop(a);
        assert!(limit.try_acquire().is_some());
    }

    #[test]
    fn ip_slots_are_bounded_and_released() {
        let limiter = Arc::new(IpLimiter::default());
        let ip: IpAddr = "1.2.3.4".parse().unwrap();
        let a = limiter.acquire(ip, 2).unwrap();
        let _b = limiter.acquire(ip, 2).unwrap();
        assert!(limiter.acquire(ip, 2).is_none());
        drop(a);
        assert!(limiter.acquire(ip, 2).is_some());
    }
}
