//! NVRTC (placeholder).
