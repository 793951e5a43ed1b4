use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A user's identity. Stored as an integer, shown to clients as an opaque
/// decimal string (clients must not do arithmetic on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(pub i64);

/// A string that is not a user id; an unknown user as far as clients know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a user id: {0:?}")]
pub struct ParseUserIdError(pub String);

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for UserId {
    type Err = ParseUserIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Only canonical positive decimals: "+1", "01" and "-1" are not ids, so
        // one user has exactly one spelling.
        let canonical = !s.is_empty() && !s.starts_with(['+', '0']) && s.len() <= 19;
        match s.parse::<i64>() {
            Ok(n) if canonical && n > 0 => Ok(Self(n)),
            _ => Err(ParseUserIdError(s.chars().take(40).collect())),
        }
    }
}

impl Serialize for UserId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for UserId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_non_canonical() {
        for bad in [
            "",
            "0",
            "-3",
            "+3",
            "03",
            "abc",
            "1.5",
            "99999999999999999999",
        ] {
            assert!(bad.parse::<UserId>().is_err(), "{bad}");
        }
        assert_eq!("42".parse::<UserId>(), Ok(UserId(42)));
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(n in 1i64..) {
            let id = UserId(n);
            prop_assert_eq!(id.to_string().parse::<UserId>(), Ok(id));
            let json = serde_json::to_string(&id).unwrap();
            prop_assert_eq!(serde_json::from_str::<UserId>(&json).unwrap(), id);
        }
    }
}
