//! Secrets in the configuration: never shown in logs, given inline or as a file.

use std::path::Path;

use serde::Deserialize;

/// A setting that must never reach a log: `Debug` shows `***`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// A secret given inline (`value`) or as a file (`file`, its trailing line break
/// dropped); the inline value wins. `file_setting` names the file setting in errors.
pub fn secret_value(
    value: Option<&Secret>,
    file: Option<&Path>,
    file_setting: &str,
) -> Result<Option<String>, String> {
    match (value, file) {
        (Some(secret), _) => Ok(Some(secret.expose().to_string())),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(|s| Some(s.trim_end_matches(['\n', '\r']).to_string()))
            .map_err(|e| format!("{file_setting}: cannot read {}: {e}", path.display())),
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_secret_file_is_named() {
        let path = Path::new("/nonexistent/wsrelay/secret_key");
        let err = secret_value(None, Some(path), "identity.django.secret_key_file").unwrap_err();
        assert!(
            err.starts_with(
                "identity.django.secret_key_file: cannot read /nonexistent/wsrelay/secret_key: "
            ),
            "{err}"
        );
        let inline = Secret::new("s");
        assert_eq!(
            secret_value(Some(&inline), Some(path), "x")
                .unwrap()
                .as_deref(),
            Some("s")
        );
    }
}
