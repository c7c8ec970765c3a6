//! What a Django session holds that matters here, read from its two serializations:
//! JSON (Django's default `SESSION_SERIALIZER`, and what signed session data holds)
//! and pickle (the cache backends pickle the session dict; the old `PickleSerializer`).
//!
//! The pickle reader builds plain values only and refuses any reference to a Python
//! class or function, so nothing is ever executed: a session holding a `datetime` or a
//! model instance is refused as a whole.

use serde::Deserialize;

/// Django's session key of the logged-in user's primary key (`auth.SESSION_KEY`).
const AUTH_USER_ID: &str = "_auth_user_id";
/// Django's session key of the user's password-derived hash (`auth.HASH_SESSION_KEY`).
const AUTH_USER_HASH: &str = "_auth_user_hash";

/// How signed session data is serialized (`SESSION_SERIALIZER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Serializer {
    /// `django.contrib.sessions.serializers.JSONSerializer` (the default).
    Json,
    /// `PickleSerializer` (removed in Django 5.0): plain values only.
    Pickle,
}

/// The session fields the gateway reads.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SessionFields {
    /// The user name field (`identity.django.user_field`), when the app stores one.
    pub user: Option<String>,
    /// The groups field (`identity.django.groups_field`, ws4redis's `memberof`).
    pub groups: Vec<String>,
    /// `_auth_user_id`: set when Django logged a user in.
    pub user_id: Option<String>,
    /// `_auth_user_hash`: checked against the user's password hash.
    pub user_hash: Option<String>,
}

/// Why session data could not be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("not a JSON object: {0}")]
    Json(String),
    #[error("pickle refused: {0}")]
    Pickle(String),
}

/// The fields of a JSON session.
pub fn fields_from_json(
    json: &[u8],
    user_field: &str,
    groups_field: &str,
) -> Result<SessionFields, FormatError> {
    use serde_json::Value;
    let session: serde_json::Map<String, Value> =
        serde_json::from_slice(json).map_err(|e| FormatError::Json(e.to_string()))?;
    let text = |field: &str| match session.get(field) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let groups = match session.get(groups_field) {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|g| g.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    Ok(SessionFields {
        user: session
            .get(user_field)
            .and_then(Value::as_str)
            .map(str::to_string),
        groups,
        user_id: text(AUTH_USER_ID),
        user_hash: text(AUTH_USER_HASH),
    })
}

/// The fields of a pickled session dict. Any class reference in the pickle (a
/// datetime, a model instance…) refuses the whole session.
pub fn fields_from_pickle(
    raw: &[u8],
    user_field: &str,
    groups_field: &str,
) -> Result<SessionFields, FormatError> {
    use serde_pickle::{HashableValue, Value};
    let value = serde_pickle::value_from_slice(raw, serde_pickle::DeOptions::new())
        .map_err(|e| FormatError::Pickle(e.to_string()))?;
    let Value::Dict(session) = value else {
        return Err(FormatError::Pickle("not a dict".into()));
    };
    let get = |field: &str| session.get(&HashableValue::String(field.to_string()));
    let text = |field: &str| match get(field) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::I64(n)) => Some(n.to_string()),
        _ => None,
    };
    let groups = match get(groups_field) {
        Some(Value::List(items) | Value::Tuple(items)) => items
            .iter()
            .filter_map(|g| match g {
                Value::String(s) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok(SessionFields {
        user: match get(user_field) {
            Some(Value::String(u)) => Some(u.clone()),
            _ => None,
        },
        groups,
        user_id: text(AUTH_USER_ID),
        user_hash: text(AUTH_USER_HASH),
    })
}

impl Serializer {
    /// Reads serialized session data.
    pub fn fields(
        self,
        data: &[u8],
        user_field: &str,
        groups_field: &str,
    ) -> Result<SessionFields, FormatError> {
        match self {
            Serializer::Json => fields_from_json(data, user_field, groups_field),
            Serializer::Pickle => fields_from_pickle(data, user_field, groups_field),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_fields_are_read_from_json() {
        let json =
            br#"{"_auth_user_id":"42","_auth_user_hash":"ab12","ws4redis:memberof":["staff",3]}"#;
        let fields = fields_from_json(json, "wsrelay:username", "ws4redis:memberof").unwrap();
        assert_eq!(fields.user, None);
        assert_eq!(fields.user_id.as_deref(), Some("42"));
        assert_eq!(fields.user_hash.as_deref(), Some("ab12"));
        assert_eq!(fields.groups, ["staff"]);
        assert!(fields_from_json(b"[1]", "u", "g").is_err());
    }

    #[test]
    fn pickles_with_class_references_are_refused() {
        // {'u': 'jane'} then a datetime global: protocol 2 opcodes written by hand.
        let plain = b"\x80\x02}q\x00X\x01\x00\x00\x00uq\x01X\x04\x00\x00\x00janeq\x02s.";
        let fields = fields_from_pickle(plain, "u", "g").unwrap();
        assert_eq!(fields.user.as_deref(), Some("jane"));
        let global = b"\x80\x02cdatetime\ndatetime\nq\x00.";
        assert!(matches!(
            fields_from_pickle(global, "u", "g"),
            Err(FormatError::Pickle(_))
        ));
        let os_system = b"cos\nsystem\n(S'true'\ntR.";
        assert!(matches!(
            fields_from_pickle(os_system, "u", "g"),
            Err(FormatError::Pickle(_))
        ));
    }
}
