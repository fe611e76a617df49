//! `nic-agent guest-config`: the flags mapped onto [`crate::guest`], which
//! owns the model and the renderer (offline, no server).

use super::GuestConfigArgs;
use crate::guest::{self, GuestConfigError, GuestRequest};

/// `guest-config`: validates the flags and prints every file.
pub fn run(a: &GuestConfigArgs) -> Result<String, GuestConfigError> {
    guest::run(&GuestRequest {
        mac: a.mac.clone(),
        name: a.name.clone(),
        ip: a.ip.clone(),
        gateway: a.gateway.clone(),
        table: a.table,
        ip6: a.ip6.clone(),
        gateway6: a.gateway6.clone(),
        ip6_mode: a.ip6_mode.clone(),
        default_route: a.default,
    })
}
