//! The one error type of the request model.

/// Why a NIC request was rejected. Every variant names the proto field the
/// caller has to change, so the gRPC layer can map it to
/// `INVALID_ARGUMENT` with a message an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NicError {
    /// `{field}`: {value:?} is not valid; allowed: {allowed}
    #[error("invalid {field} {value:?}: allowed {allowed}")]
    Invalid {
        /// Proto field name, e.g. `vlan` or `inbound.peak_kbps`.
        field: &'static str,
        /// The offending value as the caller gave it, cut to
        /// [`MAX_ECHOED_CHARS`] characters.
        value: String,
        /// What would have been accepted, e.g. `1-4094`.
        allowed: String,
    },
    /// A cross-field conflict, e.g. mtu with model e1000.
    #[error("{field}: {reason}")]
    Conflict {
        /// Proto field name the caller should change.
        field: &'static str,
        /// Why the combination is refused.
        reason: String,
    },
}

/// How much of a rejected value an error repeats. The message travels back
/// in the `grpc-message` header: echoing a 60 KiB value whole (the request
/// limit is 64 KiB) overflows the client's HTTP/2 header limit and turns
/// INVALID_ARGUMENT into an h2 protocol error.
pub const MAX_ECHOED_CHARS: usize = 64;

/// `value` cut to [`MAX_ECHOED_CHARS`] characters, for messages that
/// repeat caller input.
pub(crate) fn cut(value: &str) -> String {
    match value.char_indices().nth(MAX_ECHOED_CHARS) {
        Some((cut, _)) => format!("{}…", &value[..cut]),
        None => value.to_string(),
    }
}

impl NicError {
    /// The proto field name this error is about.
    pub fn field(&self) -> &'static str {
        match self {
            NicError::Invalid { field, .. } | NicError::Conflict { field, .. } => field,
        }
    }

    pub(crate) fn invalid(
        field: &'static str,
        value: impl ToString,
        allowed: impl Into<String>,
    ) -> Self {
        let value = cut(&value.to_string());
        NicError::Invalid {
            field,
            value,
            allowed: allowed.into(),
        }
    }

    pub(crate) fn conflict(field: &'static str, reason: impl Into<String>) -> Self {
        NicError::Conflict {
            field,
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_message_names_field_value_and_range() {
        let e = NicError::invalid("vlan", 4096, "1-4094");
        assert_eq!(e.to_string(), "invalid vlan \"4096\": allowed 1-4094");
        assert_eq!(e.field(), "vlan");
    }

    #[test]
    fn long_values_are_cut_in_the_message() {
        let e = NicError::invalid("bridge", "é".repeat(60_000), "1-15 characters");
        let NicError::Invalid { value, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(value.chars().count(), MAX_ECHOED_CHARS + 1);
        assert!(value.ends_with('…'));
        assert!(e.to_string().len() < 400, "{}", e.to_string().len());
        // At the bound nothing is cut.
        let e = NicError::invalid("bridge", "b".repeat(MAX_ECHOED_CHARS), "x");
        assert!(!e.to_string().contains('…'));
    }

    #[test]
    fn conflict_message_names_field_and_reason() {
        let e = NicError::conflict("mtu", "virtio only");
        assert_eq!(e.to_string(), "mtu: virtio only");
        assert_eq!(e.field(), "mtu");
    }
}
