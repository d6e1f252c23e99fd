//! The llmesh contract: generated messages, clients and servers for every service, the encoded
//! file descriptor set that each server registers for reflection, and the rules that go with the
//! messages: what a valid request is ([`validate`]) and which of its fields key the cache
//! ([`cache_key`]).

#![allow(clippy::doc_markdown)]

pub mod common {
    pub mod v1 {
        tonic::include_proto!("llmesh.common.v1");
    }
}

pub mod generation {
    pub mod v1 {
        tonic::include_proto!("llmesh.generation.v1");
    }
}

pub mod gateway {
    pub mod v1 {
        tonic::include_proto!("llmesh.gateway.v1");
    }
}

pub mod cache {
    pub mod v1 {
        tonic::include_proto!("llmesh.cache.v1");

        /// Most entries one `StoreMany` call may carry; the service refuses more (INVALID_ARGUMENT).
        pub const STORE_MANY_MAX_ENTRIES: usize = 256;
    }
}

pub mod health {
    pub mod v1 {
        tonic::include_proto!("llmesh.health.v1");
    }
}

pub mod assemble;
pub mod cache_key;
mod convert;
pub mod validate;

/// What generation tells its callers about a failure, in the status' metadata (a trailer when a
/// stream fails): where it came from, so that a caller charges it to the right thing.
pub mod failure {
    /// The metadata key.
    pub const ORIGIN_KEY: &str = "llmesh-failure-origin";
    /// The model's upstream failed (the provider's endpoint, or a fault-injection model): the
    /// replica itself is fine and other models on it are not affected. Without the key, the
    /// failure is the replica's own.
    pub const ORIGIN_UPSTREAM: &str = "upstream";
}

/// The encoded `FileDescriptorSet` of every llmesh proto file, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("llmesh_descriptor");
