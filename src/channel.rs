//! Facilities, audiences and the Redis keys they make.
//!
//! This is the wire contract of ws4redis, in one place: a socket asks for a *facility*
//! (the rest of the URL path) and a set of *audiences* (query flags); each audience of a
//! facility is one Redis key, which names both the pub/sub channel and the stored last
//! message:
//!
//! | audience  | key                                    |
//! |-----------|----------------------------------------|
//! | broadcast | `{p}broadcast:{facility}`              |
//! | user      | `{p}user:{username}:{facility}`        |
//! | group     | `{p}group:{group}:{facility}`          |
//! | session   | `{p}session:{session_key}:{facility}`  |
//!
//! `{p}` is `{prefix}:` when a prefix is configured. Every name that becomes part of a
//! key is checked by [`validate_name`] first, so no client-controlled string can add a
//! `:` separator, a glob wildcard or a control character to a key.

use std::fmt;

/// ws4redis's `WS4REDIS_EXPIRE`: how long the last message of a key is kept, in seconds.
pub const DEFAULT_EXPIRE: u64 = 3600;

/// The longest facility, user, group or session name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 256;

/// What kind of name is being checked; used in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    Facility,
    User,
    Group,
    Session,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Facility => "facility",
            NameKind::User => "user name",
            NameKind::Group => "group name",
            NameKind::Session => "session key",
        })
    }
}

/// Why a name cannot become part of a Redis key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{0} is empty")]
    Empty(NameKind),
    #[error("{0} is longer than {MAX_NAME_LEN} bytes")]
    TooLong(NameKind),
    #[error("{0} contains {1:?}; refused are : * ? [ ] {{ }} \\ \" ' spaces and control characters{slash}", slash = if *.0 == NameKind::Facility { "" } else { ", and /" })]
    BadChar(NameKind, char),
    #[error("facility has an empty, '.' or '..' path segment")]
    BadSegment,
}

/// Characters no name may contain: the key separator, Redis pattern characters, Redis
/// Cluster hash-tag braces, and quotes.
const REFUSED: &str = ":*?[]{}\\\"'";

/// Checks that `name` is safe inside a Redis key.
///
/// Refused: `:` (the key separator), `* ? [ ] \` (pattern characters), `{ }` (Redis
/// Cluster hash tags), quotes, whitespace and control characters, and names longer than
/// [`MAX_NAME_LEN`]. `/` is allowed in facilities only, between non-empty segments
/// other than `.` and `..` (`chat/room1`), as ws4redis takes the rest of the URL path as
/// the facility. Everything else printable passes, so Django user names such as
/// `jane.doe+test@example.com` or `jörg` keep working.
pub fn validate_name(kind: NameKind, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty(kind));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong(kind));
    }
    let slash_ok = kind == NameKind::Facility;
    if let Some(c) = name.chars().find(|&c| {
        c.is_whitespace() || c.is_control() || REFUSED.contains(c) || (c == '/' && !slash_ok)
    }) {
        return Err(NameError::BadChar(kind, c));
    }
    if slash_ok
        && name
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(NameError::BadSegment);
    }
    Ok(())
}

/// One audience of a facility. The name inside `User`, `Group` and `Session` has been
/// validated when the value was built through [`Audience::user`] and friends.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Audience {
    Broadcast,
    User(String),
    Group(String),
    Session(String),
}

impl Audience {
    /// The audience's kind, as a metric label: `broadcast`, `user`, `group`, `session`.
    pub fn kind(&self) -> &'static str {
        match self {
            Audience::Broadcast => "broadcast",
            Audience::User(_) => "user",
            Audience::Group(_) => "group",
            Audience::Session(_) => "session",
        }
    }

    /// The group's name, for a group audience.
    pub fn group_name(&self) -> Option<&str> {
        match self {
            Audience::Group(name) => Some(name),
            _ => None,
        }
    }

    pub fn user(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        validate_name(NameKind::User, &name)?;
        Ok(Audience::User(name))
    }

    pub fn group(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        validate_name(NameKind::Group, &name)?;
        Ok(Audience::Group(name))
    }

    pub fn session(key: impl Into<String>) -> Result<Self, NameError> {
        let key = key.into();
        validate_name(NameKind::Session, &key)?;
        Ok(Audience::Session(key))
    }
}

