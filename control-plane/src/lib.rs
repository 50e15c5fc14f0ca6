//! weft-control (being built).
