//! libvirt XML: the `<interface>` writer ([`interface`]) and a read-only
//! view of a whole domain ([`domain`]), and the agent's anti-spoofing
//! nwfilter ([`nwfilter`]).

pub mod domain;
pub mod interface;
pub mod nwfilter;
