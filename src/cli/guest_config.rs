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
    })
}
