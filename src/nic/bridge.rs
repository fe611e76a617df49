//! Host bridge names (Linux bridge or OVS bridge).

use std::fmt;
use std::str::FromStr;

use super::NicError;

/// Linux's IFNAMSIZ is 16 including the NUL terminator.
const MAX_LEN: usize = 15;
const ALLOWED: &str = "1-15 characters of A-Z a-z 0-9 _ . - (not \".\" or \"..\")";

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
        if s.len() > MAX_LEN || !ok_chars || s == "." || s == ".." {
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
    fn dots_inside_a_name_are_fine() {
        assert!(BridgeName::try_from("...").is_ok());
        assert!(BridgeName::try_from(".br").is_ok());
    }
}
