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

/// The one spelling a username is stored and looked up under: Unicode NFKC
/// (so full-width `ａｌｉｃｅ` is `alice`), then lower case, then checked
/// with [`validate_username`]. `alice`, `Alice` and `ALICE` are one account;
/// the ASCII-only alphabet leaves no room for look-alike letters from other
/// scripts (Cyrillic `а` is refused, not folded).
pub fn canonical_username(raw: &str) -> Result<String, AccountError> {
    use unicode_normalization::UnicodeNormalization;
    // Bounded before normalizing: a megabyte of input costs nothing.
    if raw.len() > 4 * 32 {
        return Err(AccountError::BadUsername);
    }
    let name: String = raw.nfkc().flat_map(char::to_lowercase).collect();
    validate_username(&name)?;
    Ok(name)
}

/// A password as it is hashed: Unicode NFKC (NIST SP 800-63B 5.1.1.2), so
/// the same characters typed on keyboards that compose them differently
/// (precomposed `é` or `e` + combining accent) are the same password.
pub fn normalize_password(raw: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    raw.nfkc().collect()
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
    fn usernames_fold_case_and_width_but_not_scripts() {
        assert_eq!(canonical_username("ALICE").as_deref(), Ok("alice"));
        assert_eq!(canonical_username("Alice_01").as_deref(), Ok("alice_01"));
        assert_eq!(canonical_username("ａｌｉｃｅ").as_deref(), Ok("alice"));
        // Cyrillic а (U+0430) looks like Latin a: refused, never folded.
        assert_eq!(
            canonical_username("\u{430}lice"),
            Err(AccountError::BadUsername)
        );
        assert_eq!(
            canonical_username(&"A".repeat(1000)),
            Err(AccountError::BadUsername)
        );
    }

    #[test]
    fn passwords_compare_after_nfkc() {
        let nfc = "caf\u{e9} au lait";
        let nfd = "cafe\u{301} au lait";
        assert_ne!(nfc, nfd);
        assert_eq!(normalize_password(nfc), normalize_password(nfd));
        assert_eq!(normalize_password("plain ascii"), "plain ascii");
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
