//! Per-facility behaviour (`[[facility]]` in the configuration): how many messages a
//! key keeps for clients that resume, and what happens to a socket that falls behind.
//!
//! The first rule whose `pattern` matches the facility wins (`*` matches any run of
//! characters, as in the access policy); a facility no rule matches gets the defaults:
//! no history, and slow consumers are closed (4000).

use serde::Deserialize;

use crate::policy::glob_match;

/// Most messages one key may keep in its history.
pub const MAX_HISTORY: usize = 100_000;
/// How long a history entry is kept when a rule does not say, in seconds.
pub const DEFAULT_HISTORY_TTL: u64 = 3600;

/// What a socket that falls behind (more than `queue_bytes` waiting) gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlowConsumer {
    /// Closed with 4000; the client reconnects (and resumes, when it can).
    #[default]
    Close,
    /// Kept open: only the newest message per key stays queued.
    Conflate,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FacilityRule {
    pub pattern: String,
    /// Messages kept per key for resuming clients; 0 turns history off.
    #[serde(default)]
    pub history: usize,
    /// Seconds a history entry is kept (and an idle key's history with it).
    #[serde(default = "default_history_ttl")]
    pub history_ttl: u64,
    #[serde(default)]
    pub slow_consumer: SlowConsumer,
}

fn default_history_ttl() -> u64 {
    DEFAULT_HISTORY_TTL
}

/// What one facility gets, resolved from the rules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FacilityKind {
    /// `(messages, seconds)` kept per key, when the facility has history.
    pub history: Option<History>,
    pub slow_consumer: SlowConsumer,
}

/// A key's history bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct History {
    pub len: usize,
    pub ttl: u64,
}

/// The configured rules, in order.
#[derive(Debug, Clone, Default)]
pub struct Facilities {
    rules: Vec<FacilityRule>,
}

impl Facilities {
    pub fn new(rules: Vec<FacilityRule>) -> Self {
        Facilities { rules }
    }

    /// What `facility` gets: the first matching rule, or the defaults.
    pub fn of(&self, facility: &str) -> FacilityKind {
        let Some(rule) = self.rules.iter().find(|r| glob_match(&r.pattern, facility)) else {
            return FacilityKind::default();
        };
        FacilityKind {
            history: (rule.history > 0).then_some(History {
                len: rule.history,
                ttl: rule.history_ttl,
            }),
            slow_consumer: rule.slow_consumer,
        }
    }

    /// Whether any facility keeps history (the gateway then needs its stream reads).
    pub fn any_history(&self) -> bool {
        self.rules.iter().any(|r| r.history > 0)
    }
}

/// Checks the rules; the error says which rule and why.
pub fn validate(rules: &[FacilityRule], max_expire: u64) -> Result<(), String> {
    for (i, rule) in rules.iter().enumerate() {
        let at = format!("rule {} (pattern {:?})", i + 1, rule.pattern);
        if rule.pattern.is_empty() {
            return Err(format!("{at}: pattern must not be empty"));
        }
        if rule.history > MAX_HISTORY {
            return Err(format!("{at}: history must be at most {MAX_HISTORY}"));
        }
        if rule.history > 0 && !(1..=max_expire).contains(&rule.history_ttl) {
            return Err(format!(
                "{at}: history_ttl must be between 1 and {max_expire} seconds"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(pattern: &str, history: usize, slow: SlowConsumer) -> FacilityRule {
        FacilityRule {
            pattern: pattern.into(),
            history,
            history_ttl: 60,
            slow_consumer: slow,
        }
    }

    #[test]
    fn the_first_matching_rule_wins() {
        let f = Facilities::new(vec![
            rule("prices/*", 0, SlowConsumer::Conflate),
            rule("*", 100, SlowConsumer::Close),
        ]);
        assert_eq!(
            f.of("prices/eur"),
            FacilityKind {
                history: None,
                slow_consumer: SlowConsumer::Conflate
            }
        );
        assert_eq!(f.of("chat").history, Some(History { len: 100, ttl: 60 }));
        assert_eq!(Facilities::default().of("chat"), FacilityKind::default());
        assert!(f.any_history());
    }

    #[test]
    fn bad_rules_are_named() {
        let err = validate(&[rule("", 1, SlowConsumer::Close)], 10).unwrap_err();
        assert!(err.contains("rule 1"), "{err}");
        let mut r = rule("chat", 5, SlowConsumer::Close);
        r.history_ttl = 0;
        assert!(validate(&[r], 10).unwrap_err().contains("history_ttl"));
        let r = rule("chat", MAX_HISTORY + 1, SlowConsumer::Close);
        assert!(validate(&[r], 10).unwrap_err().contains("at most"));
    }
}
