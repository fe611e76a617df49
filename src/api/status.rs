//! The one mapping from the crate's errors to gRPC status codes.
//!
//! Classification uses error variants and libvirt error numbers (already
//! turned into [`HvErrorKind`]), never message text.

use tonic::{Code, Status};

use crate::hotplug::HotplugError;
use crate::hypervisor::HvErrorKind;

/// Metadata key carrying a detach's final state on DEADLINE_EXCEEDED.
pub const DETACH_STATE_KEY: &str = "x-detach-state";

/// The gRPC code for an error.
pub fn code(e: &HotplugError) -> Code {
    match e {
        HotplugError::Invalid(_)
        | HotplugError::OutOfRange { .. }
        | HotplugError::GuestConfig(_) => Code::InvalidArgument,
        HotplugError::VmNotFound(_) | HotplugError::NicNotFound { .. } => Code::NotFound,
        HotplugError::MovedBack { cause, .. } | HotplugError::ReplugRolledBack { cause, .. } => {
            code(cause)
        }
        HotplugError::AlreadyExists { .. } => Code::AlreadyExists,
        // The caller is not allowed this bridge, whatever the host's state:
        // retrying or fixing the host will not help, the policy will.
        HotplugError::BridgeNotAllowed { .. } => Code::PermissionDenied,
        HotplugError::NoCapacity(_) | HotplugError::VmBusy { .. } => Code::ResourceExhausted,
        HotplugError::Precondition(_)
        | HotplugError::Mtu(_)
        | HotplugError::DetachRefused { .. } => Code::FailedPrecondition,
        HotplugError::DetachPending { .. }
        | HotplugError::MovePending { .. }
        | HotplugError::ReplugPending { .. } => Code::DeadlineExceeded,
        HotplugError::Unsupported { .. } => Code::Unimplemented,
        HotplugError::Hypervisor(h) => match h.kind {
            HvErrorKind::NotFound => Code::NotFound,
            HvErrorKind::Unsupported => Code::Unimplemented,
            HvErrorKind::InvalidState => Code::FailedPrecondition,
            HvErrorKind::Unavailable => Code::Unavailable,
            HvErrorKind::BadDefinition => Code::InvalidArgument,
            HvErrorKind::DeviceMissing => Code::NotFound,
            HvErrorKind::Timeout => Code::DeadlineExceeded,
            HvErrorKind::FilterMissing => Code::FailedPrecondition,
            HvErrorKind::Internal => Code::Internal,
        },
        HotplugError::Host(h) => match h.kind() {
            crate::host::HostErrorKind::NotFound => Code::NotFound,
            crate::host::HostErrorKind::FailedPrecondition => Code::FailedPrecondition,
            crate::host::HostErrorKind::Unavailable => Code::Unavailable,
            crate::host::HostErrorKind::Internal => Code::Internal,
        },
        HotplugError::DomainXml(_) | HotplugError::Internal(_) => Code::Internal,
    }
}

/// Turns an error into a status, attaching the detach state where it
/// applies.
pub fn to_status(e: &HotplugError) -> Status {
    let mut s = Status::new(code(e), e.to_string());
    if matches!(
        e,
        HotplugError::DetachPending { .. }
            | HotplugError::MovePending { .. }
            | HotplugError::ReplugPending { .. }
    ) {
        if let Ok(v) = "PENDING".parse() {
            s.metadata_mut().insert(DETACH_STATE_KEY, v);
        }
    }
    s
}

/// The canonical gRPC name of a code (`INVALID_ARGUMENT`), as other gRPC
/// tooling labels it.
pub fn code_name(c: Code) -> &'static str {
    match c {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostError;

    #[test]
    fn host_errors_map_by_kind() {
        let down = HotplugError::Host(HostError::OvsUnavailable {
            args: "br-exists cloudbr0".into(),
            detail: "exit Some(1): database connection failed".into(),
        });
        assert_eq!(code(&down), Code::Unavailable);
        let failed = HotplugError::Host(HostError::Ovs {
            args: "add-port".into(),
            detail: "exit Some(1): no port".into(),
        });
        assert_eq!(code(&failed), Code::Internal);
    }
}
