//! weft-proxy (being built).
