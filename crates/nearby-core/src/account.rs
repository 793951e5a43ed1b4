//! Account rules: what a username and a password may be.
//!
//! Checked once at the edge (sign-up) so stores can trust what they get.

/// Why a sign-up was refused before touching storage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    /// Username length or alphabet is wrong.
    #[error("username must be 3 to 32 characters of a-z, A-Z, 0-9, '_', '-' or '.'")]
    BadUsername,
    /// Password too short, or so long that hashing it would be a denial of service.
    #[error("password must be 8 to 128 characters")]
    BadPassword,
}

/// Validates a username: 3–32 ASCII letters, digits, `_`, `-`, `.`.
pub fn validate_username(name: &str) -> Result<(), AccountError> {
    let ok_len = (3..=32).contains(&name.len());
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok_len && ok_chars {
        Ok(())
    } else {
        Err(AccountError::BadUsername)
    }
}

/// Validates a password: 8–128 characters (not bytes).
pub fn validate_password(password: &str) -> Result<(), AccountError> {
    if (8..=128).contains(&password.chars().count()) {
        Ok(())
    } else {
        Err(AccountError::BadPassword)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        assert!(validate_username("alice_01").is_ok());
        assert!(validate_username("a.b-c").is_ok());
        assert_eq!(validate_username("ab"), Err(AccountError::BadUsername));
        assert_eq!(
            validate_username("has space"),
            Err(AccountError::BadUsername)
        );
        assert_eq!(validate_username("ünï"), Err(AccountError::BadUsername));
        assert_eq!(
            validate_username(&"x".repeat(33)),
            Err(AccountError::BadUsername)
        );
    }

    #[test]
    fn passwords() {
        assert!(validate_password("12345678").is_ok());
        assert!(validate_password(&"é".repeat(128)).is_ok());
        assert_eq!(validate_password("short"), Err(AccountError::BadPassword));
        assert_eq!(
            validate_password(&"x".repeat(129)),
            Err(AccountError::BadPassword)
        );
    }
}
