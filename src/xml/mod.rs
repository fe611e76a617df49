//! libvirt XML: the `<interface>` writer ([`interface`]) and a read-only
//! view of a whole domain ([`domain`]).

pub mod domain;
pub mod interface;
