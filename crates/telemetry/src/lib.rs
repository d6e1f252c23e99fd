//! llmesh telemetry (work in progress).
