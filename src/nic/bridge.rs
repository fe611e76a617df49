//! Host bridge names (Linux bridge or OVS bridge).

use std::fmt;
use std::str::FromStr;

use super::NicError;

/// Linux's IFNAMSIZ is 16 including the NUL terminator.
const MAX_LEN: usize = 15;
const ALLOWED: &str =
    "1-15 characters of A-Z a-z 0-9 _ . -, not starting with - (and not \".\" or \"..\")";

/// The name of a host bridge a NIC attaches to.
///
/// The kernel itself accepts almost any byte except `/`, whitespace, `:` and
/// NUL in an interface name. We accept far less: only `[A-Za-z0-9_.-]`.
/// - `/`, whitespace, `:`, NUL and control characters the kernel (or its
///   alias syntax) refuses anyway.
/// - Quotes, `<`, `>` and `&` are legal for the kernel, but no bridge meant
///   for guests needs them, and refusing them keeps logs, CLI output and
///   shell commands built from the name safe to read and paste. (The XML
///   writer escapes properly; this is not what keeps the XML well-formed.)
/// - libvirt's schema for `<source bridge=…>` admits only
///   `[a-zA-Z0-9_.\-\\:/ ]`, so anything else (`@`, `+`, non-ASCII) would
///   produce a document that fails `virt-xml-validate`.
/// - A leading `-` is refused: the name is passed to `ovs-vsctl` and shows
///   up in commands operators paste (`ip link set ... master NAME`), where
///   it would be read as an option.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BridgeName(String);

impl BridgeName {
    /// The name as the kernel knows it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for BridgeName {
    type Error = NicError;

    fn try_from(s: &str) -> Result<Self, NicError> {
        if s.is_empty() {
            return Err(NicError::invalid(
                "bridge",
                s,
                format!("{ALLOWED} (required)"),
            ));
        }
        let ok_chars = s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if s.len() > MAX_LEN || !ok_chars || s.starts_with('-') || s == "." || s == ".." {
            return Err(NicError::invalid("bridge", s, ALLOWED));
        }
        Ok(BridgeName(s.to_owned()))
    }
}

impl FromStr for BridgeName {
    type Err = NicError;
    fn from_str(s: &str) -> Result<Self, NicError> {
        BridgeName::try_from(s)
    }
}

impl fmt::Display for BridgeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A glob over bridge names, for `allow_bridges` and
/// `allow_promisc_bridges`: `*` matches any run of characters (also none),
/// `?` exactly one, everything else itself. No character classes: bridge
/// names are a small alphabet, and a pattern an operator can read at a
/// glance is worth more than expressiveness here.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BridgePattern(String);

const PATTERN_ALLOWED: &str = "1-64 characters of A-Z a-z 0-9 _ . - plus the wildcards * and ?";

impl BridgePattern {
    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `name` matches the whole pattern.
    pub fn matches(&self, name: &str) -> bool {
        glob_match(self.0.as_bytes(), name.as_bytes())
    }
}

/// Iterative wildcard match with single-star backtracking: linear in
/// practice, and no recursion an adversarial pattern could blow up.
fn glob_match(pat: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    // Where the last `*` was, and the name position it is matched up to.
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pat.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    // Let the star swallow one more character.
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

impl TryFrom<&str> for BridgePattern {
    type Error = NicError;

    fn try_from(s: &str) -> Result<Self, NicError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'*' | b'?')
            });
        if !ok {
            return Err(NicError::invalid("bridge pattern", s, PATTERN_ALLOWED));
        }
        Ok(BridgePattern(s.to_owned()))
    }
}

impl fmt::Display for BridgePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether any of `patterns` matches `name`.
pub fn any_matches(patterns: &[BridgePattern], name: &str) -> bool {
    patterns.iter().any(|p| p.matches(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typical_cloudstack_bridge_names_are_accepted() {
        for s in [
            "cloudbr0",
            "cloudbr1",
            "brvx-5000",
            "br-eth0-100",
            "b",
            "a_b.c",
        ] {
            assert_eq!(BridgeName::try_from(s).unwrap().as_str(), s);
        }
    }

    #[test]
    fn fifteen_bytes_fit_and_sixteen_do_not() {
        assert!(BridgeName::try_from("abcdefghijklmno").is_ok());
        let e = BridgeName::try_from("abcdefghijklmnop").unwrap_err();
        assert_eq!(e.field(), "bridge");
        assert!(e.to_string().contains("1-15"), "{e}");
    }

    #[test]
    fn empty_bridge_says_required() {
        let e = BridgeName::try_from("").unwrap_err();
        assert!(e.to_string().contains("required"), "{e}");
    }

    #[test]
    fn kernel_forbidden_and_unsafe_characters_are_rejected() {
        for s in [
            ".", "..", "br/0", "br 0", "br\t0", "br:0", "br\0", "br\n", "br'0", "br\"0", "br<0",
            "br>0", "br&0", "bré", "br@0", "br+0",
        ] {
            assert!(BridgeName::try_from(s).is_err(), "{s:?} accepted");
        }
    }

    #[test]
    fn a_leading_dash_is_refused_naming_the_field_and_form() {
        for s in ["-", "-br0", "--help"] {
            let e = BridgeName::try_from(s).unwrap_err();
            assert_eq!(e.field(), "bridge");
            assert!(e.to_string().contains("not starting with -"), "{e}");
        }
        assert!(BridgeName::try_from("br-0-").is_ok());
    }

    #[test]
    fn dots_inside_a_name_are_fine() {
        assert!(BridgeName::try_from("...").is_ok());
        assert!(BridgeName::try_from(".br").is_ok());
    }

    fn pat(s: &str) -> BridgePattern {
        BridgePattern::try_from(s).unwrap()
    }

    #[test]
    fn glob_matches_whole_names_only() {
        assert!(pat("*").matches("cloudbr0"));
        assert!(pat("cloudbr1").matches("cloudbr1"));
        assert!(!pat("cloudbr1").matches("cloudbr10"));
        assert!(pat("brvx-*").matches("brvx-5000"));
        assert!(pat("brvx-*").matches("brvx-"));
        assert!(!pat("brvx-*").matches("xbrvx-1"));
        assert!(pat("br*-1?0").matches("breth1-100"));
        assert!(!pat("br*-1?0").matches("breth1-10"));
        assert!(pat("*br*").matches("cloudbr0"));
        assert!(pat("a*b*c").matches("aXbYbZc"));
        assert!(!pat("a*b*c").matches("aXbYbZ"));
    }

    #[test]
    fn pattern_alphabet_is_the_bridge_alphabet_plus_wildcards() {
        for s in ["", "br 0", "br/*", "br[0-9]", &"x".repeat(65)] {
            assert!(BridgePattern::try_from(s).is_err(), "{s:?} accepted");
        }
    }
}