/// The prefix part of every key; cheap to clone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySpace {
    /// `"{prefix}:"`, or empty.
    prefix: String,
}

impl KeySpace {
    /// `prefix` as configured (`redis.prefix`); `None` or `""` means no prefix.
    pub fn new(prefix: Option<&str>) -> Self {
        let prefix = match prefix {
            Some(p) if !p.is_empty() => format!("{p}:"),
            _ => String::new(),
        };
        KeySpace { prefix }
    }

    /// The Redis key of `audience` on `facility` (which must be validated).
    pub fn key(&self, audience: &Audience, facility: &str) -> String {
        let p = &self.prefix;
        match audience {
            Audience::Broadcast => format!("{p}broadcast:{facility}"),
            Audience::User(u) => format!("{p}user:{u}:{facility}"),
            Audience::Group(g) => format!("{p}group:{g}:{facility}"),
            Audience::Session(s) => format!("{p}session:{s}:{facility}"),
        }
    }

    /// A key of wsrelay's own (identity records, probes). It starts with `wsrelay:`,
    /// which no audience key does, so the two can never collide.
    pub fn internal(&self, rest: &str) -> String {
        format!("{}wsrelay:{rest}", self.prefix)
    }

    /// The parts of an audience key made by [`KeySpace::key`]: its audience kind, the
    /// group's name for a group key, and the facility. Names hold no `:`, so the split
    /// is unambiguous.
    pub fn parse<'k>(&self, key: &'k str) -> Option<KeyParts<'k>> {
        let rest = key.strip_prefix(self.prefix.as_str())?;
        let (kind, rest) = rest.split_once(':')?;
        let (kind, group, facility) = match kind {
            "broadcast" => ("broadcast", None, rest),
            "user" | "group" | "session" => {
                let (name, facility) = rest.split_once(':')?;
                let kind = match kind {
                    "user" => "user",
                    "group" => "group",
                    _ => "session",
                };
                (kind, (kind == "group").then_some(name), facility)
            }
            _ => return None,
        };
        Some(KeyParts {
            kind,
            group,
            facility,
        })
    }

    /// The stream that keeps `key`'s history. The whole key is its hash tag, so that in
    /// a Redis Cluster the stream, the id channel and the key share one slot (one
    /// script touches all three); names hold no braces, so the tag is the key exactly.
    pub fn history(&self, key: &str) -> String {
        self.internal(&format!("history:{{{key}}}"))
    }

    /// The channel on which a publication's id is announced, right before the
    /// publication itself goes out on `key` (see [`crate::broker::redis`]).
    pub fn id_channel(&self, key: &str) -> String {
        self.internal(&format!("id:{{{key}}}"))
    }

    /// The key whose ids `channel` announces, if it is an id channel.
    pub fn key_of_id_channel(&self, channel: &str) -> Option<String> {
        let key = channel
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("wsrelay:id:{")?
            .strip_suffix('}')?;
        Some(key.to_string())
    }
}

/// What an audience key names (see [`KeySpace::parse`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyParts<'k> {
    /// `broadcast`, `user`, `group` or `session`.
    pub kind: &'static str,
    pub group: Option<&'k str>,
    pub facility: &'k str,
}

/// Which of the four audience kinds a socket asked for, in one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AudienceKinds {
    pub broadcast: bool,
    pub user: bool,
    pub group: bool,
    pub session: bool,
}

impl AudienceKinds {
    pub fn any(&self) -> bool {
        self.broadcast || self.user || self.group || self.session
    }

    /// The kinds of `audiences`.
    pub fn of(audiences: &[Audience]) -> Self {
        let mut kinds = AudienceKinds::default();
        for audience in audiences {
            match audience {
                Audience::Broadcast => kinds.broadcast = true,
                Audience::User(_) => kinds.user = true,
                Audience::Group(_) => kinds.group = true,
                Audience::Session(_) => kinds.session = true,
            }
        }
        kinds
    }

    /// The names of the kinds present (metric labels), in a fixed order.
    pub fn names(&self) -> impl Iterator<Item = &'static str> {
        [
            (self.broadcast, "broadcast"),
            (self.user, "user"),
            (self.group, "group"),
            (self.session, "session"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
    }
}

/// The query flags of a WebSocket request (`?subscribe-broadcast&publish-user&echo`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags {
    pub subscribe: AudienceKinds,
    pub publish: AudienceKinds,
    pub echo: bool,
}

