//! Names that identify a NIC: the libvirt user alias and the OVS interface id.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

use super::NicError;

/// libvirt only honours a user-chosen alias when it starts with this.
const ALIAS_PREFIX: &str = "ua-";
/// `ua-` plus a hyphenated UUID is 39 characters. 64 leaves room for
/// callers' own schemes while keeping QEMU device ids, log lines and
/// `virsh` output short; libvirt itself documents no bound, so we set one
/// rather than pass arbitrarily long ids into QEMU's monitor.
const ALIAS_MAX: usize = 64;
const ALIAS_ALLOWED: &str = "\"ua-\" followed by 1+ of A-Z a-z 0-9 _ -, at most 64 characters";

/// A libvirt user alias (`<alias name='ua-…'/>`). With it, a NIC can be
/// found and detached unambiguously even when two NICs share a MAC.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Alias(String);

impl Alias {
    /// A fresh alias `ua-<uuid v4>`.
    pub fn generate() -> Self {
        Alias(format!("{ALIAS_PREFIX}{}", Uuid::new_v4().hyphenated()))
    }

    /// The alias, including its `ua-` prefix.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for Alias {
    type Error = NicError;

    fn try_from(s: &str) -> Result<Self, NicError> {
        let valid = s.len() <= ALIAS_MAX
            && s.strip_prefix(ALIAS_PREFIX).is_some_and(|rest| {
                !rest.is_empty()
                    && rest
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            });
        if valid {
            Ok(Alias(s.to_owned()))
        } else {
            Err(NicError::invalid("alias", s, ALIAS_ALLOWED))
        }
    }
}

impl FromStr for Alias {
    type Err = NicError;
    fn from_str(s: &str) -> Result<Self, NicError> {
        Alias::try_from(s)
    }
}

impl fmt::Display for Alias {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The OVS `external_ids:iface-id` of a port, which an SDN controller uses
/// to recognise the NIC. Always a UUID; the nil UUID is refused because it
/// would make every such port look the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InterfaceId(Uuid);

impl InterfaceId {
    /// The UUID.
    pub fn uuid(&self) -> Uuid {
        self.0
    }
}

impl TryFrom<&str> for InterfaceId {
    type Error = NicError;

    fn try_from(s: &str) -> Result<Self, NicError> {
        match Uuid::parse_str(s) {
            Ok(u) if !u.is_nil() => Ok(InterfaceId(u)),
            _ => Err(NicError::invalid(
                "interface_id",
                s,
                "a non-nil UUID like 3f2b6c1e-8d4a-4f57-9c2e-1a2b3c4d5e6f",
            )),
        }
    }
}

impl FromStr for InterfaceId {
    type Err = NicError;
    fn from_str(s: &str) -> Result<Self, NicError> {
        InterfaceId::try_from(s)
    }
}

impl fmt::Display for InterfaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_needs_ua_prefix_and_a_body() {
        assert_eq!(Alias::try_from("ua-net1").unwrap().as_str(), "ua-net1");
        assert!(Alias::try_from("ua-a_B-9").is_ok());
        for s in [
            "", "ua-", "net1", "UA-net1", "ua_net1", "ua-ne t", "ua-ne.t", "ua-né", "ua-'",
        ] {
            let e = Alias::try_from(s).unwrap_err();
            assert_eq!(e.field(), "alias", "{s:?}");
        }
    }

    #[test]
    fn alias_is_at_most_64_characters() {
        let max = format!("ua-{}", "a".repeat(61));
        assert_eq!(max.len(), 64);
        assert!(Alias::try_from(max.as_str()).is_ok());
        let over = format!("ua-{}", "a".repeat(62));
        assert!(Alias::try_from(over.as_str()).is_err());
    }

    #[test]
    fn generated_aliases_are_valid_and_distinct() {
        let a = Alias::generate();
        let b = Alias::generate();
        assert_ne!(a, b);
        assert_eq!(Alias::try_from(a.as_str()).unwrap(), a);
        assert_eq!(a.as_str().len(), 39);
    }

    #[test]
    fn interface_id_displays_lowercase_hyphenated() {
        let id = InterfaceId::try_from("3F2B6C1E8D4A4F579C2E1A2B3C4D5E6F").unwrap();
        assert_eq!(id.to_string(), "3f2b6c1e-8d4a-4f57-9c2e-1a2b3c4d5e6f");
    }

    #[test]
    fn interface_id_rejects_garbage_and_nil() {
        for s in [
            "",
            "not-a-uuid",
            "3f2b6c1e-8d4a-4f57-9c2e-1a2b3c4d5e6",
            "00000000-0000-0000-0000-000000000000",
        ] {
            let e = InterfaceId::try_from(s).unwrap_err();
            assert_eq!(e.field(), "interface_id", "{s:?}");
        }
    }
}
