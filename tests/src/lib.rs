//! weft-tests (being built).