impl fmt::Display for Flags {
    /// The flags as a comma-separated list, in a fixed order.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.names().join(","))
    }
}

impl Flags {
    /// The flags' names (`subscribe-broadcast`, …, `echo`), in a fixed order.
    pub fn names(&self) -> Vec<&'static str> {
        const SUBSCRIBE: [&str; 4] = [
            "subscribe-broadcast",
            "subscribe-user",
            "subscribe-group",
            "subscribe-session",
        ];
        const PUBLISH: [&str; 4] = [
            "publish-broadcast",
            "publish-user",
            "publish-group",
            "publish-session",
        ];
        let on = |k: AudienceKinds| [k.broadcast, k.user, k.group, k.session];
        SUBSCRIBE
            .into_iter()
            .zip(on(self.subscribe))
            .chain(PUBLISH.into_iter().zip(on(self.publish)))
            .filter_map(|(name, on)| on.then_some(name))
            .chain(self.echo.then_some("echo"))
            .collect()
    }

    /// Keeps only the flags that `allowed` also has.
    pub fn narrow(&self, allowed: &Flags) -> Flags {
        let and = |a: AudienceKinds, b: AudienceKinds| AudienceKinds {
            broadcast: a.broadcast && b.broadcast,
            user: a.user && b.user,
            group: a.group && b.group,
            session: a.session && b.session,
        };
        Flags {
            subscribe: and(self.subscribe, allowed.subscribe),
            publish: and(self.publish, allowed.publish),
            echo: self.echo,
        }
    }

    /// A parameter of `query` that looks like a mistyped flag, for the log: one that
    /// starts with `subscribe-` or `publish-` but names no audience
    /// (`subscribe-braodcast`), or the first parameter of a query that names no flag
    /// at all (`subcribe-broadcast`). Other parameters (a cache buster next to real
    /// flags) are not mistakes.
    pub fn mistyped(query: &str) -> Option<&str> {
        const AUDIENCES: [&str; 4] = ["broadcast", "user", "group", "session"];
        let names = query
            .split('&')
            .map(|p| p.split_once('=').map_or(p, |(n, _)| n))
            .filter(|n| !n.is_empty());
        let mut first_unknown = None;
        let mut any_known = false;
        for name in names {
            let lower = name.to_ascii_lowercase();
            let audience = lower
                .strip_prefix("subscribe-")
                .or_else(|| lower.strip_prefix("publish-"));
            match audience {
                Some(a) if AUDIENCES.contains(&a) => any_known = true,
                Some(_) => return Some(name),
                None if lower == "echo" => any_known = true,
                None => {
                    first_unknown.get_or_insert(name);
                }
            }
        }
        first_unknown.filter(|_| !any_known)
    }

    /// Parses a query string. Flag names are case-insensitive, values are ignored and
    /// unknown parameters are skipped, as ws4redis does.
    pub fn parse(query: &str) -> Flags {
        let mut flags = Flags::default();
        for param in query.split('&') {
            let name = param.split_once('=').map_or(param, |(n, _)| n);
            let name = name.to_ascii_lowercase();
            let (kinds, audience) = if let Some(a) = name.strip_prefix("subscribe-") {
                (&mut flags.subscribe, a)
            } else if let Some(a) = name.strip_prefix("publish-") {
                (&mut flags.publish, a)
            } else {
                flags.echo |= name == "echo";
                continue;
            };
            match audience {
                "broadcast" => kinds.broadcast = true,
                "user" => kinds.user = true,
                "group" => kinds.group = true,
                "session" => kinds.session = true,
                _ => {}
            }
        }
        flags
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_back_into_their_parts() {
        for prefix in [None, Some("app")] {
            let space = KeySpace::new(prefix);
            let key = space.key(&Audience::group("staff").unwrap(), "chat/room");
            let parts = space.parse(&key).unwrap();
            assert_eq!(
                (parts.kind, parts.group, parts.facility),
                ("group", Some("staff"), "chat/room")
            );
            let key = space.key(&Audience::session("k1").unwrap(), "n");
            assert_eq!(space.parse(&key).unwrap().group, None);
            let key = space.key(&Audience::Broadcast, "a");
            assert_eq!(space.parse(&key).unwrap().facility, "a");
            let ids = space.id_channel(&key);
            assert_eq!(space.key_of_id_channel(&ids).as_deref(), Some(&*key));
            assert_eq!(
                space.history(&key),
                space.internal(&format!("history:{{{key}}}"))
            );
            assert_eq!(space.parse(&space.internal("probe:x")), None);
            assert_eq!(space.key_of_id_channel(&key), None);
        }
    }

    #[test]
    fn key_names_match_ws4redis() {
        let plain = KeySpace::new(None);
        assert_eq!(plain.key(&Audience::Broadcast, "chat"), "broadcast:chat");
        let ks = KeySpace::new(Some("app"));
        assert_eq!(ks.key(&Audience::Broadcast, "chat"), "app:broadcast:chat");
        assert_eq!(
            ks.key(&Audience::user("john").unwrap(), "chat"),
            "app:user:john:chat"
        );
        assert_eq!(
            ks.key(&Audience::group("staff").unwrap(), "a/b"),
            "app:group:staff:a/b"
        );
        assert_eq!(
            ks.key(&Audience::session("k1").unwrap(), "chat"),
            "app:session:k1:chat"
        );
        assert_eq!(ks.internal("identity:k1"), "app:wsrelay:identity:k1");
        assert_eq!(KeySpace::new(Some("")), plain);
    }

    #[test]
    fn names_refuse_what_could_collide_or_inject() {
        use NameKind::*;
        assert!(validate_name(Facility, "chat/room1").is_ok());
        assert!(validate_name(User, "jane.doe+x@example.com").is_ok());
        assert!(validate_name(User, "jürgen").is_ok());
        assert!(validate_name(User, "jörg✓").is_ok());
        for bad in [
            "a:b", "a*", "a?", "a[1]", "a b", "a\nb", "a\u{0}", "a\\b", "{tag}", "a\"b", "a\u{a0}b",
        ] {
            assert!(validate_name(Facility, bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            validate_name(User, "a/b"),
            Err(NameError::BadChar(User, '/'))
        );
        for bad in ["/chat", "chat/", "a//b", "a/../b", "./a"] {
            assert_eq!(validate_name(Facility, bad), Err(NameError::BadSegment));
        }
        assert_eq!(validate_name(Group, ""), Err(NameError::Empty(Group)));
        let long = "x".repeat(MAX_NAME_LEN + 1);
        assert_eq!(
            validate_name(Session, &long),
            Err(NameError::TooLong(Session))
        );
        assert!(validate_name(Session, &long[1..]).is_ok());
    }

    #[test]
    fn mistyped_flags_are_found_and_other_parameters_are_not() {
        for (query, found) in [
            ("subscribe-braodcast", Some("subscribe-braodcast")),
            ("subscribe-broadcast&Publish-Users=1", Some("Publish-Users")),
            ("subcribe-broadcast&x=1", Some("subcribe-broadcast")),
            ("subscribe-broadcast&_=1700000000", None),
            ("Subscribe-User&echo", None),
            ("echo&nocache", None),
            ("", None),
            ("&", None),
        ] {
            assert_eq!(Flags::mistyped(query), found, "{query}");
        }
    }

    #[test]
    fn flags_are_case_insensitive_and_ignore_values_and_unknowns() {
        let f = Flags::parse(
            "Subscribe-Broadcast&subscribe-user=1&publish-group&echo&x=y&subscribe-nope",
        );
        assert!(f.subscribe.broadcast && f.subscribe.user && !f.subscribe.group);
        assert!(!f.subscribe.session);
        assert!(f.publish.group && !f.publish.broadcast);
        assert!(f.echo);
        assert_eq!(Flags::parse(""), Flags::default());
        assert!(!Flags::parse("echoes").echo);
    }

    #[test]
    fn flag_names_parse_back_to_the_flags() {
        let f = Flags::parse("publish-session&echo&subscribe-group&subscribe-broadcast");
        assert_eq!(
            f.names(),
            [
                "subscribe-broadcast",
                "subscribe-group",
                "publish-session",
                "echo"
            ]
        );
        assert_eq!(Flags::parse(&f.names().join("&")), f);
        assert_eq!(f.to_string(), f.names().join(","));
    }
}
