//! The gRPC service. Proto types stop at [`convert`]; errors become gRPC
//! statuses in exactly one place, [`status`].

pub mod convert;
pub mod health;
pub mod metrics;
pub mod server;
pub mod service;
pub mod status;
pub mod tls;

/// Generated protobuf and tonic code for `nicagent.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("nicagent.v1");

    /// Encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("nicagent_descriptor");
}
