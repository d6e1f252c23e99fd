//! The llmesh job queue (work in progress).
