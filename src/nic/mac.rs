//! Guest MAC addresses.

use std::fmt;
use std::str::FromStr;

use super::NicError;

const ALLOWED: &str = "a unicast, non-zero MAC like 52:54:00:12:34:56";

/// A unicast, non-zero Ethernet address for a guest NIC.
///
/// Multicast addresses (low bit of the first octet set, which includes the
/// broadcast address) are refused: a NIC with one would receive other
/// hosts' group traffic and libvirt's schema (`uniMacAddr`) rejects them.
/// The all-zero address is refused because QEMU treats it as "unset".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr([u8; 6]);

impl MacAddr {
    /// The six octets, most significant first.
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

fn hex_octet(s: &str) -> Option<u8> {
    // from_str_radix alone would accept "+f"; demand exactly two hex digits.
    if s.len() == 2 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        u8::from_str_radix(s, 16).ok()
    } else {
        None
    }
}

impl TryFrom<&str> for MacAddr {
    type Error = NicError;

    fn try_from(s: &str) -> Result<Self, NicError> {
        let bad = || NicError::invalid("mac", s, ALLOWED);
        if s.is_empty() {
            return Err(NicError::invalid("mac", s, format!("{ALLOWED} (required)")));
        }
        // One separator throughout: "aa:bb-cc..." is a typo, not a MAC.
        let sep = if s.contains(':') { ':' } else { '-' };
        let mut octets = [0u8; 6];
        let mut parts = s.split(sep);
        for slot in octets.iter_mut() {
            *slot = parts.next().and_then(hex_octet).ok_or_else(bad)?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if octets[0] & 0x01 != 0 || octets == [0; 6] {
            return Err(bad());
        }
        Ok(MacAddr(octets))
    }
}

impl FromStr for MacAddr {
    type Err = NicError;
    fn from_str(s: &str) -> Result<Self, NicError> {
        MacAddr::try_from(s)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            o[0], o[1], o[2], o[3], o[4], o[5]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_and_upper_case_parse_to_the_same_canonical_form() {
        let a = MacAddr::try_from("52:54:00:ab:cd:ef").unwrap();
        let b = MacAddr::try_from("52:54:00:AB:CD:EF").unwrap();
        assert_eq!(a, b);
        assert_eq!(b.to_string(), "52:54:00:ab:cd:ef");
        assert_eq!(a.octets(), [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]);
    }

    #[test]
    fn dash_separators_are_accepted_and_rendered_with_colons() {
        let a: MacAddr = "52-54-00-0A-0b-0c".parse().unwrap();
        assert_eq!(a.to_string(), "52:54:00:0a:0b:0c");
    }

    #[test]
    fn mixed_separators_are_rejected() {
        assert!(MacAddr::try_from("52:54-00:0a:0b:0c").is_err());
    }

    #[test]
    fn locally_administered_unicast_is_accepted() {
        assert!(MacAddr::try_from("02:00:00:00:00:01").is_ok());
        assert!(MacAddr::try_from("fe:ff:ff:ff:ff:ff").is_ok());
    }

    #[test]
    fn multicast_broadcast_and_zero_are_rejected() {
        for s in [
            "01:00:5e:00:00:01",
            "33:33:00:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "03:00:00:00:00:00",
            "00:00:00:00:00:00",
        ] {
            let e = MacAddr::try_from(s).unwrap_err();
            assert_eq!(e.field(), "mac", "{s}");
            assert!(e.to_string().contains(s), "{e}");
        }
    }

    #[test]
    fn garbage_is_rejected() {
        for s in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:01",
            "52:54:00:ab:cd:e",
            "52:54:00:ab:cd:efg",
            "52:54:00:ab:cd:+f",
            "525400abcdef",
            "52:54:00:ab:cd:ef ",
            " 52:54:00:ab:cd:ef",
            "52::54:00:ab:cd",
            "gg:54:00:ab:cd:ef",
            "52:54:00:ab:cd:éf",
            "52:54:00:ab:cd:ef:",
        ] {
            assert!(MacAddr::try_from(s).is_err(), "{s:?} accepted");
        }
    }

    #[test]
    fn empty_mac_says_required() {
        let e = MacAddr::try_from("").unwrap_err();
        assert!(e.to_string().contains("required"), "{e}");
    }
}
