//! Protobuf messages and gRPC stubs generated from `proto/`: the contracts between services.
#![allow(unreachable_pub, missing_debug_implementations, clippy::all)]

/// Encoded `FileDescriptorSet` of every optout proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("optout_descriptor");

/// Messages carried on RabbitMQ.
pub mod queue {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("optout.queue.v1");
    }
}

/// The rule-evaluator's `Decisions` service.
pub mod evaluator {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("optout.evaluator.v1");
    }
}

/// The `Admin` service every process serves.
pub mod admin {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("optout.admin.v1");
    }
}

/// The fetcher's `Memberships` service (Salesforce-side requests).
pub mod memberships {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("optout.memberships.v1");
    }
}

/// The salesforce-writer's `Records` service.
pub mod writer {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("optout.writer.v1");
    }
}
